"""Classification metrics per image and per group, with bootstrap confidence intervals and calibration error."""

from __future__ import annotations

import warnings
from collections.abc import Sequence

import numpy as np
from sklearn.metrics import roc_auc_score, roc_curve


def _safe_div(a: float, b: float) -> float:
    return float(a) / float(b) if b else float("nan")


def confusion(y_true: np.ndarray, y_pred: np.ndarray) -> tuple[int, int, int, int]:
    """(tp, fp, tn, fn) with class 1 as positive."""
    y_true, y_pred = np.asarray(y_true).astype(int), np.asarray(y_pred).astype(int)
    tp = int(((y_pred == 1) & (y_true == 1)).sum())
    fp = int(((y_pred == 1) & (y_true == 0)).sum())
    tn = int(((y_pred == 0) & (y_true == 0)).sum())
    fn = int(((y_pred == 0) & (y_true == 1)).sum())
    return tp, fp, tn, fn


def roc_auc(y_true: Sequence[int], score: Sequence[float]) -> float:
    """ROC AUC, or NaN with a warning when only one class is present (no crash)."""
    y_true = np.asarray(y_true).astype(int)
    if len(np.unique(y_true)) < 2:
        warnings.warn("ROC AUC is undefined when y_true has a single class; returning NaN", stacklevel=2)
        return float("nan")
    return float(roc_auc_score(y_true, np.asarray(score, dtype=float)))


def bootstrap_auc_ci(
    y_true: Sequence[int], score: Sequence[float], n_boot: int = 1000, seed: int = 0, alpha: float = 0.05,
    groups: Sequence[str] | None = None,
) -> tuple[float, float]:
    """Percentile bootstrap CI of the AUC; resamples groups (patients) instead of images when ``groups`` is given."""
    y_true, score = np.asarray(y_true).astype(int), np.asarray(score, dtype=float)
    if len(np.unique(y_true)) < 2 or n_boot <= 0:
        return float("nan"), float("nan")
    rng = np.random.default_rng(seed)
    if groups is None:
        units = [np.array([i]) for i in range(len(y_true))]
    else:
        groups = np.asarray(groups)
        units = [np.flatnonzero(groups == g) for g in np.unique(groups)]
    aucs = []
    for _ in range(n_boot):
        idx = np.concatenate([units[i] for i in rng.integers(0, len(units), len(units))])
        if len(np.unique(y_true[idx])) < 2:
            continue
        aucs.append(roc_auc_score(y_true[idx], score[idx]))
    if not aucs:
        return float("nan"), float("nan")
    return float(np.quantile(aucs, alpha / 2)), float(np.quantile(aucs, 1 - alpha / 2))


def binary_metrics(
    y_true: Sequence[int], p_pos: Sequence[float], threshold: float = 0.5, n_boot: int = 1000, seed: int = 0,
    groups: Sequence[str] | None = None,
) -> dict[str, float]:
    """Accuracy, precision, recall (= sensitivity), specificity, F1 and ROC AUC with a bootstrap 95% CI.

    Args:
        y_true: 1 for the positive class (leukemic), 0 otherwise.
        p_pos: probability of the positive class.
        threshold: ``p_pos >= threshold`` is called positive.
        groups: resample these units in the bootstrap (e.g. patients) instead of single images.
    """
    y_true = np.asarray(y_true).astype(int)
    p_pos = np.asarray(p_pos, dtype=float)
    if y_true.shape != p_pos.shape:
        raise ValueError(f"y_true and p_pos must have the same shape, got {y_true.shape} and {p_pos.shape}")
    tp, fp, tn, fn = confusion(y_true, (p_pos >= threshold).astype(int))
    precision = _safe_div(tp, tp + fp)
    recall = _safe_div(tp, tp + fn)
    f1 = _safe_div(2 * tp, 2 * tp + fp + fn)
    lo, hi = bootstrap_auc_ci(y_true, p_pos, n_boot=n_boot, seed=seed, groups=groups)
    return {
        "n": int(len(y_true)), "n_pos": int(y_true.sum()),
        "accuracy": _safe_div(tp + tn, len(y_true)),
        "precision": precision, "recall": recall, "sensitivity": recall,
        "specificity": _safe_div(tn, tn + fp), "f1": f1,
        "auc": roc_auc(y_true, p_pos), "auc_ci_low": lo, "auc_ci_high": hi,
        "tp": tp, "fp": fp, "tn": tn, "fn": fn, "threshold": float(threshold),
    }


