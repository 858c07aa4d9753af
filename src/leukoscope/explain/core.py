"""Explain one image: prediction (label, calibrated confidence, all probabilities) + heatmap + overlay."""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np
import torch

from leukoscope.data.images import read_image
from leukoscope.explain.cam import CAM, Method, explain_tensor, get_method, resolve_layer
from leukoscope.explain.overlay import render_overlay
from leukoscope.explain.record import image_kind, method_faithfulness
from leukoscope.models.modeldir import DEFAULT_MODEL, LoadedModel, load_model, resolve_model_dir

log = logging.getLogger(__name__)

# A pixel belongs to the hottest region when its heat is at least this share of the peak.
REGION_THRESHOLD = 0.5


@functools.lru_cache(maxsize=4)
def _load_cached(path: str) -> LoadedModel:
    return load_model(path, kind="image")


def as_model(model: LoadedModel | str | Path | None) -> LoadedModel:
    """A :class:`LoadedModel` as is; a shipped name or model directory loaded once and cached."""
    if isinstance(model, LoadedModel):
        return model
    return _load_cached(str(resolve_model_dir(model or DEFAULT_MODEL).resolve()))


def as_rgb(image: np.ndarray, name: str = "<array>") -> np.ndarray:
    """Check an RGB uint8 ``(H, W, 3)`` array (grayscale ``(H, W)`` is repeated to three channels); never copies an
    RGB array and never modifies it."""
    if not isinstance(image, np.ndarray):
        raise TypeError(f"image must be a path or a numpy array, got {type(image).__name__} ({name})")
    if image.ndim == 2:
        image = np.repeat(image[:, :, None], 3, axis=2)
    if image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"image must be RGB (H, W, 3) or grayscale (H, W), got shape {image.shape} ({name})")
    if image.dtype != np.uint8:
        raise ValueError(f"image must be uint8 (0-255), got dtype {image.dtype} ({name}); read files with "
                         f"leukoscope.data.images.read_image")
    if min(image.shape[:2]) < 2:
        raise ValueError(f"image is too small to explain: {image.shape[1]}x{image.shape[0]} pixels ({name})")
    return image


def class_index(model: LoadedModel, target_class: int | str | None, proba: np.ndarray) -> int:
    """The explained class: the predicted one when ``target_class`` is None, else an index or a class name."""
    if target_class is None:
        return model.decide(proba)
    if isinstance(target_class, str):
        if target_class not in model.classes:
            raise ValueError(f"Unknown class {target_class!r}. The model's classes: {model.classes}")
        return model.classes.index(target_class)
    k = int(target_class)
    if not 0 <= k < len(model.classes):
        raise ValueError(f"target_class {k} is out of range for {len(model.classes)} classes {model.classes}")
    return k


class _Top(torch.nn.Module):
    """The part of a network above a cut, as a module: the cut's output in, logits out.

    Only the modules above the cut are registered, so the CAM's bookkeeping (eval mode, frozen parameters, hooks)
    walks a few dozen modules instead of the whole backbone."""

    def __init__(self, parts: list[torch.nn.Module], forward: Callable[[torch.Tensor], torch.Tensor]) -> None:
        super().__init__()
        self.parts = torch.nn.ModuleList(parts)
        object.__setattr__(self, "_forward", forward)  # closes over the network: not registered

    def forward(self, f: torch.Tensor) -> torch.Tensor:
        return self._forward(f)

    def name_of(self, layer: torch.nn.Module) -> str | None:
        return next((name for name, m in self.named_modules() if m is layer), None)


class _Below(torch.nn.Module):
    """The part of a network below a cut, as a module of its own (for export)."""

    def __init__(self, seq: torch.nn.Module) -> None:
        super().__init__()
        self.seq = seq

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.seq(x)


def _cuts(net: torch.nn.Module) -> list[tuple[str, torch.nn.Module, _Top]]:
    """Where a network can be cut for explaining, lowest top first: (name, the part below, the part above).

    A CNN is cut below its head convolution (everything under it runs in ONNX Runtime, whatever the training froze);
    any network with a frozen stem is also cut at the stem."""
    from leukoscope.models.net import backbone_parts

    cuts = []
    if hasattr(net, "backbone") and hasattr(net, "pool") and hasattr(net, "head"):
        try:
            below, above, _ = backbone_parts(net.backbone, 0)
        except Exception as exc:  # noqa: BLE001 - an unknown layout: no such cut
            log.debug("no cut below the head of %s (%s): explaining above the stem only", type(net).__name__, exc)
            below = above = None
        if above is not None and any(True for _ in above.parameters()):
            def head_forward(f: torch.Tensor, above: torch.nn.Module = above) -> torch.Tensor:
                z = above(f)
                z = net.head(net.pool(z) if z.ndim == 4 else z)
                return net.coarse(z) if hasattr(net, "coarse") else z

            cuts.append(("features", _Below(below), _Top([above, net.head], head_forward)))
    if getattr(net, "_stem", None) is not None and hasattr(net, "top") and hasattr(net, "trainable_modules"):
        def stem_forward(f: torch.Tensor) -> torch.Tensor:
            return net.from_stem(f) if hasattr(net, "from_stem") else net.head(net.top(f))

        cuts.append(("stem", _Below(net._stem), _Top(net.trainable_modules(), stem_forward)))
    return cuts


