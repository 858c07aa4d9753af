"""Fuse per-patient image evidence with the flow cytometry probability.

Both inputs are calibrated probabilities of leukemia for one patient: ``p_image`` (the mean of the patient's
cell probabilities) and ``p_flow`` (the flow model's P(aml)). Fusion works on log-odds:

    z = b + w_image * logit(p_image) + w_flow * logit(p_flow),    p_fused = sigmoid(z)

* **late** fusion: weights chosen by hand. With ``prior`` set, ``b = -(sum of present weights - 1) * logit(prior)``,
  which for unit weights is the naive-Bayes combination of two calibrated posteriors that share the prior
  (conditionally independent evidence). Without a prior, ``b = bias``.
* **stacking**: ``w_image``, ``w_flow`` and ``b`` are a logistic regression fitted on a lab's own *paired* cases
  (the same patients with a smear and a flow tube). No public data set pairs the two, so no default is fitted here.

A patient missing one modality gets the fused value of the other alone (late fusion: the formula over the present
term; stacking: the present probability unchanged, because the fitted intercept assumes both).
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

__all__ = [
    "FusionWeights", "logit", "fuse", "fit_stacking", "patient_image_evidence", "evaluate_fusion_cv",
    "save_fusion", "load_fusion",
]

DEFAULT_EPS = 1e-6


def logit(p: np.ndarray | float, eps: float = DEFAULT_EPS) -> np.ndarray:
    """``log(p / (1 - p))`` with ``p`` clipped to ``[eps, 1 - eps]`` (so 0 and 1 stay finite); NaN stays NaN."""
    p = np.clip(np.asarray(p, dtype=np.float64), eps, 1.0 - eps)
    return np.log(p) - np.log1p(-p)


def _sigmoid(z: np.ndarray) -> np.ndarray:
    return np.exp(-np.logaddexp(0.0, -np.asarray(z, dtype=np.float64)))


@dataclass(frozen=True)
class FusionWeights:
    """Parameters of the log-odds fusion (see the module docstring)."""

    w_image: float = 1.0
    w_flow: float = 1.0
    bias: float = 0.0
    prior: float | None = None
    method: str = "late"
    eps: float = DEFAULT_EPS
    meta: dict = field(default_factory=dict, compare=False)

    def __post_init__(self) -> None:
        if self.method not in ("late", "stacking"):
            raise ValueError(f"fusion method must be 'late' or 'stacking', got {self.method!r}")
        if self.prior is not None and not 0.0 < self.prior < 1.0:
            raise ValueError(f"prior must lie strictly between 0 and 1, got {self.prior}")
        if not 0.0 < self.eps < 0.5:
            raise ValueError(f"eps must lie in (0, 0.5), got {self.eps}")
        for name in ("w_image", "w_flow", "bias"):
            if not math.isfinite(getattr(self, name)):
                raise ValueError(f"{name} must be finite, got {getattr(self, name)}")


def fuse(p_image: Sequence[float] | np.ndarray, p_flow: Sequence[float] | np.ndarray,
         weights: FusionWeights = FusionWeights()) -> np.ndarray:
    """Fused P(leukemia) per patient. NaN marks a missing modality; both missing gives NaN."""
    pi = np.atleast_1d(np.asarray(p_image, dtype=np.float64))
    pf = np.atleast_1d(np.asarray(p_flow, dtype=np.float64))
    if pi.shape != pf.shape:
        raise ValueError(f"p_image and p_flow must have the same shape, got {pi.shape} and {pf.shape}")
    for name, p in (("p_image", pi), ("p_flow", pf)):
        bad = ~np.isnan(p) & ((p < 0) | (p > 1))
        if bad.any():
            raise ValueError(f"{name} must be probabilities in [0, 1], got {p[bad][:3].tolist()}")
    has_i, has_f = ~np.isnan(pi), ~np.isnan(pf)
    zi = np.where(has_i, weights.w_image * logit(np.where(has_i, pi, 0.5), weights.eps), 0.0)
    zf = np.where(has_f, weights.w_flow * logit(np.where(has_f, pf, 0.5), weights.eps), 0.0)
    if weights.method == "late":
        if weights.prior is not None:
            w_sum = weights.w_image * has_i + weights.w_flow * has_f
            b = -(w_sum - 1.0) * float(logit(weights.prior, weights.eps))
        else:
            b = np.full(pi.shape, weights.bias)
        out = _sigmoid(b + zi + zf)
    else:
        out = _sigmoid(weights.bias + zi + zf)
        out = np.where(has_i & ~has_f, pi, out)
        out = np.where(has_f & ~has_i, pf, out)
    return np.where(has_i | has_f, out, np.nan)


def fit_stacking(p_image: Sequence[float], p_flow: Sequence[float], y: Sequence[int], C: float = 1.0,
                 eps: float = DEFAULT_EPS) -> FusionWeights:
    """Fit ``w_image``, ``w_flow`` and ``bias`` by L2 logistic regression on the two log-odds (paired cases only).

    Args:
        p_image, p_flow: calibrated probabilities of the same patients (no NaN).
        y: 1 = leukemia, 0 = not.
        C: inverse L2 strength (scikit-learn convention); large C = plain maximum likelihood.
    """
    from sklearn.linear_model import LogisticRegression

    pi, pf = np.asarray(p_image, dtype=np.float64), np.asarray(p_flow, dtype=np.float64)
    y = np.asarray(y).astype(int)
    if not (pi.shape == pf.shape == y.shape) or pi.ndim != 1:
        raise ValueError(f"p_image, p_flow and y must be 1-D of one length, got {pi.shape}, {pf.shape}, {y.shape}")
    if np.isnan(pi).any() or np.isnan(pf).any():
        raise ValueError("stacking is fitted on paired cases only: p_image and p_flow may not hold NaN")
    n_pos, n_neg = int(y.sum()), int(len(y) - y.sum())
    if min(n_pos, n_neg) < 2:
        raise ValueError(f"fitting fusion needs >= 2 patients of each class, got {n_pos} positive, {n_neg} negative")
    Z = np.column_stack([logit(pi, eps), logit(pf, eps)])
    lr = LogisticRegression(C=C, max_iter=10000).fit(Z, y)
    return FusionWeights(w_image=float(lr.coef_[0, 0]), w_flow=float(lr.coef_[0, 1]), bias=float(lr.intercept_[0]),
                         method="stacking", eps=eps,
                         meta={"n_pairs": int(len(y)), "n_positive": n_pos, "C": float(C)})


def patient_image_evidence(patients: Sequence[str], p_cells: Sequence[float]) -> tuple[list[str], np.ndarray]:
    """Per patient, the mean of its cells' leukemia probabilities (``aggregate_by_group``), patients sorted."""
    from leukoscope.evaluate.metrics import aggregate_by_group

    p = np.asarray(p_cells, dtype=np.float64)
    if len(p) != len(patients):
        raise ValueError(f"{len(patients)} patient ids for {len(p)} cell probabilities")
    names, mean = aggregate_by_group(list(patients), p[:, None])
    return names, mean[:, 0]


