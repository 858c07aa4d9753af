"""Out-of-distribution scores: how unlike the model's training images an image is.

A second reader must be able to say "I don't know this". Every image model can carry an ``ood.npz`` in its
directory: a detector fitted on the network's embeddings (the pooled features before the last linear layer) of its
training images, with a threshold that keeps ``keep`` (95 %) of its validation images. A prediction whose score is
above the threshold still gives its class, with ``ood = True``: the class is not to be trusted.

Methods (chosen by measurement: ``benchmarks/ood_shifts.py``, results in ``benchmarks/results/ood_shifts.json``):

- ``mahalanobis``: the smallest Mahalanobis distance to a class mean under one shared covariance (Lee et al. 2018),
  shrunk towards a multiple of the identity (Ledoit-Wolf) because there are fewer images than dimensions;
- ``knn``: the distance of the L2-normalised embedding to its k-th nearest training embedding (Sun et al. 2022);
- ``energy``: ``-T log sum exp(z / T)`` of the logits (Liu et al. 2020): needs nothing stored;
- ``msp``: one minus the largest softmax probability (Hendrycks and Gimpel 2017), the baseline.

Higher scores are more unusual for every method.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

log = logging.getLogger(__name__)

OOD_FILE = "ood.npz"
BASE_METHODS = ("mahalanobis", "knn", "energy", "msp")
# "a+b": an image is flagged when either score is unusual: each score divided by its own validation quantile at
# ``keep``, the larger of the two taken (a distance in embedding space and the classifier's own uncertainty)
OOD_METHODS = (*BASE_METHODS, "mahalanobis+msp", "knn+msp")
DEFAULT_METHOD = "knn"  # benchmarks/results/ood_shifts.json: best mean AUROC over the shifts
KEEP = 0.95


def _logsumexp(z: np.ndarray) -> np.ndarray:
    m = z.max(axis=1, keepdims=True)
    return (m + np.log(np.exp(z - m).sum(axis=1, keepdims=True)))[:, 0]


def _normalise(f: np.ndarray) -> np.ndarray:
    return f / np.maximum(np.linalg.norm(f, axis=1, keepdims=True), 1e-12)


@dataclass
class OODDetector:
    """A fitted out-of-distribution score and its threshold.

    Attributes:
        method: one of :data:`OOD_METHODS`.
        threshold: scores above it are flagged (set so that ``keep`` of the validation images are not).
        arrays: what the method needs (``means`` and ``precision`` for mahalanobis, ``bank`` for knn).
        meta: how it was fitted (counts, the weights it belongs to, the validation share kept, ...).
    """

    method: str
    threshold: float
    arrays: dict[str, np.ndarray] = field(default_factory=dict)
    meta: dict[str, Any] = field(default_factory=dict)
    temperature: float = 1.0

    @property
    def needs_features(self) -> bool:
        return any(m in ("mahalanobis", "knn") for m in self.method.split("+"))

    def score(self, features: np.ndarray | None, logits: np.ndarray) -> np.ndarray:
        """Scores (N,) of a batch: its embeddings (N, D) and its raw logits (N, C)."""
        if "+" in self.method:
            parts = self.method.split("+")
            scales = self.meta["scales"]
            return np.max([self._score(m, features, logits) / max(sc, 1e-9) for m, sc in zip(parts, scales)], axis=0)
        return self._score(self.method, features, logits)

    def _score(self, method: str, features: np.ndarray | None, logits: np.ndarray) -> np.ndarray:
        if method == "energy":
            return -self.temperature * _logsumexp(np.asarray(logits, np.float64) / self.temperature)
        if method == "msp":
            z = np.asarray(logits, np.float64) / self.temperature
            return 1.0 - np.exp(z.max(axis=1) - _logsumexp(z))
        if features is None:
            raise ValueError(f"the {method} score needs the network's embeddings")
        f = np.asarray(features, np.float64)
        if method == "mahalanobis":
            means = self.arrays["means"].astype(np.float64)
            prec = self.arrays["precision"].astype(np.float64)
            d = np.stack([np.einsum("nd,de,ne->n", f - mu, prec, f - mu) for mu in means], 1)
            return np.sqrt(np.maximum(d.min(axis=1), 0.0))
        if method == "knn":
            bank = self.arrays["bank"].astype(np.float64)
            k = int(self.meta.get("k", 10))
            sims = _normalise(f) @ bank.T
            kth = -np.partition(-sims, k - 1, axis=1)[:, k - 1]
            return np.sqrt(np.maximum(2.0 - 2.0 * kth, 0.0))
        raise ValueError(f"Unknown OOD method {method!r}. Available: {list(OOD_METHODS)}")

    def flag(self, scores: np.ndarray) -> np.ndarray:
        return np.asarray(scores) > self.threshold

    def save(self, path: str | Path) -> None:
        meta = {"method": self.method, "threshold": self.threshold, "temperature": self.temperature, **self.meta}
        arrays = {k: v.astype(np.float16) if v.dtype.kind == "f" else v for k, v in self.arrays.items()}
        np.savez_compressed(path, meta=np.array(json.dumps(meta)), **arrays)

    @classmethod
    def load(cls, path: str | Path) -> OODDetector:
        with np.load(path, allow_pickle=False) as z:
            meta = json.loads(str(z["meta"]))
            arrays = {k: z[k].astype(np.float32) for k in z.files if k != "meta"}
        method, threshold, temperature = meta.pop("method"), float(meta.pop("threshold")), meta.pop("temperature", 1.0)
        return cls(method, threshold, arrays, meta, float(temperature))


def fit_arrays(method: str, features: np.ndarray, labels: np.ndarray, k: int = 10,
               max_bank: int = 3000, seed: int = 0) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """What ``method`` stores, fitted on training embeddings (N, D) with their class indices (N,)."""
    if "+" in method:
        arrays, meta = {}, {}
        for m in method.split("+"):
            a, e = fit_arrays(m, features, labels, k, max_bank, seed)
            arrays |= a
            meta |= e
        return arrays, meta
    if method in ("energy", "msp"):
        return {}, {}
    f = np.asarray(features, np.float64)
    if method == "mahalanobis":
        from sklearn.covariance import LedoitWolf

        classes = np.unique(labels)
        means = np.stack([f[labels == c].mean(0) for c in classes])
        centred = f - means[np.searchsorted(classes, labels)]
        lw = LedoitWolf(assume_centered=True).fit(centred)
        return ({"means": means.astype(np.float32), "precision": lw.precision_.astype(np.float32)},
                {"shrinkage": float(lw.shrinkage_)})
    if method == "knn":
        idx = np.arange(len(f))
        if len(idx) > max_bank:
            idx = np.sort(np.random.default_rng(seed).choice(idx, max_bank, replace=False))
        return {"bank": _normalise(f[idx]).astype(np.float32)}, {"k": int(min(k, len(idx)))}
    raise ValueError(f"Unknown OOD method {method!r}. Available: {list(OOD_METHODS)}")


def fit_detector(method: str, train: tuple[np.ndarray, np.ndarray, np.ndarray],
                 val: tuple[np.ndarray, np.ndarray], temperature: float = 1.0, keep: float = KEEP,
                 meta: dict[str, Any] | None = None) -> OODDetector:
    """Fit ``method`` on the training part and set its threshold on the validation part.

    Args:
        train: (embeddings (N, D), logits (N, C), class indices (N,)) of training images.
        val: (embeddings, logits) of validation images: the threshold keeps ``keep`` of them unflagged.
        temperature: the model's calibration temperature (energy and msp use it).
    """
    if not 0.5 <= keep < 1.0:
        raise ValueError(f"keep must be in [0.5, 1), got {keep}")
    arrays, extra = fit_arrays(method, train[0], train[2])
    det = OODDetector(method, 0.0, arrays, {**(meta or {}), **extra, "keep": keep, "n_fit": int(len(train[0])),
                                              "n_val": int(len(val[1]))}, float(temperature))
    if "+" in method:
        det.meta["scales"] = [float(np.quantile(det._score(m, val[0], val[1]), keep)) for m in method.split("+")]
    det.threshold = float(np.quantile(det.score(val[0], val[1]), keep))
    return det


def load_detector(model_dir: str | Path, weights_sha256: str | None) -> OODDetector | None:
    """The detector stored with a model (None when it has none, or when it belongs to other weights: logged)."""
    path = Path(model_dir) / OOD_FILE
    if not path.exists():
        return None
    det = OODDetector.load(path)
    made_for = det.meta.get("weights_sha256")
    if made_for and weights_sha256 and made_for != weights_sha256:
        log.warning("%s was fitted for other weights (%s); no out-of-distribution flags until it is fitted again "
                    "(`leukoscope ood --model %s`)", path, made_for[:16], model_dir)
        return None
    return det


def embed_images(model: Any, images: Any, batch_size: int = 32, progress: bool = False,
                 desc: str = "embedding") -> tuple[np.ndarray, np.ndarray, list[int], list[tuple[int, str]]]:
    """(logits (N, C), embeddings (N, D), indices of the images read, [(index, reason)] of those not read) of an
    iterable of RGB arrays or paths, through ``model`` (a :class:`~leukoscope.models.modeldir.LoadedModel`)."""
    from tqdm import tqdm

    from leukoscope.data.images import batched, read_image
    from leukoscope.errors import ImageReadError

    zs, fs, ok, failed = [], [], [], []

    def readable() -> Iterator[tuple[int, np.ndarray]]:
        items = list(images) if not isinstance(images, list) else images
        for i, im in enumerate(tqdm(items, desc=desc, unit="img", disable=not progress, leave=False)):
            try:
                yield i, (im if isinstance(im, np.ndarray) else read_image(im))
            except ImageReadError as exc:
                failed.append((i, exc.reason))

    for batch in batched(readable(), batch_size):
        z, f = model.logits_and_features(model.prepare_batch([rgb for _, rgb in batch]))
        zs.append(z)
        fs.append(f)
        ok.extend(i for i, _ in batch)
    if not zs:
        return np.zeros((0, len(model.classes)), np.float32), np.zeros((0, 0), np.float32), ok, failed
    return np.concatenate(zs), np.concatenate(fs), ok, failed


def fit_model_detector(model: Any, train: Any, val: Any, method: str = DEFAULT_METHOD, keep: float = KEEP,
                       max_train: int = 4000, seed: int = 0, progress: bool = False) -> OODDetector:
    """Fit ``method`` for ``model`` on the embeddings of its training samples (at most ``max_train``, drawn at
    random) and set the threshold on its validation samples; ``train`` and ``val`` are
    :class:`~leukoscope.data.datasets.Dataset` parts of the model's split."""
    index = {c: i for i, c in enumerate(model.classes)}
    samples = list(train.samples)
    if len(samples) > max_train:
        keep_idx = np.sort(np.random.default_rng(seed).choice(len(samples), max_train, replace=False))
        samples = [samples[i] for i in keep_idx]
    z_tr, f_tr, ok_tr, _ = embed_images(model, [s.path for s in samples], progress=progress, desc="OOD: training part")
    y_tr = np.array([index[samples[i].label] for i in ok_tr])
    z_va, f_va, _, _ = embed_images(model, [s.path for s in val.samples], progress=progress,
                                    desc="OOD: validation part")
    meta = {"weights_sha256": model.info.get("weights_sha256"), "fitted_on": "training part (embeddings); "
            f"threshold on the validation part ({keep:.0%} kept)", "seed": seed}
    return fit_detector(method, (f_tr, z_tr, y_tr), (f_va, z_va), model.temperature, keep, meta)