def _top_part(model: LoadedModel, method: Method, layer: str) -> tuple[_Top, str, str, torch.nn.Module] | None:
    """(top, ``layer``'s name in it, cut name, part below) for the lowest cut under ``layer``, when a gradient
    method explains a model that runs on ONNX Runtime (cached on the model); None otherwise."""
    if model.backend != "onnx" or not method.uses_gradients or method.cam_class is None or method.scales:
        return None  # (a multi-scale method runs the whole network at sizes the exported part was not made for)
    cache = model.__dict__.setdefault("_explain_tops", {})
    if layer not in cache:
        cache[layer] = None
        target = model.module.get_submodule(layer)
        for name, below, top in _cuts(model.module):
            in_top = top.name_of(target)
            if in_top is not None:
                cache[layer] = (top, in_top, name, below)
                break
    return cache[layer]


def cam_batch(model: LoadedModel, x: np.ndarray, targets: list[int] | None, method: str = "gradcam",
              layer: str | None = None) -> np.ndarray:
    """CAM maps ``(N, S, S)`` in [0, 1] of a prepared batch ``(N, 3, S, S)`` (see ``LoadedModel.prepare_batch``) for
    class ``targets[i]`` of image ``i`` (None: each image's highest-scoring class), in one pass. On ONNX Runtime the
    network below the cut runs there (see :func:`_cuts`), and the gradient-free Score-CAM's many forward passes too.
    For the CAM methods (not occlusion)."""
    m = get_method(method)
    if m.cam_class is None:
        raise ValueError(f"cam_batch needs a CAM method, not {method!r}")
    layer_name = resolve_layer(model.module, m, layer, model.target_layer)
    top = _top_part(model, m, layer_name)
    features = None if top is None else model.onnx_part(top[2], top[3], x)
    if features is None:
        fast = model.logits if model.backend == "onnx" else None
        with CAM(model.module, method, layer_name, lock=model._lock, logits_fn=fast) as cam:
            return cam(torch.from_numpy(x), targets)
    with CAM(top[0], method, top[1], lock=model._lock) as cam:
        small = cam(torch.from_numpy(features), targets)
    size = tuple(x.shape[-2:][::-1])  # the maps at the network's input size, as the library makes them
    return np.stack([cv2.resize(s, size, interpolation=cv2.INTER_LINEAR) for s in small])


def _heatmap(model: LoadedModel, rgb: np.ndarray, k: int | None, method: str, layer: str | None
             ) -> tuple[np.ndarray, str]:
    m = get_method(method)
    x = model.preprocess(rgb)[None]
    if m.cam_class is not None:
        layer_name = resolve_layer(model.module, m, layer, model.target_layer)
        small = cam_batch(model, x, None if k is None else [k], method, layer_name)[0]
    else:  # occlusion: its forward passes run on ONNX Runtime when the model does
        layer_name = ""
        fast = model.logits if model.backend == "onnx" else None
        small = explain_tensor(model.module, torch.from_numpy(x), k, method, lock=model._lock, logits_fn=fast)
    # Preprocess squashes the whole image (or its crop) to S x S: to_image is the exact inverse of its geometry.
    heat = model.preprocess.to_image(small, rgb)
    return np.clip(heat, 0.0, 1.0).astype(np.float32), layer_name


def gradcam_array(model: LoadedModel | str | Path | None, rgb: np.ndarray, target_class: int | str | None = None,
                  method: str = "gradcam", layer: str | None = None) -> np.ndarray:
    """The heatmap of one RGB uint8 image: ``(H, W)`` float32 in [0, 1], at the image's own resolution.

    Args:
        model: a loaded model, a shipped model name or a model directory.
        rgb: ``(H, W, 3)`` uint8; not modified.
        target_class: class index or name to explain; None explains the predicted class.
        method: ``gradcam`` (default), ``gradcam++``, ``layercam``, ``scorecam``, ``occlusion`` or ``cameras``
            (multi-scale, finer map, ~30 forward passes' worth of compute; see docs/EXPLAIN.md).
        layer: dotted name of the layer to explain (default: the method's choice, usually the model's target layer).
    """
    model = as_model(model)
    rgb = as_rgb(rgb)
    # None: the predicted class, taken from the explaining forward pass itself (argmax of logits / T = of logits)
    k = None if target_class is None else class_index(model, target_class, np.zeros(0))
    return _heatmap(model, rgb, k, method, layer)[0]


