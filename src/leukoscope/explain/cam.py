"""Class activation maps for the CNNs and the hybrid CNN-Transformer, with hooks that never outlive their use.

The CAM methods come from pytorch-grad-cam (``grad-cam`` on PyPI). :class:`CAM` is the one place that attaches its
hooks: a context manager whose ``__exit__`` removes them and restores the module exactly as it found it
(``training`` flags, ``requires_grad``), and never swallows an exception. (The library's own ``__exit__`` returns
True for an ``IndexError``, i.e. swallows it, so it is not used.)

Token maps: the hybrid model's target layer gives tokens ``(B, 1 + g*g, dim)`` with a class token first;
:func:`tokens_to_grid` drops the class token and reshapes them to ``(B, dim, g, g)``.

Gradient-free methods: ``scorecam`` (Score-CAM, from the library; one forward pass per channel of the target layer)
and ``occlusion`` (a blurred patch slides over the image; no hooks at all, works on any network).
"""

from __future__ import annotations

import math
import threading
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass

import cv2
import numpy as np
import torch
from torch import nn

from leukoscope._registry import Registry


@dataclass(frozen=True)
class Method:
    """An explanation method.

    Attributes:
        name: registry name (``gradcam``, ``gradcam++``, ...).
        title: how reports print it.
        cam_class: the pytorch-grad-cam class, or None for a method implemented here (occlusion).
        uses_gradients: False for gradient-free methods.
        layer: which layer it explains by default: ``model`` (the model's recorded target layer) or ``fine``
            (the stride-16 layer of the CNN backbone, see :func:`fine_layer`).
    """

    name: str
    title: str
    cam_class: Callable | None
    uses_gradients: bool
    layer: str = "model"


METHODS: Registry = Registry("explanation method")


def _register(method: Method) -> None:
    METHODS.register(method.name)(lambda m=method: m)


def _library_methods() -> None:
    from pytorch_grad_cam import GradCAM, GradCAMPlusPlus, LayerCAM, ScoreCAM

    class QuietScoreCAM(ScoreCAM):
        """Score-CAM without the library's per-image tqdm bar on stderr; same weights (softmax of target scores
        of the input masked by each normalised, upsampled activation map)."""

        batch_size = 64

        def get_cam_weights(self, input_tensor, target_layer, targets, activations, grads):  # noqa: ANN001
            with torch.no_grad():
                act = torch.from_numpy(activations).to(input_tensor.device)
                up = nn.functional.interpolate(act, size=input_tensor.shape[-2:], mode="bilinear", align_corners=True)
                flat = up.flatten(2)
                lo, hi = flat.min(-1)[0][..., None, None], flat.max(-1)[0][..., None, None]
                up = (up - lo) / (hi - lo + 1e-8)
                weights = []
                for target, x, masks in zip(targets, input_tensor, up):
                    scores = []
                    for i in range(0, masks.shape[0], self.batch_size):
                        batch = x[None] * masks[i:i + self.batch_size, None]
                        scores.append(torch.stack([target(o) for o in self.model(batch)]).float())
                    weights.append(torch.softmax(torch.cat(scores), 0))
                return torch.stack(weights).cpu().numpy()

    _register(Method("gradcam", "Grad-CAM", GradCAM, True))
    _register(Method("gradcam++", "Grad-CAM++", GradCAMPlusPlus, True))
    _register(Method("layercam", "LayerCAM (stride 16)", LayerCAM, True, layer="fine"))
    _register(Method("scorecam", "Score-CAM", QuietScoreCAM, False))
    _register(Method("occlusion", "Occlusion", None, False))


_library_methods()


def get_method(name: str) -> Method:
    """The :class:`Method` called ``name`` (``Unknown explanation method 'gradcm'. Did you mean 'gradcam'?``)."""
    return METHODS.get(name)()


