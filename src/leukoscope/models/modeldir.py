"""The model directory: the one hand-off between training and everything after it.

    model.safetensors   weights
    model.json          architecture, classes, preprocessing, temperature, Grad-CAM target layer, weights hash
    config.yaml         the resolved training config
    metrics.json        what it reached on held-out groups
    MODEL_CARD.md       data seen, split, metrics with CIs, intended use, limits
    model.onnx          optional (``leukoscope export --onnx``): used automatically for fast inference
    model.int8.onnx     optional (``leukoscope export --int8``): the int8 network, used with ``backend="int8"``
    model.int8.json     its calibration and its agreement with the float32 network on held-out images

Predict, evaluate, explain, the API and the web page all load a model through :func:`load_model`.
"""

from __future__ import annotations

import hashlib
import json
import logging
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from leukoscope._registry import Registry, unknown_name_message
from leukoscope.preprocess.transforms import Preprocess

if TYPE_CHECKING:  # PyTorch is imported where a network is built or run: the ONNX Runtime path never needs it
    import torch
    from torch import nn

log = logging.getLogger(__name__)

SHIPPED_DIR = Path(__file__).resolve().parent.parent / "weights"
DEFAULT_MODEL = "leukemia-cell"

MODELS: Registry = Registry("model")
BACKENDS = ["auto", "onnx", "int8", "torch"]
INT8_FILE, INT8_REPORT = "model.int8.onnx", "model.int8.json"


@MODELS.register("cnn")
def _cnn(backbone: nn.Module, num_classes: int, spec: dict) -> nn.Module:
    from leukoscope.models.net import CellClassifier

    return CellClassifier(backbone, num_classes, spec.get("dropout", 0.3), spec.get("trainable_stages", 1),
                          spec.get("subclass_groups"))


@MODELS.register("hybrid")
def _hybrid(backbone: nn.Module, num_classes: int, spec: dict) -> nn.Module:
    from leukoscope.models.net import HybridCNNTransformer

    if spec.get("subclass_groups"):
        raise ValueError("subclasses are implemented for model 'cnn' only, not 'hybrid'")
    grid = spec.get("input_size", 224) // 32
    return HybridCNNTransformer(backbone, num_classes, grid, dim=spec.get("dim", 192), depth=spec.get("depth", 2),
                                heads=spec.get("heads", 4), dropout=spec.get("dropout", 0.1),
                                cnn_stages_frozen_until=spec.get("trainable_stages", 1))


def build_network(spec: dict, num_classes: int, pretrained: str | bool = "auto") -> tuple[nn.Module, str]:
    """Build the network described by ``spec`` (keys ``model``, ``backbone``, ``dropout``, ...)."""
    from leukoscope.models.backbones import create_backbone

    factory = MODELS.get(spec.get("model", "cnn"))
    backbone, source = create_backbone(spec.get("backbone", "efficientnet_lite0"), pretrained)
    return factory(backbone, num_classes, spec), source


def shipped_models() -> list[str]:
    if not SHIPPED_DIR.is_dir():
        return []
    return sorted(p.name for p in SHIPPED_DIR.iterdir() if (p / "model.json").exists() and any(
        (p / w).exists() for w in ("model.safetensors", "detector.safetensors")))


def resolve_model_dir(name_or_dir: str | Path | None, default: str = DEFAULT_MODEL, kind: str = "model",
                      available: list[str] | None = None) -> Path:
    """A model directory from a path or a shipped model's name (default ``leukemia-cell``)."""
    name_or_dir = name_or_dir or default
    path = Path(name_or_dir).expanduser()
    if path.is_dir():
        if not (path / "model.json").exists():
            raise FileNotFoundError(f"{path} is not a model directory (no model.json)")
        return path
    if (SHIPPED_DIR / str(name_or_dir) / "model.json").exists():
        return SHIPPED_DIR / str(name_or_dir)
    names = shipped_models() if available is None else available
    raise ValueError(unknown_name_message(kind, str(name_or_dir), names) +
                     " (or pass the path of a model directory)")


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