def hottest_region(heat: np.ndarray, threshold: float = REGION_THRESHOLD) -> dict:
    """The connected region around the peak where heat >= ``threshold`` * peak.

    Returns:
        ``bbox`` [x0, y0, x1, y1] (pixels, x1/y1 exclusive), ``peak`` [x, y], ``area_fraction`` (share of the image),
        ``heat_share`` (share of all heat inside the box's region), ``threshold``.
    """
    h, w = heat.shape
    py, px = np.unravel_index(int(np.argmax(heat)), heat.shape)
    peak = float(heat[py, px])
    if peak <= 0:
        return {"bbox": [0, 0, w, h], "peak": [int(px), int(py)], "area_fraction": 1.0, "heat_share": 0.0,
                "threshold": threshold}
    hot = (heat >= threshold * peak).astype(np.uint8)
    _, labels, stats, _ = cv2.connectedComponentsWithStats(hot, connectivity=8)
    lab = labels[py, px]
    x0, y0, bw, bh, area = (int(v) for v in stats[lab])
    total = float(heat.sum())
    share = float(heat[labels == lab].sum()) / total if total > 0 else 0.0
    return {"bbox": [x0, y0, x0 + bw, y0 + bh], "peak": [int(px), int(py)], "area_fraction": area / (h * w),
            "heat_share": share, "threshold": threshold}


@dataclass(frozen=True)
class Explanation:
    """What a clinician reads for one image.

    Attributes:
        label, confidence: predicted class and its calibrated probability.
        probabilities: calibrated probability of every class, in the model's class order.
        explained_class: the class the heatmap explains (the predicted one unless asked otherwise).
        method, method_title, target_layer: how the heatmap was made (``target_layer`` is "" for occlusion).
        heatmap: ``(H, W)`` float32 in [0, 1] at the image's resolution.
        overlay: RGB uint8, the heatmap blended on the image at its resolution, plus a caption and a colour bar.
        region: the hottest region (see :func:`hottest_region`).
        model: the model's name; source: the image's path, or ``<array>``.
        faithfulness: what the model directory's faithfulness record says of the method (``verdict``: passes /
            fails / inconclusive / not measured, and a ``note`` for the reader; see
            :func:`leukoscope.explain.record.method_faithfulness`).
    """

    label: str
    confidence: float
    probabilities: dict[str, float]
    explained_class: str
    method: str
    method_title: str
    target_layer: str
    heatmap: np.ndarray = field(repr=False)
    overlay: np.ndarray = field(repr=False)
    region: dict
    model: str
    source: str = "<array>"
    faithfulness: dict = field(default_factory=dict)
    ood: bool | None = None
    ood_score: float | None = None
    warnings: list[tuple[str, str]] = field(default_factory=list)

    def to_dict(self) -> dict:
        """Everything but the arrays, JSON-ready."""
        h, w = self.heatmap.shape
        return {"path": self.source, "image_size": [w, h], "label": self.label, "confidence": self.confidence,
                "probabilities": self.probabilities, "explained_class": self.explained_class, "method": self.method,
                "method_title": self.method_title, "target_layer": self.target_layer, "hottest_region": self.region,
                "model": self.model, "faithfulness": self.faithfulness, "ood": self.ood, "ood_score": self.ood_score,
                "warnings": [{"code": c, "message": m} for c, m in self.warnings]}


def explain(image: str | Path | np.ndarray, model: LoadedModel | str | Path | None = DEFAULT_MODEL,
            method: str = "gradcam", target_class: int | str | None = None, layer: str | None = None) -> Explanation:
    """Predict one image and show what drove the decision.

    Args:
        image: a path or an RGB uint8 array (not modified).
        model: a loaded model, a shipped model name or a model directory (default ``leukemia-cell``).
        method: ``gradcam`` (default), ``gradcam++``, ``layercam``, ``scorecam``, ``occlusion`` or ``cameras``.
        target_class: class index or name to explain; None explains the predicted class.
        layer: the layer a CAM method explains (default: the model's recorded target layer; LayerCAM: the
            backbone's stride-16 stage).

    Raises:
        ImageReadError: an unreadable file (the message names it).
        ValueError: unknown method, class or layer; an array that is not RGB uint8.
    """
    model = as_model(model)
    source = "<array>" if isinstance(image, np.ndarray) else str(image)
    rgb = as_rgb(image) if isinstance(image, np.ndarray) else read_image(image)
    from leukoscope.predict import predict

    pred = predict(rgb, model)
    proba = np.array([pred.probabilities[c] for c in model.classes])
    k_pred = model.classes.index(pred.label)
    k = class_index(model, target_class, proba)
    m = get_method(method)
    heat, layer_name = _heatmap(model, rgb, k, method, layer)
    region = hottest_region(heat)
    label, conf = model.classes[k_pred], float(proba[k_pred])
    caption = f"{label} {100 * conf:.1f}%   {m.title}" + (f" for '{model.classes[k]}'" if k != k_pred else "")
    overlay = render_overlay(rgb, heat, caption=caption, bbox=region["bbox"])
    probs = {c: float(p) for c, p in zip(model.classes, proba, strict=True)}
    return Explanation(label, conf, probs, model.classes[k], m.name, m.title, layer_name, heat, overlay, region,
                       model.name, source, method_faithfulness(model.path, m.name, image_kind(rgb)), pred.ood,
                       pred.ood_score, pred.warnings)
