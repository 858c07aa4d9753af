"""Class activation maps for the CNNs and the hybrid CNN-Transformer, with hooks that never outlive their use.

The CAM methods come from pytorch-grad-cam (``grad-cam`` on PyPI). :class:`CAM` is the one place that attaches its
hooks: a context manager whose ``__exit__`` removes them and restores the module exactly as it found it
(``training`` flags, ``requires_grad``), and never swallows an exception. (The library's own ``__exit__`` returns
True for an ``IndexError``, i.e. swallows it, so it is not used.)

Token maps: the hybrid model's target layer gives tokens ``(B, 1 + g*g, dim)`` with a class token first;
:func:`tokens_to_grid` drops the class token and reshapes them to ``(B, dim, g, g)``.

Gradient-free methods: ``scorecam`` (Score-CAM, from the library; one forward pass per channel of the target layer)
and ``occlusion`` (a blurred patch slides over the image; no hooks at all, works on any network).

Multi-scale: ``cameras`` (:class:`MultiScaleCAM`, after CAMERAS, Jalwana et al. 2021) runs the network on the input
enlarged to several sizes, so that the target layer's grid is finer (7 x 7 at 224 px, 28 x 28 at 896 px), and
combines the activations and gradients of all sizes. Implemented here, on the library's hook class.
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
        scales: for a multi-scale method, the input sizes it runs the network at, as multiples of the model's input
            size (empty for the others). Such a method runs the whole network in PyTorch at each size, so it never
            takes the ONNX Runtime cut of ``explain.core.cam_batch``.
    """

    name: str
    title: str
    cam_class: Callable | None
    uses_gradients: bool
    layer: str = "model"
    scales: tuple[float, ...] = ()


METHODS: Registry = Registry("explanation method")


def _register(method: Method) -> None:
    METHODS.register(method.name)(lambda m=method: m)


def _library_methods() -> None:
    from pytorch_grad_cam import GradCAM, GradCAMPlusPlus, LayerCAM, ScoreCAM

    class QuietScoreCAM(ScoreCAM):
        """The library's Score-CAM weights (softmax over channels of the target score of the input masked by each
        min-max normalised, upsampled activation map), computed without its per-image tqdm bar on stderr, and with
        one forward pass shared by all flat channels: their normalised mask is all zeros, so their masked inputs are
        identical (on EfficientNet-Lite0's last layer 30-45 % of the 1280 channels are flat for a cell image)."""

        batch_size = 64
        logits_fn: Callable[[np.ndarray], np.ndarray] | None = None

        def _forward(self, x: torch.Tensor) -> torch.Tensor:
            if self.logits_fn is not None:  # e.g. ONNX Runtime, ~25x faster than eager PyTorch on CPU
                return torch.from_numpy(np.asarray(self.logits_fn(x.cpu().numpy().astype(np.float32))))
            return self.model(x)

        def get_cam_weights(self, input_tensor, target_layer, targets, activations, grads):  # noqa: ANN001
            with torch.no_grad():
                act = torch.from_numpy(activations).to(input_tensor.device)
                up = nn.functional.interpolate(act, size=input_tensor.shape[-2:], mode="bilinear", align_corners=True)
                flat = up.flatten(2)
                lo, hi = flat.min(-1)[0][..., None, None], flat.max(-1)[0][..., None, None]
                up = (up - lo) / (hi - lo + 1e-8)
                weights = []
                for target, x, masks in zip(targets, input_tensor, up, strict=True):
                    live = torch.nonzero(masks.flatten(1).amax(1) > 0).flatten()
                    scores = torch.full((masks.shape[0],), float(target(self._forward(x[None] * 0)[0])))
                    for i in range(0, len(live), self.batch_size):
                        idx = live[i:i + self.batch_size]
                        out = self._forward(x[None] * masks[idx, None])
                        scores[idx] = torch.stack([target(o) for o in out]).float().cpu()
                    weights.append(torch.softmax(scores, 0))
                return torch.stack(weights).numpy()

    _register(Method("gradcam", "Grad-CAM", GradCAM, True))
    _register(Method("gradcam++", "Grad-CAM++", GradCAMPlusPlus, True))
    _register(Method("layercam", "LayerCAM (stride 16)", LayerCAM, True, layer="fine"))
    _register(Method("scorecam", "Score-CAM", QuietScoreCAM, False))
    _register(Method("occlusion", "Occlusion", None, False))
    _register(Method("cameras", "CAMERAS (multi-scale)", MultiScaleCAM, True, scales=CAMERAS_SCALES))


# Input sizes of ``cameras``, in multiples of the model's input size: 224, 448, 672 and 896 px for a 224 px model,
# i.e. 7, 14, 21 and 28 cells a side at a stride-32 layer.
CAMERAS_SCALES = (1.0, 2.0, 3.0, 4.0)