WEIGHT_DTYPES = ("float32", "float16")


def _torch_dtype(dtype: str) -> torch.dtype:
    import torch

    if dtype not in WEIGHT_DTYPES:
        raise ValueError(f"Unknown weights dtype {dtype!r}. Available: {list(WEIGHT_DTYPES)}")
    return getattr(torch, dtype)


def round_weights(module: nn.Module, dtype: str) -> None:
    """Round ``module``'s floating weights and buffers to ``dtype`` in place (they stay float32 tensors), so that what
    is measured before saving is what :func:`save_model_dir` writes with that dtype and :func:`load_model` reads."""
    import torch

    want = _torch_dtype(dtype)
    with torch.no_grad():
        for t in module.state_dict().values():
            if t.is_floating_point():
                t.copy_(t.to(want).float())


def save_model_dir(out: Path, module: nn.Module, info: dict[str, Any], dtype: str = "float32") -> dict[str, Any]:
    """Write weights (floating tensors as ``dtype``: float16 halves the file; :func:`load_model` reads either) and
    ``model.json``; ``info`` holds spec, classes, preprocess, temperature, ...

    Returns ``info`` with the weights' SHA-256 and the parameter count added, as written."""
    from safetensors.torch import save_file

    out.mkdir(parents=True, exist_ok=True)
    want = _torch_dtype(dtype)
    state = {k: (v.to(want) if v.is_floating_point() else v).detach().contiguous().clone()
             for k, v in module.state_dict().items()}
    save_file(state, str(out / "model.safetensors"))
    info = {"kind": "image", **info}
    info["weights_sha256"] = file_sha256(out / "model.safetensors")
    info["weights_dtype"] = dtype
    info["n_parameters"] = int(sum(p.numel() for p in module.parameters()))
    (out / "model.json").write_text(json.dumps(info, indent=1))
    return info


_UNSET = object()


def logits_and_embeddings(net: nn.Module) -> nn.Module:
    """``net`` with two outputs: its logits and its embeddings (the pooled features its last linear layer reads),
    from one pass."""
    import torch

    class _Both(torch.nn.Module):
        def __init__(self, net: nn.Module) -> None:
            super().__init__()
            self.net = net

        def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            f = self.net.top(self.net.stem(x)).flatten(1)
            z = self.net.head(f)
            coarse = getattr(self.net, "coarse", None)
            return (coarse(z) if coarse is not None else z), f

    return _Both(net)