def tokens_to_grid(t: torch.Tensor) -> torch.Tensor:
    """``(B, C, h, w)`` unchanged; tokens ``(B, N, C)`` -> ``(B, C, g, g)``, dropping a leading class token when
    ``N == 1 + g*g``."""
    if t.ndim == 4:
        return t
    if t.ndim != 3:
        raise ValueError(f"cannot make a 2-D map from an activation of shape {tuple(t.shape)}")
    n = t.shape[1]
    for skip in (1, 0):
        g = math.isqrt(n - skip)
        if g * g == n - skip and g > 0:
            return t[:, skip:].reshape(t.shape[0], g, g, t.shape[2]).permute(0, 3, 1, 2)
    raise ValueError(f"{n} tokens are neither g*g nor 1 + g*g: cannot reshape them to a square grid")


# The stride-16 stage of each backbone family: a finer (14 x 14 at 224 px) map than the last stage (7 x 7).
_FINE_LAYERS = {"EfficientNet": "backbone.blocks.4", "ResNet": "backbone.layer3"}


def fine_layer(module: nn.Module, default: str) -> str:
    """The stride-16 layer of the model's CNN backbone; ``default`` for a backbone family not listed."""
    bb = getattr(module, "backbone", None)
    name = _FINE_LAYERS.get(type(bb).__name__, "")
    if name:
        try:
            module.get_submodule(name)
            return name
        except AttributeError:
            pass
    return default


def resolve_layer(module: nn.Module, method: Method, layer: str | None, model_layer: str) -> str:
    """The dotted name of the layer a method explains: ``layer`` if given, else the method's default."""
    if layer:
        name = layer
    elif method.layer == "fine":
        name = fine_layer(module, model_layer)
    else:
        name = model_layer
    if not name:
        raise ValueError(f"the model records no Grad-CAM target layer; pass one (e.g. layer='backbone.blocks.4') or "
                         f"use method='occlusion'")
    try:
        module.get_submodule(name)
    except AttributeError:
        raise ValueError(f"the model has no layer {name!r} to explain") from None
    return name


class CAM:
    """Class activation maps of one layer of ``module``, with hooks attached only inside ``with``.

    Example::

        with CAM(model.module, "gradcam", "backbone.bn2") as cam:
            maps = cam(x, [1])          # (N, S, S) float32 in [0, 1]

    On ``__exit__`` (also after an exception, which propagates) the hooks are removed and every parameter's
    ``requires_grad`` and every submodule's ``training`` flag are restored. Parameters do not get ``.grad``: while
    the hooks are attached they stop requiring gradients and the input carries them instead.

    Args:
        module: the network (logits out).
        method: a registered method name (not ``occlusion``, which needs no hooks: see :func:`occlusion_map`).
        layer: dotted name of the layer to explain.
        lock: held while the hooks are attached, so that no other thread's forward pass goes through them.
    """

    def __init__(self, module: nn.Module, method: str, layer: str, lock: threading.Lock | None = None) -> None:
        self.module = module
        self.method = get_method(method)
        if self.method.cam_class is None:
            raise ValueError(f"method {method!r} needs no hooks; call occlusion_map() instead")
        self.layer = layer
        self._lock = lock
        self._cam = None
        self._saved: tuple[list[bool], list[bool]] | None = None
        self._held = False

    def __enter__(self) -> CAM:
        if self._lock is not None:
            self._lock.acquire()
            self._held = True
        try:
            params = list(self.module.parameters())
            self._saved = ([p.requires_grad for p in params], [m.training for m in self.module.modules()])
            for p in params:
                p.requires_grad_(False)
            self.module.eval()
            target = self.module.get_submodule(self.layer)
            self._cam = self.method.cam_class(self.module, [target], reshape_transform=tokens_to_grid)
        except BaseException:
            self._restore()
            raise
        return self

    def __call__(self, x: torch.Tensor, targets: list[int]) -> np.ndarray:
        """Maps ``(N, H, W)`` float32 in [0, 1] at the input's resolution, for class ``targets[i]`` of image ``i``."""
        if self._cam is None:
            raise RuntimeError("use CAM inside a `with` block: hooks are attached on entry and removed on exit")
        from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

        if len(targets) != x.shape[0]:
            raise ValueError(f"got {len(targets)} target classes for a batch of {x.shape[0]} images")
        # The input carries the gradient (parameters do not) so the target layer's output requires grad; this also
        # keeps PyTorch's fused TransformerEncoderLayer fast path, which would bypass the hooked norm, switched off.
        x = x.detach().clone().requires_grad_(True)
        with torch.enable_grad():
            maps = self._cam(x, [ClassifierOutputTarget(int(t)) for t in targets])
        return np.clip(np.nan_to_num(maps.astype(np.float32)), 0.0, 1.0)

    def __exit__(self, exc_type: object, exc: object, tb: object) -> bool:
        self._restore()
        return False  # never swallow the exception

    def _restore(self) -> None:
        try:
            if self._cam is not None:
                self._cam.activations_and_grads.release()
                self._cam = None
            if self._saved is not None:
                flags, modes = self._saved
                for p, f in zip(self.module.parameters(), flags):
                    p.requires_grad_(f)
                for m, t in zip(self.module.modules(), modes):
                    m.training = t
                self._saved = None
        finally:
            if self._held:
                self._held = False
                self._lock.release()