def balanced_threshold(y_true: Sequence[int], p_pos: Sequence[float]) -> float:
    """The threshold on ``p_pos`` (``p >= t`` positive) where sensitivity and specificity are closest to equal, taken
    midway between the two neighbouring scores; ties go to the threshold nearest 0.5. Both classes are needed."""
    y = np.asarray(y_true).astype(int)
    p = np.asarray(p_pos, dtype=float)
    if y.min() == y.max():
        raise ValueError("balanced_threshold needs both classes")
    s = np.unique(p)
    cands = np.concatenate([[s[0] / 2], (s[1:] + s[:-1]) / 2, [(s[-1] + 1) / 2]])
    pos, neg = p[y == 1], p[y == 0]
    sens = (pos[None, :] >= cands[:, None]).mean(1)
    spec = (neg[None, :] < cands[:, None]).mean(1)
    gap = np.abs(sens - spec)
    best = np.flatnonzero(gap <= gap.min() + 1e-12)
    return float(cands[best[np.argmin(np.abs(cands[best] - 0.5))]])


def multiclass_metrics(
    y_true: Sequence[int], proba: np.ndarray, classes: Sequence[str], n_boot: int = 1000, seed: int = 0,
    groups: Sequence[str] | None = None,
) -> dict:
    """Accuracy; per-class precision, recall, specificity, F1, support; macro and weighted F1; macro OvR AUC + CI.

    For two classes the binary metrics (class index 1 positive) are included at the top level too.
    """
    y_true = np.asarray(y_true).astype(int)
    proba = np.asarray(proba, dtype=float)
    if proba.ndim != 2 or proba.shape[0] != len(y_true) or proba.shape[1] != len(classes):
        raise ValueError(f"proba must be (n={len(y_true)}, C={len(classes)}), got {proba.shape}")
    y_pred = proba.argmax(1)
    per_class = {}
    for k, name in enumerate(classes):
        tp, fp, tn, fn = confusion(y_true == k, y_pred == k)
        per_class[name] = {
            "precision": _safe_div(tp, tp + fp), "recall": _safe_div(tp, tp + fn),
            "sensitivity": _safe_div(tp, tp + fn), "specificity": _safe_div(tn, tn + fp),
            "f1": _safe_div(2 * tp, 2 * tp + fp + fn), "support": int((y_true == k).sum()),
        }
    support = np.array([per_class[c]["support"] for c in classes], dtype=float)
    present = support > 0

    def _avg(key: str, weighted: bool) -> float:
        vals = np.array([per_class[c][key] for c in classes], dtype=float)
        ok = present & ~np.isnan(vals)
        if not ok.any():
            return float("nan")
        return float(np.average(vals[ok], weights=support[ok] if weighted else None))

    out: dict = {
        "n": int(len(y_true)), "accuracy": float((y_pred == y_true).mean()) if len(y_true) else float("nan"),
        "per_class": per_class,
        "macro": {k: _avg(k, False) for k in ("precision", "recall", "specificity", "f1")},
        "weighted": {k: _avg(k, True) for k in ("precision", "recall", "specificity", "f1")},
    }
    if len(classes) == 2:
        out["binary"] = binary_metrics(y_true, proba[:, 1], n_boot=n_boot, seed=seed, groups=groups)
        out["auc"], out["auc_ci_low"], out["auc_ci_high"] = (
            out["binary"]["auc"], out["binary"]["auc_ci_low"], out["binary"]["auc_ci_high"])
    else:
        aucs = [roc_auc((y_true == k).astype(int), proba[:, k]) if present[k] else float("nan")
                for k in range(len(classes))]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            out["auc"] = float(np.nanmean(aucs)) if not np.all(np.isnan(aucs)) else float("nan")
        out["auc_per_class"] = dict(zip(classes, aucs))
        out["auc_ci_low"], out["auc_ci_high"] = _bootstrap_macro_auc(y_true, proba, n_boot, seed, groups)
    return out