@dataclass
class LoadedModel:
    """A trained classifier ready for inference: calibrated probabilities from RGB images.

    Thread-safe for concurrent ``predict_*`` calls (torch inference under a lock; ONNX Runtime sessions are
    thread-safe on their own).
    """

    name: str
    path: Path
    _module: nn.Module | None  # None: built from ``_build`` on first use (see :attr:`module`)
    classes: list[str]
    preprocess: Preprocess
    temperature: float
    info: dict
    backend: str = "torch"
    precision: str = "fp32"
    tta: bool = False  # average the logits over the 4 flips of each image (see :meth:`logits`)
    _session: Any = None
    _session_path: Path | None = None  # the network's ONNX file, opened on first use (see :meth:`_main_session`)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)
    _part_sessions: dict = field(default_factory=dict, repr=False)
    _session_threads: int = 0
    _parts_lock: threading.Lock = field(default_factory=threading.Lock, repr=False)
    _ood: Any = field(default=None, repr=False)
    _quality: Any = field(default=None, repr=False)
    _build: Any = field(default=None, repr=False)  # () -> nn.Module: the network from the directory's weights
    _build_lock: threading.Lock = field(default_factory=threading.Lock, repr=False)
    # an ensemble's other members (model.json "members"): the logits are the mean of this network's and theirs;
    # embeddings (the out-of-distribution score's input) and heatmaps come from this network, the first member
    members: list = field(default_factory=list, repr=False)

    def __post_init__(self) -> None:
        self._ood = self._quality = _UNSET
        if self._module is None and self._build is None:
            raise ValueError("a LoadedModel needs its network or a way to build it")

    @property
    def module(self) -> nn.Module:
        """The PyTorch network, built from the weights on first use: predictions on ONNX Runtime never need it
        (nor PyTorch); Grad-CAM, the PyTorch backend and a first ONNX export do."""
        if self._module is None:
            import torch

            # first use may come inside torch.inference_mode(): its tensors could never take gradients (Grad-CAM)
            with self._build_lock, torch.inference_mode(False):
                if self._module is None:
                    self._module = self._build()
        return self._module

    @property
    def input_size(self) -> int:
        return self.preprocess.size

    @property
    def engine(self) -> str:
        """What computes the predictions: ``torch``, ``onnx`` or ``onnx-int8``, ``+tta`` with test-time flips (for
        reports and audit logs)."""
        return ((f"{self.backend}-int8" if self.precision == "int8" else self.backend) + ("+tta" if self.tta else "")
                + (f" x{1 + len(self.members)} members" if self.members else ""))

    @property
    def target_layer(self) -> str:
        return self.info.get("target_layer", "")

    def set_onnx_threads(self, threads: int) -> None:
        """Re-open the ONNX Runtime session with ``threads`` (see :func:`onnx_session`; a server wants 1: its
        parallelism comes from the requests); no-op on PyTorch or for 0 (the session stays as it is)."""
        if threads > 0 and self.backend == "onnx":
            self._session_threads = threads
            with self._parts_lock:
                if self._session_path is not None:
                    self._session = None  # opened again, with these threads, on first use
                self._part_sessions.clear()
        for m in self.members:
            m.set_onnx_threads(threads)

    def onnx_part(self, name: str, part: nn.Module, x: np.ndarray) -> np.ndarray | None:
        """``part(x)`` through ONNX Runtime for a prepared batch: ``part`` is a piece of this model's network (input
        the network's input), exported once to the cache as ``<weights>.<name>.onnx``. None on the PyTorch backend or
        when the export fails. Explanations use it: only the part above it needs PyTorch."""
        out = self.onnx_outputs(name, lambda: part, x)
        return None if out is None else out[0]

    def onnx_outputs(self, name: str, make_part: Any, x: np.ndarray,
                     outputs: tuple[str, ...] = ("logits",)) -> list[np.ndarray] | None:
        """Like :meth:`onnx_part` with every output of the part; ``make_part()`` builds the part only when its ONNX
        file has to be exported."""
        if self.backend != "onnx":
            return None
        with self._parts_lock:
            if name not in self._part_sessions:
                path = onnx_path_for(self).with_suffix(f".{name}.onnx")
                if not path.exists():
                    from leukoscope.models.export import export_onnx

                    try:
                        export_onnx(make_part(), self.input_size, path, outputs=outputs)
                    except Exception as exc:  # read-only cache, ...: fall back to PyTorch
                        log.warning("export of %s to ONNX failed (%s); running it in PyTorch", name, exc)
                        self._part_sessions[name] = None
                        return None
                self._part_sessions[name] = onnx_session(path, threads=1 if self._session_threads else 0)
            session = self._part_sessions[name]
        return None if session is None else session.run(None, {"input": x})

    def prepare_batch(self, images: list[np.ndarray]) -> np.ndarray:
        return np.stack([self.preprocess(im) for im in images]).astype(np.float32)

    def logits(self, x: np.ndarray) -> np.ndarray:
        """Raw logits for a prepared float32 batch (N, 3, S, S). With ``tta`` the mean of the logits of each image
        as it is, flipped left-right, upside-down and both (a cell has no orientation): four times the work, the
        same answer for an image and its flips."""
        if not self.tta:
            return self._logits(x)
        # one view at a time: the batch stays the caller's size (one batch of 4N took ~1 GB more at N = 32)
        return np.mean([self._logits(np.ascontiguousarray(v)) for v in
                        (x, x[..., ::-1], x[..., ::-1, :], x[..., ::-1, ::-1])], axis=0)

    def logits_and_features(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(logits (N, C), embeddings (N, D)) of a prepared batch in one pass: the embeddings are the pooled features
        the last linear layer reads (the out-of-distribution score's input); with ``tta`` both are means over the 4
        flips. On ONNX Runtime both come from one exported graph (no PyTorch); the int8 backend takes its logits from
        the int8 network (a second pass)."""
        views = [x] if not self.tta else [x, x[..., ::-1], x[..., ::-1, :], x[..., ::-1, ::-1]]
        zs, fs = [], []
        for v in views:
            v = np.ascontiguousarray(v)
            out = self.onnx_outputs("logits_embed", lambda: logits_and_embeddings(self.module), v,
                                    outputs=("logits", "embeddings"))
            if out is None:
                import torch

                with self._lock, torch.inference_mode():
                    out = [t.float().numpy() for t in logits_and_embeddings(self.module)(torch.from_numpy(v))]
            z, f = out
            zs.append(self._with_members(z if self.precision != "int8" else self._own_logits(v), v))
            fs.append(f)
        return np.mean(zs, axis=0), np.mean(fs, axis=0)

    @property
    def ood(self) -> Any:
        """The out-of-distribution detector stored with the model (:mod:`leukoscope.models.ood`), or None."""
        if self._ood is _UNSET:
            from leukoscope.models.ood import load_detector

            self._ood = load_detector(self.path, self.info.get("weights_sha256"))
        return self._ood

    @property
    def quality(self) -> Any:
        """The image-quality reference stored with the model (``quality.json``,
        :class:`leukoscope.preprocess.quality.QualityReference`), or None."""
        if self._quality is _UNSET:
            from leukoscope.preprocess.quality import QUALITY_FILE, QualityReference

            path = self.path / QUALITY_FILE
            self._quality = QualityReference.load(path) if path.exists() else None
        return self._quality

    def proba_and_ood(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        """(calibrated probabilities (N, C), out-of-distribution scores (N,) or None when the model has no detector)
        of a prepared batch; a score above ``self.ood.threshold`` flags the image."""
        det = self.ood
        if det is None:
            return softmax(self.logits(x) / self.temperature), None
        z, f = self.logits_and_features(x) if det.needs_features else (self.logits(x), None)
        return softmax(z / self.temperature), det.score(f, z)

    def _main_session(self) -> Any:
        """The ONNX Runtime session of the whole network, opened on first use: a model whose answers come with
        embeddings (:meth:`logits_and_features`) never needs it."""
        if self._session is None and self._session_path is not None:
            with self._parts_lock:
                if self._session is None:
                    self._session = onnx_session(self._session_path, self._session_threads)
        return self._session

    def _logits(self, x: np.ndarray) -> np.ndarray:
        return self._with_members(self._own_logits(x), x)

    def _with_members(self, z: np.ndarray, x: np.ndarray) -> np.ndarray:
        """``z`` (this network's logits of ``x``), or for an ensemble the mean with its other members' logits."""
        return z if not self.members else np.mean([z] + [m._own_logits(x) for m in self.members], axis=0)

    def _own_logits(self, x: np.ndarray) -> np.ndarray:
        session = self._main_session()
        if session is not None:
            return session.run(None, {"input": x})[0]
        import torch

        with self._lock, torch.inference_mode():
            return self.module(torch.from_numpy(x)).float().numpy()

    @property
    def threshold(self) -> float | None:
        """The operating threshold on P(second class) chosen on validation and stored with a two-class model
        (``model.json`` ``threshold``); None: the most probable class is the answer."""
        t = self.info.get("threshold")
        return float(t) if t is not None and len(self.classes) == 2 else None

    def decide(self, proba: np.ndarray) -> int:
        """The answered class of one image's calibrated probabilities: the second class of a two-class model when its
        probability reaches the stored operating threshold, else the most probable class."""
        t = self.threshold
        return int(proba[1] >= t) if t is not None else int(np.argmax(proba))

    def predict_arrays(self, images: list[np.ndarray], batch_size: int = 32) -> np.ndarray:
        """Calibrated class probabilities, shape (N, C), for RGB uint8 images."""
        out = []
        for i in range(0, len(images), batch_size):
            z = self.logits(self.prepare_batch(images[i:i + batch_size]))
            out.append(softmax(z / self.temperature))
        return np.concatenate(out) if out else np.zeros((0, len(self.classes)), np.float32)

    def predict_arrays_ood(self, images: list[np.ndarray], batch_size: int = 32) -> tuple[np.ndarray,
                                                                                         np.ndarray | None]:
        """(calibrated probabilities (N, C), out-of-distribution scores (N,) or None) for RGB uint8 images."""
        probs, scores = [], []
        for i in range(0, len(images), batch_size):
            p, s = self.proba_and_ood(self.prepare_batch(images[i:i + batch_size]))
            probs.append(p)
            scores.append(s)
        if not probs:
            return np.zeros((0, len(self.classes)), np.float32), None if self.ood is None else np.zeros(0)
        return np.concatenate(probs), None if scores[0] is None else np.concatenate(scores)

    def predict_paths(self, paths: list[str | Path], batch_size: int = 32) -> tuple[list[Path], np.ndarray,
                                                                                     list[tuple[str, str]]]:
        """(readable paths, probabilities, [(unreadable path, reason)])."""
        from leukoscope.data.images import batched, read_readable

        ok: list[Path] = []
        probs: list[np.ndarray] = []
        failed: list[tuple[str, str]] = []
        for batch in batched(read_readable(paths, failed), batch_size):
            ok.extend(Path(p) for p, _ in batch)
            probs.append(self.predict_arrays([rgb for _, rgb in batch], batch_size))
        arr = np.concatenate(probs) if probs else np.zeros((0, len(self.classes)), np.float32)
        return ok, arr, failed


def softmax(z: np.ndarray) -> np.ndarray:
    z = z - z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return (e / e.sum(axis=1, keepdims=True)).astype(np.float32)


def onnx_path_for(model: LoadedModel) -> Path:
    """``model.onnx`` in the model directory when present, else a per-weights file in the user cache (exported once)."""
    local = model.path / "model.onnx"
    if local.exists():
        return local
    from leukoscope.cache import cache_root

    return cache_root() / "onnx" / f"{model.info.get('weights_sha256', 'unknown')[:16]}.onnx"


def onnx_session(path: str | Path, threads: int = 0) -> Any:
    """An ONNX Runtime CPU session of ``path``.

    Args:
        threads: 0 keeps ONNX Runtime's default (a thread per core, spin-waiting between operators: the fastest for
            one caller with big batches, e.g. ``leukoscope predict``); ``n > 0`` gives ``n`` intra-op threads that do
            not spin-wait, for a server whose parallelism comes from concurrent requests (spinning threads of
            several requests burn the cores the others need; ``benchmarks/serve_load.py`` measures it).
    """
    import onnxruntime as ort

    if threads < 0:
        raise ValueError(f"threads must be 0 (ONNX Runtime's default) or more, got {threads}")
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    if threads > 0:
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def _attach_onnx(model: LoadedModel, required: bool, threads: int = 0) -> None:
    try:
        import onnxruntime  # noqa: F401  (installed?)
    except ImportError:
        if required:
            from leukoscope.errors import MissingExtraError

            raise MissingExtraError("the ONNX backend needs onnxruntime: pip install 'leukoscope[onnx]'") from None
        return
    path = onnx_path_for(model)
    if not path.exists():
        from leukoscope.models.export import export_onnx

        log.info("exporting %s to ONNX once (%s)", model.name, path)
        try:
            export_onnx(model.module, model.input_size, path)
        except Exception as exc:  # no onnx package, read-only cache, ...: PyTorch still works
            if required:
                raise
            log.warning("ONNX export failed (%s); using PyTorch", exc)
            return
    model._session_path = path
    model._session_threads = threads
    model.backend = "onnx"


def _attach_int8(model: LoadedModel, threads: int = 0) -> None:
    path = model.path / INT8_FILE
    if not path.exists():
        raise FileNotFoundError(f"model {model.name!r} has no int8 network ({path}); make it with "
                                f"`leukoscope export --model {model.path} --int8`")
    report = path.with_name(INT8_REPORT)
    if report.exists():
        check = json.loads(report.read_text())
        made_for = check.get("weights_sha256")
        if made_for and made_for != model.info.get("weights_sha256"):
            raise ValueError(f"{path} was made from other weights ({made_for[:16]}) than {model.name!r} "
                             f"({str(model.info.get('weights_sha256'))[:16]}); export it again")
        if check.get("temperature"):  # fitted for the int8 network on the validation images
            model.temperature = float(check["temperature"])
    try:
        import onnxruntime  # noqa: F401  (installed?)
    except ImportError:
        from leukoscope.errors import MissingExtraError

        raise MissingExtraError("the int8 backend needs onnxruntime: pip install 'leukoscope[onnx]'") from None
    model._session_path = path
    model._session_threads = threads
    model.backend, model.precision = "onnx", "int8"  # explanations still cut the float32 network (onnx_part)


# ------------------------------------------------------------------------------------------ one door for every kind
if TYPE_CHECKING:
    from leukoscope.diagnose.model import PatientModel
    from leukoscope.flow.model import FlowModel
    from leukoscope.preprocess.wbc_detector import WBCDetector
    from leukoscope.research.classical import ClassicalModel

# What each kind of model directory holds, what load_model returns for it, and how that object is used.
MODEL_KINDS: dict[str, dict[str, str]] = {
    "image": {"returns": "LoadedModel", "input": "one cell image (RGB)",
              "use": "leukoscope.predict(image, model) or leukoscope.explain(image, model=model)"},
    "patient": {"returns": "PatientModel", "input": "a folder (or manifest CSV) of one patient's cell images",
                "use": "leukoscope.diagnose.diagnose([patient_folder], model=model)"},
    "flow": {"returns": "FlowModel", "input": "one flow cytometry FCS file per subject",
             "use": "leukoscope.flow.model.predict_files(model, [fcs_path])"},
    "classical": {"returns": "ClassicalModel", "input": "one cell image, as its hand-crafted features",
                  "use": "model.predict_proba(leukoscope.research.classical.extract_features(rgb)[None])"},
    "detector": {"returns": "WBCDetector", "input": "a whole smear field (RGB, any magnification)",
                 "use": "model.detect(rgb).cells (leukoscope scan uses it to find the white cells)"},
}
LOADERS: Registry = Registry("model kind")


def model_kind(path: str | Path) -> str:
    """The kind of model a directory holds: ``model.json``'s ``kind``. Directories written before that key existed
    are told apart by what they hold (``spec``: image; the patient format; a flow classifier; ``classical.json``)."""
    path = Path(path)
    info_path = path / "model.json"
    if not info_path.exists():
        if (path / "classical.json").exists():  # ClassicalModel.save writes no model.json
            return "classical"
        raise FileNotFoundError(f"{path} is not a model directory (no model.json)")
    info = json.loads(info_path.read_text())
    kind = info.get("kind")
    if kind is None:
        if "spec" in info:
            kind = "image"
        elif str(info.get("format", "")).startswith("leukoscope-patient-model/"):  # diagnose.model.FORMAT
            kind = "patient"
        elif "format_version" in info and "classifier" in info and "feature_names" in info:
            kind = "flow"
        elif "work_rbc_px" in info and "threshold" in info:
            kind = "detector"
        else:
            raise ValueError(f"{info_path} does not say what kind of model it holds: add \"kind\" (one of "
                             f"{LOADERS.names()})")
    if kind not in LOADERS:
        raise ValueError(f"{info_path}: " + unknown_name_message("model kind", str(kind), LOADERS.names()))
    return kind


@LOADERS.register("image")
def _load_image_model(path: Path, backend: str = "auto", onnx_threads: int = 0, tta: bool = False) -> LoadedModel:
    info = json.loads((path / "model.json").read_text())
    if not (path / "model.safetensors").exists():
        raise FileNotFoundError(f"{path} has no model.safetensors")

    def build() -> nn.Module:
        from safetensors.torch import load_file

        module, _ = build_network(info["spec"], len(info["classes"]), pretrained="none")
        state = load_file(str(path / "model.safetensors"))
        module.load_state_dict({k: v.float() if v.is_floating_point() else v for k, v in state.items()})
        return module.eval()

    model = LoadedModel(info.get("name", path.name), path, None, list(info["classes"]),
                        Preprocess.from_dict(info["preprocess"]), float(info.get("temperature", 1.0)), info,
                        tta=tta, _build=build)
    if backend in ("auto", "onnx"):
        _attach_onnx(model, required=backend == "onnx", threads=onnx_threads)
    elif backend == "int8":
        _attach_int8(model, threads=onnx_threads)
    elif backend != "torch":
        raise ValueError(f"Unknown backend {backend!r}. Available: {BACKENDS}")
    for rel in info.get("members", []):  # an ensemble (leukoscope.train.ensemble): each member on the same backend
        member = _load_image_model(path / rel, backend=model.backend if model.precision != "int8" else "int8",
                                   onnx_threads=onnx_threads)
        if member.classes != model.classes or member.preprocess.to_dict() != model.preprocess.to_dict():
            raise ValueError(f"ensemble member {path / rel} has other classes or preprocessing than {path}")
        model.members.append(member)
    return model


@LOADERS.register("patient")
def _load_patient_model(path: Path) -> Any:
    from leukoscope.diagnose.model import load_patient_model

    return load_patient_model(path)


@LOADERS.register("flow")
def _load_flow_model(path: Path) -> Any:
    from leukoscope.flow.model import load_flow_model

    return load_flow_model(path)


# The classical baselines (Random Forest / SVM on handcrafted features) are a research tool: training, tuning and
# their features live together in leukoscope.research.classical. A directory one of them saved is still a model
# directory, so it loads through this one door; the research module is imported here, only when such a directory is
# loaded, so that the product core never imports research code otherwise (tests/test_layers.py).
@LOADERS.register("classical")
def _load_classical_model(path: Path, allow_pickle: bool = False) -> Any:
    from leukoscope.research.classical import ClassicalModel

    return ClassicalModel.load(path, allow_pickle=allow_pickle)


@LOADERS.register("detector")
def _load_detector(path: Path, backend: str = "auto") -> Any:
    from leukoscope.preprocess.wbc_detector import load_detector

    return load_detector(path, backend=backend)


def _loaded_kind(obj: object) -> str | None:
    """The kind of an object load_model returned (by class name: no import of the other kinds' modules)."""
    names = {c.__name__ for c in type(obj).__mro__}
    return next((k for k, v in MODEL_KINDS.items() if v["returns"] in names), None)


def load_model(name_or_dir: str | Path | None = None, backend: str = "auto", onnx_threads: int = 0,
               tta: bool = False, *, kind: str | None = None, allow_pickle: bool = False
               ) -> LoadedModel | PatientModel | FlowModel | ClassicalModel | WBCDetector:
    """Load a model directory or a shipped model by name (default ``leukemia-cell``), whatever its kind.

    The directory's ``model.json`` says its ``kind`` (see :func:`model_kind`), and the kind says what comes back:

    - ``image`` (``leukemia-cell``, ``all-subtype``, ``cell-type``): a :class:`LoadedModel`, one cell image in,
      calibrated class probabilities out: ``leukoscope.predict(image, model)``, ``leukoscope.explain(image,
      model=model)``, ``model.predict_arrays([rgb])``.
    - ``patient`` (``apl``): a :class:`leukoscope.diagnose.PatientModel`, AML vs APL from a set of one patient's
      cells: ``leukoscope.diagnose.diagnose([patient_folder], model=model)``, or
      ``leukoscope.diagnose.Diagnoser(model).diagnose_images(name, rgb_cells)``.
    - ``flow`` (``flow-aml``): a :class:`leukoscope.flow.model.FlowModel`, normal vs AML from a flow cytometry FCS
      file: ``leukoscope.flow.model.predict_files(model, [fcs_path])``.
    - ``classical`` (a directory written by ``ClassicalModel.save``): a
      :class:`leukoscope.research.classical.ClassicalModel`, class probabilities from hand-crafted features of cell
      images: ``model.predict_proba(extract_features(rgb)[None])``.
    - ``detector`` (``wbc-detector``): a :class:`leukoscope.preprocess.wbc_detector.WBCDetector`, the white cells of
      a whole smear field: ``model.detect(rgb).cells`` (``leukoscope scan`` uses it).

    Args:
        backend: image models only. ``auto`` (ONNX Runtime when onnxruntime is installed, else PyTorch), ``torch``,
            ``onnx`` or ``int8`` (ONNX Runtime on the directory's ``model.int8.onnx``, see
            :mod:`leukoscope.quantize`; about twice as fast on CPUs with int8 instructions, predictions checked
            in ``model.int8.json``).
        onnx_threads: image models only: threads of the ONNX Runtime session (see :func:`onnx_session`; 0: its
            default).
        tta: image models only: predict from the mean logits of each image's 4 flips (:meth:`LoadedModel.logits`;
            ``benchmarks/predict_speed.py --tta`` times it; the model card's numbers are without it).
        kind: the kind the caller can use (e.g. ``"image"``); a model of another kind is a ValueError that says what
            it is and how it is used. None accepts every kind.
        allow_pickle: classical models only: their estimator is a pickle, which runs code when loaded; pass True only
            for a model you trained yourself.

    Raises:
        ValueError: an unknown model name or kind (with the closest match and the available ones), an option that
            does not apply to the model's kind, or a model of another kind than ``kind``.
        TypeError: ``name_or_dir`` is a model that is already loaded.
    """
    if name_or_dir is not None and not isinstance(name_or_dir, (str, Path)):
        got, what = _loaded_kind(name_or_dir), type(name_or_dir).__name__
        if got is None:
            raise TypeError(f"load_model takes a model's name or directory, got {what}")
        name = getattr(name_or_dir, "name", "")
        raise TypeError(f"load_model takes a model's name or directory, got {what} {name!r}, a {got} model already "
                        f"loaded. A {got} model takes {MODEL_KINDS[got]['input']}: {MODEL_KINDS[got]['use']}")
    if kind is not None and kind not in LOADERS:
        raise ValueError(unknown_name_message("model kind", kind, LOADERS.names()))
    given = Path(str(name_or_dir)).expanduser() if name_or_dir is not None else None
    if given is not None and given.is_dir() and not (given / "model.json").exists() and \
            (given / "classical.json").exists():
        path = given
    else:
        path = resolve_model_dir(name_or_dir)
    found = model_kind(path)
    if kind is not None and found != kind:
        raise ValueError(f"{path.name!r} is a {found} model, not {'an' if kind[0] in 'aeiou' else 'a'} {kind} "
                         f"model: it takes {MODEL_KINDS[found]['input']} ({MODEL_KINDS[found]['use']})")
    loader = LOADERS.get(found)
    if found == "image":
        return loader(path, backend=backend, onnx_threads=onnx_threads, tta=tta)
    image_only = [f"{k}={v!r}" for k, v, default in (("backend", backend, "auto"), ("onnx_threads", onnx_threads, 0),
                                                     ("tta", tta, False)) if v != default]
    if image_only:
        raise ValueError(f"{', '.join(image_only)}: for image models only; {path.name!r} is a {found} model")
    return loader(path, allow_pickle=allow_pickle) if found == "classical" else loader(path)