def evaluate_fusion_cv(p_image: Sequence[float], p_flow: Sequence[float], y: Sequence[int], folds: int = 5,
                       seed: int = 0, prior: float | None = None, C: float = 1.0, n_boot: int = 1000) -> dict:
    """On paired cases: metrics of image alone, flow alone, late fusion (unit weights) and stacking, the
    stacking weights refitted inside each stratified fold (patients are the rows, so folds are by patient)."""
    from sklearn.model_selection import StratifiedKFold

    from leukoscope.evaluate.metrics import binary_metrics

    pi, pf = np.asarray(p_image, dtype=np.float64), np.asarray(p_flow, dtype=np.float64)
    y = np.asarray(y).astype(int)
    k = min(folds, int(y.sum()), int(len(y) - y.sum()))
    if k < 2:
        raise ValueError("cross-validating the fusion needs at least 2 patients of each class")
    stacked = np.full(len(y), np.nan)
    for tr, te in StratifiedKFold(n_splits=k, shuffle=True, random_state=seed).split(pi, y):
        w = fit_stacking(pi[tr], pf[tr], y[tr], C=C)
        stacked[te] = fuse(pi[te], pf[te], w)
    late = fuse(pi, pf, FusionWeights(prior=prior if prior is not None else float(y.mean())))
    return {name: binary_metrics(y, p, n_boot=n_boot, seed=seed)
            for name, p in (("image", pi), ("flow", pf), ("late", late), ("stacking_cv", stacked))}


def save_fusion(weights: FusionWeights, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"format": "leukoscope-fusion", "version": 1, **asdict(weights)}, indent=2) + "\n")
    return path


def load_fusion(path: str | Path) -> FusionWeights:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"fusion weights {path} do not exist")
    d = json.loads(path.read_text())
    if d.pop("format", None) != "leukoscope-fusion":
        raise ValueError(f"{path} is not a leukoscope fusion file (no \"format\": \"leukoscope-fusion\")")
    d.pop("version", None)
    known = set(FusionWeights.__dataclass_fields__)
    unknown = set(d) - known
    if unknown:
        raise ValueError(f"{path}: unknown fusion key(s) {sorted(unknown)}; known: {sorted(known)}")
    return FusionWeights(**d)