def _bootstrap_macro_auc(y_true: np.ndarray, proba: np.ndarray, n_boot: int, seed: int,
                         groups: Sequence[str] | None) -> tuple[float, float]:
    if n_boot <= 0 or len(np.unique(y_true)) < 2:
        return float("nan"), float("nan")
    rng = np.random.default_rng(seed)
    units = ([np.array([i]) for i in range(len(y_true))] if groups is None else
             [np.flatnonzero(np.asarray(groups) == g) for g in np.unique(groups)])
    vals = []
    for _ in range(n_boot):
        idx = np.concatenate([units[i] for i in rng.integers(0, len(units), len(units))])
        yt, pr = y_true[idx], proba[idx]
        aucs = [roc_auc_score(yt == k, pr[:, k]) for k in range(proba.shape[1]) if 0 < (yt == k).sum() < len(yt)]
        if aucs:
            vals.append(np.mean(aucs))
    if not vals:
        return float("nan"), float("nan")
    return float(np.quantile(vals, 0.025)), float(np.quantile(vals, 0.975))


def aggregate_by_group(groups: Sequence[str], proba: np.ndarray) -> tuple[list[str], np.ndarray]:
    """Mean class probabilities per group (a patient's cells -> the patient), groups in sorted order."""
    groups = np.asarray(groups)
    proba = np.asarray(proba, dtype=float)
    names = sorted(set(groups.tolist()))
    return names, np.stack([proba[groups == g].mean(0) for g in names]) if names else np.zeros((0, proba.shape[1]))


def group_labels(groups: Sequence[str], y_true: Sequence[int]) -> tuple[list[str], np.ndarray]:
    """The label of each group (sorted like :func:`aggregate_by_group`); mixed groups take their majority label."""
    groups, y_true = np.asarray(groups), np.asarray(y_true).astype(int)
    names = sorted(set(groups.tolist()))
    return names, np.array([np.bincount(y_true[groups == g]).argmax() for g in names])


def expected_calibration_error(y_true: Sequence[int], proba: np.ndarray, n_bins: int = 15) -> float:
    """ECE of the top-class confidence over equal-width bins."""
    y_true, proba = np.asarray(y_true).astype(int), np.asarray(proba, dtype=float)
    conf, pred = proba.max(1), proba.argmax(1)
    correct = (pred == y_true).astype(float)
    edges = np.linspace(0, 1, n_bins + 1)
    ece = 0.0
    for lo, hi in zip(edges[:-1], edges[1:]):
        m = (conf > lo) & (conf <= hi)
        if m.any():
            ece += m.mean() * abs(correct[m].mean() - conf[m].mean())
    return float(ece)


def reliability_bins(y_true: Sequence[int], proba: np.ndarray, n_bins: int = 10) -> dict[str, list[float]]:
    """Per bin: mean confidence, accuracy and count (for the reliability diagram)."""
    y_true, proba = np.asarray(y_true).astype(int), np.asarray(proba, dtype=float)
    conf, correct = proba.max(1), (proba.argmax(1) == y_true).astype(float)
    edges = np.linspace(0, 1, n_bins + 1)
    out: dict[str, list[float]] = {"confidence": [], "accuracy": [], "count": [], "lo": [], "hi": []}
    for lo, hi in zip(edges[:-1], edges[1:]):
        m = (conf > lo) & (conf <= hi)
        out["lo"].append(float(lo))
        out["hi"].append(float(hi))
        out["count"].append(int(m.sum()))
        out["confidence"].append(float(conf[m].mean()) if m.any() else float("nan"))
        out["accuracy"].append(float(correct[m].mean()) if m.any() else float("nan"))
    return out


def roc_points(y_true: Sequence[int], score: Sequence[float]) -> tuple[np.ndarray, np.ndarray]:
    fpr, tpr, _ = roc_curve(np.asarray(y_true).astype(int), np.asarray(score, dtype=float))
    return fpr, tpr