class MultiScaleCAM:
    """Multi-scale class activation map after CAMERAS (Jalwana et al., CVPR 2021).

    The input is enlarged (bicubic) to each of ``scales`` times its size and run through the network; at every size
    the target layer's activations ``A_s`` and the gradients ``G_s`` of the explained class's logit are recorded and
    upsampled (bilinear) to the largest size's grid, then averaged over the sizes. The map is
    ``relu(sum_c mean_s(G_s)_c * mean_s(A_s)_c)``, upsampled to the input's size and scaled to [0, 1]. A fully
    convolutional network with global pooling gives a finer grid at a larger input (a stride-32 layer: 28 x 28 at
    4 x 224 px), so the map can follow a cell's outline where Grad-CAM's 7 x 7 cannot.

    The explained class is the one asked for, else the class the network predicts at its own input size (scale 1, the
    first pass); every size's gradient is of that class, and every size counts. Two deliberate differences from the
    authors' code: activations and gradients are upsampled to the largest grid, not to the input's pixels (detail is
    bounded by that grid either way; 1280 x 28 x 28 values per size instead of 1280 x 224 x 224), and
    a size where the prediction differs from the native one is kept (the authors drop it when no class is given,
    which would make ``explain()`` and ``gradcam_array()`` disagree: one passes the class, the other does not).

    Same interface as a pytorch-grad-cam class (``CAM`` attaches it and releases ``activations_and_grads``).

    Args:
        model: the network (logits out); it must accept inputs of every size in ``scales``.
        target_layers: one layer.
        reshape_transform: activation -> ``(B, C, h, w)`` (e.g. :func:`tokens_to_grid`).
        scales: input sizes as multiples of the input's size; must include 1 (the native size), each >= 1.
    """

    def __init__(self, model: nn.Module, target_layers: list[nn.Module],
                 reshape_transform: Callable[[torch.Tensor], torch.Tensor] | None = None,
                 scales: tuple[float, ...] = CAMERAS_SCALES) -> None:
        from pytorch_grad_cam.activations_and_gradients import ActivationsAndGradients

        scales = tuple(sorted({float(s) for s in scales}))
        if not scales or scales[0] != 1.0:
            raise ValueError(f"scales must include 1 (the model's own input size) and be >= 1, got {scales}")
        if len(target_layers) != 1:
            raise ValueError(f"MultiScaleCAM explains one layer, got {len(target_layers)}")
        self.model = model
        self.scales = scales
        self.activations_and_grads = ActivationsAndGradients(model, target_layers, reshape_transform)

    def __call__(self, input_tensor: torch.Tensor, targets: list[Callable] | None = None) -> np.ndarray:
        """Maps ``(N, H, W)`` float32 in [0, 1] of a batch ``(N, 3, H, W)``; ``targets[i]`` maps image ``i``'s
        logits to the explained score (None: the logit of its class predicted at scale 1)."""
        from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

        n, _, h, w = input_tensor.shape
        acts, grads = [], []
        for s in self.scales:  # scale 1 first: the native prediction
            size = (round(h * s), round(w * s))
            x = input_tensor if s == 1.0 else nn.functional.interpolate(input_tensor, size=size, mode="bicubic",
                                                                        align_corners=False)
            try:
                out = self.activations_and_grads(x)
            except (RuntimeError, ValueError, AssertionError) as e:
                if s == 1.0:
                    raise
                raise ValueError(f"method 'cameras' runs the network at {size[1]}x{size[0]} px ({s:g} x its input) "
                                 f"and {type(self.model).__name__} cannot take that size ({e}); use another method "
                                 f"or scales=(1,)") from e
            if targets is None:
                targets = [ClassifierOutputTarget(int(k)) for k in out.argmax(1)]
            if len(targets) != n:
                raise ValueError(f"got {len(targets)} target classes for a batch of {n} images")
            score = sum(t(o) for t, o in zip(targets, out, strict=True))
            score.backward()
            acts.append(self.activations_and_grads.activations[-1].float())
            grads.append(self.activations_and_grads.gradients[0].float())
            self.activations_and_grads.clear()
        with torch.no_grad():
            grid = acts[-1].shape[-2:]  # the largest size's grid

            def up(t: torch.Tensor) -> torch.Tensor:
                return t if t.shape[-2:] == grid else nn.functional.interpolate(t, size=grid, mode="bilinear",
                                                                                 align_corners=False)

            mean_a = torch.stack([up(a) for a in acts]).mean(0)
            mean_g = torch.stack([up(g) for g in grads]).mean(0)
            cam = torch.relu((mean_a * mean_g).sum(1, keepdim=True))
            cam = nn.functional.interpolate(cam, size=(h, w), mode="bilinear", align_corners=False)[:, 0]
            flat = cam.flatten(1)
            lo, hi = flat.min(1)[0][:, None, None], flat.max(1)[0][:, None, None]
            cam = (cam - lo) / (hi - lo + 1e-7)
        return cam.cpu().numpy().astype(np.float32)


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
        raise ValueError("the model records no Grad-CAM target layer; pass one (e.g. layer='backbone.blocks.4') or "
                         "use method='occlusion'")
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
    the hooks are attached they stop requiring gradients.

    Where gradients start: in a CNN the target layer's output is made a leaf that requires grad, so the forward pass
    below it builds no autograd graph and the backward pass stops there (the maps only need the gradient at that
    layer, so nothing below it is back-propagated; docs/EXPLAIN.md, "Speed"). A model with Transformer
    encoder layers lets the input carry the gradient instead: it keeps PyTorch's fused encoder fast path, which
    would bypass the hooked sub-layer, switched off.

    Args:
        module: the network (logits out).
        method: a registered method name (not ``occlusion``, which needs no hooks: see :func:`occlusion_map`).
        layer: dotted name of the layer to explain.
        lock: held while the hooks are attached, so that no other thread's forward pass goes through them.
        logits_fn: optional faster forward pass (normalised float32 batch -> logits, e.g. the model's ONNX Runtime
            session) for Score-CAM's many masked inputs; it must not take ``lock``.
        scales: input sizes of a multi-scale method (``cameras``), in multiples of the input's size (default: the
            method's own, see :data:`CAMERAS_SCALES`); an error for any other method.
    """

    def __init__(self, module: nn.Module, method: str, layer: str, lock: threading.Lock | None = None,
                 logits_fn: Callable[[np.ndarray], np.ndarray] | None = None,
                 scales: tuple[float, ...] | None = None) -> None:
        self.module = module
        self.method = get_method(method)
        if self.method.cam_class is None:
            raise ValueError(f"method {method!r} needs no hooks; call occlusion_map() instead")
        if scales is not None and not self.method.scales:
            raise ValueError(f"method {method!r} runs at one input size; scales={scales} is for a multi-scale method "
                             f"such as 'cameras'")
        self._scales = tuple(scales) if scales is not None else self.method.scales
        self.layer = layer
        self._lock = lock
        self._logits_fn = logits_fn
        self._cam = None
        self._saved: tuple[list[bool], list[bool]] | None = None
        self._held = False
        self._leaf_hook = None
        self._grad_from_input = any(isinstance(m, nn.TransformerEncoderLayer) for m in module.modules())

    def __enter__(self) -> CAM:
        if self._lock is not None:
            self._lock.acquire()
            self._held = True
        try:
            params = list(self.module.parameters())
            modes = [m.training for m in self.module.modules()]
            self._saved = ([p.requires_grad for p in params], modes if any(modes) else [])
            for p in params:
                p.requires_grad_(False)
            if any(modes):  # (walking every module costs milliseconds: only when something is in training mode)
                self.module.eval()
            target = self.module.get_submodule(self.layer)
            if self.method.uses_gradients and not self._grad_from_input:
                # Registered before the library's hooks, so they see (and take gradients of) this leaf.
                self._leaf_hook = target.register_forward_hook(_gradient_leaf)
            extra = {"scales": self._scales} if self.method.scales else {}
            self._cam = self.method.cam_class(self.module, [target], reshape_transform=tokens_to_grid, **extra)
            if self._logits_fn is not None and hasattr(self._cam, "logits_fn"):
                self._cam.logits_fn = self._logits_fn
        except BaseException:
            self._restore()
            raise
        return self

    def __call__(self, x: torch.Tensor, targets: list[int] | None = None) -> np.ndarray:
        """Maps ``(N, H, W)`` float32 in [0, 1] at the input's resolution, for class ``targets[i]`` of image ``i``
        (None: each image's highest-scoring class, from the same forward pass)."""
        if self._cam is None:
            raise RuntimeError("use CAM inside a `with` block: hooks are attached on entry and removed on exit")
        from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

        if targets is not None and len(targets) != x.shape[0]:
            raise ValueError(f"got {len(targets)} target classes for a batch of {x.shape[0]} images")
        # Parameters carry no gradient: in a CNN the target layer's output becomes the leaf that does (see the class
        # docstring); with Transformer layers the input carries it, which keeps the fused encoder fast path (it would
        # bypass the hooked norm) switched off.
        x = x.detach().clone().requires_grad_(self._grad_from_input or not self.method.uses_gradients)
        with torch.enable_grad():
            maps = self._cam(x, None if targets is None else [ClassifierOutputTarget(int(t)) for t in targets])
        return np.clip(np.nan_to_num(maps.astype(np.float32)), 0.0, 1.0)

    def __exit__(self, exc_type: object, exc: object, tb: object) -> bool:
        self._restore()
        return False  # never swallow the exception

    def _restore(self) -> None:
        try:
            if self._cam is not None:
                self._cam.activations_and_grads.release()
                self._cam = None
            if self._leaf_hook is not None:
                self._leaf_hook.remove()
                self._leaf_hook = None
            if self._saved is not None:
                flags, modes = self._saved
                for p, f in zip(self.module.parameters(), flags, strict=True):
                    p.requires_grad_(f)
                if modes:
                    for m, t in zip(self.module.modules(), modes, strict=True):
                        m.training = t
                self._saved = None
        finally:
            if self._held:
                self._held = False
                self._lock.release()


def _gradient_leaf(_: nn.Module, __: object, output: torch.Tensor) -> torch.Tensor:
    """Forward hook: the layer's output as a new leaf that requires grad (the backward pass ends here)."""
    return output.detach().requires_grad_(True)


def occlusion_map(score_fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, grid: int = 7,
                  batch_size: int = 64) -> np.ndarray:
    """Occlusion sensitivity: how much the explained class's score falls when one cell of a ``grid`` x ``grid``
    tiling is replaced by a blurred copy of itself.

    Blur rather than grey or black: a grey square is itself a strong, unnatural feature, and black is what the
    background of a segmented cell already is. Falls below zero count as zero; the ``grid`` x ``grid`` map is
    upsampled bilinearly to the input's size (like a CAM of a 7 x 7 layer) and scaled to [0, 1]. Cost: ``grid**2 + 1``
    forward passes.

    Args:
        score_fn: batch ``(B, 3, S, S)`` -> score of the explained class per image (e.g. its log-probability).
        x: one normalised image ``(1, 3, H, W)``.
    """
    _, _, h, w = x.shape
    ys = np.linspace(0, h, grid + 1).round().astype(int)
    xs = np.linspace(0, w, grid + 1).round().astype(int)
    sigma = max(h, w) / grid / 2
    k = int(2 * round(3 * sigma) + 1)
    blurred = torch.from_numpy(cv2.GaussianBlur(x[0].permute(1, 2, 0).numpy(), (k, k), sigma)).permute(2, 0, 1)
    cells = [(i, j) for i in range(grid) for j in range(grid)]
    drops = np.zeros((grid, grid), np.float64)
    with torch.no_grad():
        base = float(score_fn(x)[0])
        for b in range(0, len(cells), batch_size):
            chunk = cells[b:b + batch_size]
            batch = x.repeat(len(chunk), 1, 1, 1)
            for n, (i, j) in enumerate(chunk):
                sl = (slice(None), slice(ys[i], ys[i + 1]), slice(xs[j], xs[j + 1]))
                batch[(n, *sl)] = blurred[sl]
            for (i, j), s in zip(chunk, score_fn(batch).double().numpy(), strict=True):
                drops[i, j] = max(base - float(s), 0.0)
    heat = cv2.resize(drops.astype(np.float32), (w, h), interpolation=cv2.INTER_LINEAR)
    top = float(heat.max())
    return np.clip(heat / top, 0, 1).astype(np.float32) if top > 0 else np.zeros((h, w), np.float32)


def explain_tensor(module: nn.Module, x: torch.Tensor, target: int | None, method: str = "gradcam", layer: str = "",
                   lock: threading.Lock | None = None,
                   logits_fn: Callable[[np.ndarray], np.ndarray] | None = None) -> np.ndarray:
    """One normalised image ``(1, 3, S, S)`` -> map ``(S, S)`` float32 in [0, 1] for class ``target`` (None: the
    highest-scoring class).

    Args:
        layer: the layer a CAM method explains (ignored by occlusion).
        lock: held while the network runs with hooks (see :class:`CAM`).
        logits_fn: optional faster forward pass for the gradient-free methods (see :class:`CAM`); must not take
            ``lock``.
    """
    m = get_method(method)
    if m.cam_class is not None:
        with CAM(module, method, layer, lock=lock, logits_fn=logits_fn) as cam:
            return cam(x, None if target is None else [target])[0]
    if logits_fn is not None:
        def score(b: torch.Tensor) -> torch.Tensor:
            z = torch.from_numpy(np.asarray(logits_fn(b.numpy().astype(np.float32)))).float()
            return torch.log_softmax(z, dim=1)[:, k]

        k = target if target is not None else int(np.argmax(logits_fn(x.numpy().astype(np.float32))[0]))
        return occlusion_map(score, x)

    def score_torch(b: torch.Tensor) -> torch.Tensor:
        return torch.log_softmax(module(b).float(), dim=1)[:, k]

    with lock if lock is not None else nullcontext():
        was = [mm.training for mm in module.modules()]
        module.eval()
        try:
            with torch.no_grad():
                k = target if target is not None else int(module(x)[0].argmax())
            return occlusion_map(score_torch, x)
        finally:
            for mm, t in zip(module.modules(), was, strict=True):
                mm.training = t