def occlusion_map(score_fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, patch: int | None = None,
                  stride: int | None = None, batch_size: int = 64) -> np.ndarray:
    """Occlusion sensitivity: how much the target's score falls when a patch is replaced by a blurred copy.

    Blur rather than grey or black: a grey square is itself a strong, unnatural feature, and black is what the
    background of a segmented cell already is. Positive falls are summed over the patches covering each pixel and
    averaged, then scaled to [0, 1].

    Args:
        score_fn: batch ``(B, 3, S, S)`` -> score of the explained class per image (e.g. its log-probability).
        x: one normalised image ``(1, 3, S, S)``.
        patch, stride: side and step of the sliding patch in input pixels (default S/7 and S/14).
    """
    _, _, h, w = x.shape
    patch = patch or max(4, round(min(h, w) / 7))
    stride = stride or max(2, patch // 2)
    sigma = patch / 2
    k = int(2 * round(3 * sigma) + 1)
    blurred = torch.from_numpy(cv2.GaussianBlur(x[0].permute(1, 2, 0).numpy(), (k, k), sigma)).permute(2, 0, 1)
    ys = list(range(0, max(h - patch, 0) + 1, stride))
    xs = list(range(0, max(w - patch, 0) + 1, stride))
    if ys[-1] + patch < h:
        ys.append(h - patch)
    if xs[-1] + patch < w:
        xs.append(w - patch)
    boxes = [(y, x0) for y in ys for x0 in xs]
    heat = np.zeros((h, w), np.float64)
    count = np.zeros((h, w), np.float64)
    with torch.no_grad():
        base = float(score_fn(x)[0])
        for i in range(0, len(boxes), batch_size):
            chunk = boxes[i:i + batch_size]
            batch = x.repeat(len(chunk), 1, 1, 1)
            for j, (y, x0) in enumerate(chunk):
                batch[j, :, y:y + patch, x0:x0 + patch] = blurred[:, y:y + patch, x0:x0 + patch]
            drops = base - score_fn(batch).double().numpy()
            for (y, x0), d in zip(chunk, drops):
                heat[y:y + patch, x0:x0 + patch] += max(float(d), 0.0)
                count[y:y + patch, x0:x0 + patch] += 1
    heat /= np.maximum(count, 1)
    top = heat.max()
    return (heat / top if top > 0 else heat).astype(np.float32)


def explain_tensor(module: nn.Module, x: torch.Tensor, target: int, method: str = "gradcam", layer: str = "",
                   lock: threading.Lock | None = None) -> np.ndarray:
    """One normalised image ``(1, 3, S, S)`` -> map ``(S, S)`` float32 in [0, 1] for class ``target``.

    Args:
        layer: the layer a CAM method explains (ignored by occlusion).
        lock: held while the network runs with hooks (see :class:`CAM`).
    """
    m = get_method(method)
    if m.cam_class is None:
        def score(b: torch.Tensor) -> torch.Tensor:
            return torch.log_softmax(module(b).float(), dim=1)[:, target]

        with lock if lock is not None else nullcontext():
            was = [mm.training for mm in module.modules()]
            module.eval()
            try:
                return occlusion_map(score, x)
            finally:
                for mm, t in zip(module.modules(), was):
                    mm.training = t
    with CAM(module, method, layer, lock=lock) as cam:
        return cam(x, [target])[0]
