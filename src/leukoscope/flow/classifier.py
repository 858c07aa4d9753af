"""Scaled RBF-SVM (and a logistic-regression baseline) tuned by subject-level inner CV, with Platt calibration.

scikit-learn 1.9 deprecates ``SVC(probability=True)``; instead, the decision values the tuned model gives to the
subjects of each inner held-out fold are collected and a sigmoid (Platt 1999, with his smoothed targets) is fitted
to them; the final model is then refitted on all training subjects. This is what
``CalibratedClassifierCV(method="sigmoid", ensemble=False)`` does, but with subject-grouped folds and parameters
small enough to store as plain arrays: prediction is re-implemented in NumPy from the support vectors, dual
coefficients, scaler and sigmoid, so a model directory needs no pickle.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field, fields

import numpy as np

__all__ = ["ClassifierSpec", "FittedClassifier", "fit_classifier", "fit_platt", "subject_folds", "sigmoid"]


@dataclass(frozen=True)
class ClassifierSpec:
    """Which classifier and the grid its inner CV searches.

    Attributes:
        kind: ``svm`` (RBF SVC) or ``logreg`` (L2 logistic regression, the baseline).
        C: grid of the regularisation parameter C.
        gamma: grid of the RBF gamma as multiples of 1 / n_features (features are standardised first).
        class_weight: ``balanced`` or ``none``; calibration afterwards restores the training prevalence.
        inner_folds: subject-level stratified folds of the inner CV (tuning and calibration).
        scoring: scorer(s) of the grid search; ``a+b`` sums two scikit-learn scorers. The default adds balanced
            accuracy to ROC AUC because on small, separable training sets many grid points reach AUC 1.0 and the
            most regularised of them squeezes all decision values to one side of zero, which the inner-fold
            calibration then cannot transfer to the refitted model.
    """

    kind: str = "svm"
    C: tuple[float, ...] = (0.1, 1.0, 10.0, 100.0)
    gamma: tuple[float, ...] = (0.1, 0.3, 1.0, 3.0)
    class_weight: str = "balanced"
    inner_folds: int = 4
    scoring: str = "roc_auc+balanced_accuracy"

    def __post_init__(self) -> None:
        if self.kind not in ("svm", "logreg"):
            raise ValueError(f"classifier kind must be 'svm' or 'logreg', got {self.kind!r}")
        if self.class_weight not in ("balanced", "none"):
            raise ValueError(f"class_weight must be 'balanced' or 'none', got {self.class_weight!r}")
        if self.inner_folds < 2:
            raise ValueError(f"inner_folds must be >= 2, got {self.inner_folds}")
        if not self.C or any(c <= 0 for c in self.C) or any(g <= 0 for g in self.gamma):
            raise ValueError(f"C and gamma grids must be non-empty and positive, got C={self.C}, gamma={self.gamma}")

    @classmethod
    def from_dict(cls, d: dict) -> ClassifierSpec:
        known = {f.name for f in fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown model option(s) {sorted(unknown)}; known: {sorted(known)}")
        return cls(**{k: (tuple(float(x) for x in v) if k in ("C", "gamma") else v) for k, v in d.items()})

    def to_dict(self) -> dict:
        return {f.name: (list(v) if isinstance(v := getattr(self, f.name), tuple) else v) for f in fields(self)}


def sigmoid(z: np.ndarray) -> np.ndarray:
    z = np.asarray(z, dtype=np.float64)
    return np.exp(-np.logaddexp(0.0, -z))


def fit_platt(decision: np.ndarray, y: np.ndarray) -> tuple[float, float]:
    """Fit ``p = sigmoid(a * f + b)`` to decision values by maximum likelihood with Platt's smoothed targets."""
    from scipy.optimize import minimize

    f = np.asarray(decision, dtype=np.float64)
    y = np.asarray(y).astype(int)
    n_pos, n_neg = int(y.sum()), int((1 - y).sum())
    if n_pos == 0 or n_neg == 0:
        raise ValueError(f"Platt scaling needs both classes, got {n_pos} positive and {n_neg} negative")
    t = np.where(y == 1, (n_pos + 1.0) / (n_pos + 2.0), 1.0 / (n_neg + 2.0))

    def nll(params: np.ndarray) -> tuple[float, np.ndarray]:
        z = params[0] * f + params[1]
        # -[t log s(z) + (1 - t) log(1 - s(z))] = logaddexp(0, z) - t z
        loss = float(np.sum(np.logaddexp(0.0, z) - t * z))
        g = sigmoid(z) - t
        return loss, np.array([np.sum(g * f), np.sum(g)])

    res = minimize(nll, x0=np.array([1.0, 0.0]), jac=True, method="L-BFGS-B")
    return float(res.x[0]), float(res.x[1])


def subject_folds(y: np.ndarray, groups: np.ndarray, n_splits: int, seed: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """Stratified group k-fold (train_idx, test_idx) pairs; k is lowered to the smaller class's subject count."""
    from leukoscope.data.splits import group_folds

    y = np.asarray(y).astype(int)
    groups = np.asarray(groups)
    per_group = {g: y[groups == g][0] for g in np.unique(groups)}
    n_min = min(sum(1 for v in per_group.values() if v == c) for c in (0, 1))
    k = min(n_splits, n_min)
    if k < 2:
        raise ValueError(f"subject-level CV needs at least 2 subjects per class, got {n_min} in the smaller class")
    return group_folds(y, groups, k, seed)


@dataclass
class FittedClassifier:
    """A fitted, calibrated binary classifier stored as arrays; ``predict_proba`` gives P(class 1)."""

    kind: str
    scaler_mean: np.ndarray
    scaler_scale: np.ndarray
    intercept: float
    platt_a: float
    platt_b: float
    gamma: float = 0.0
    support_vectors: np.ndarray | None = None
    dual_coef: np.ndarray | None = None
    coef: np.ndarray | None = None
    info: dict = field(default_factory=dict)

    @property
    def n_features(self) -> int:
        return int(self.scaler_mean.shape[0])

    def decision_function(self, X: np.ndarray) -> np.ndarray:
        X = np.asarray(X, dtype=np.float64)
        if X.ndim != 2 or X.shape[1] != self.n_features:
            raise ValueError(f"expected features of shape (n, {self.n_features}), got {X.shape}")
        Z = (X - self.scaler_mean) / self.scaler_scale
        if self.kind == "svm":
            sv = self.support_vectors
            d2 = (Z * Z).sum(1)[:, None] - 2.0 * Z @ sv.T + (sv * sv).sum(1)[None, :]
            return np.exp(-self.gamma * np.maximum(d2, 0.0)) @ self.dual_coef + self.intercept
        return Z @ self.coef + self.intercept

    def predict_proba(self, X: np.ndarray) -> np.ndarray:
        """(n, 2): P(class 0), P(class 1)."""
        p1 = sigmoid(self.platt_a * self.decision_function(X) + self.platt_b)
        return np.stack([1.0 - p1, p1], axis=1)

    def arrays(self) -> dict[str, np.ndarray]:
        out = {"classifier.scaler_mean": self.scaler_mean, "classifier.scaler_scale": self.scaler_scale}
        if self.kind == "svm":
            out["classifier.support_vectors"] = self.support_vectors
            out["classifier.dual_coef"] = self.dual_coef
        else:
            out["classifier.coef"] = self.coef
        return {k: np.ascontiguousarray(v, dtype=np.float64) for k, v in out.items()}

    def scalars(self) -> dict:
        return {"kind": self.kind, "intercept": self.intercept, "platt_a": self.platt_a, "platt_b": self.platt_b,
                "gamma": self.gamma, "info": self.info}

    @classmethod
    def from_parts(cls, scalars: dict, arrays: dict[str, np.ndarray]) -> FittedClassifier:
        kind = scalars["kind"]
        try:
            clf = cls(
                kind=kind, scaler_mean=arrays["classifier.scaler_mean"], scaler_scale=arrays["classifier.scaler_scale"],
                intercept=float(scalars["intercept"]), platt_a=float(scalars["platt_a"]),
                platt_b=float(scalars["platt_b"]), gamma=float(scalars.get("gamma", 0.0)),
                support_vectors=arrays.get("classifier.support_vectors"), dual_coef=arrays.get("classifier.dual_coef"),
                coef=arrays.get("classifier.coef"), info=dict(scalars.get("info", {})),
            )
        except KeyError as exc:
            raise ValueError(f"model parameters lack {exc}") from exc
        missing = [n for n, v in (("support_vectors", clf.support_vectors), ("dual_coef", clf.dual_coef))
                   if kind == "svm" and v is None] + (["coef"] if kind == "logreg" and clf.coef is None else [])
        if missing:
            raise ValueError(f"a {kind} model needs arrays {missing}")
        return clf


def _make(kind: str, params: dict, class_weight: str, seed: int):
    from sklearn.linear_model import LogisticRegression
    from sklearn.svm import SVC

    cw = "balanced" if class_weight == "balanced" else None
    if kind == "svm":
        return SVC(kernel="rbf", C=params["C"], gamma=params["gamma"], class_weight=cw)
    return LogisticRegression(C=params["C"], class_weight=cw, max_iter=5000, random_state=seed)


def _score(name: str, y: np.ndarray, decision: np.ndarray) -> float:
    from sklearn.metrics import balanced_accuracy_score, roc_auc_score

    if name == "roc_auc":
        return float(roc_auc_score(y, decision)) if len(np.unique(y)) == 2 else float("nan")
    if name == "balanced_accuracy":
        return float(balanced_accuracy_score(y, (decision > 0).astype(int)))
    raise ValueError(f"unknown scoring {name!r}; use roc_auc, balanced_accuracy or both joined by '+'")


def fit_classifier(X: np.ndarray, y: np.ndarray, groups: np.ndarray, spec: ClassifierSpec, seed: int = 0
                   ) -> FittedClassifier:
    """Tune on subject-level inner folds, Platt-calibrate on the inner held-out decision values, refit on all.

    The grid is searched in ascending order and the first best point is kept, so ties go to the most regularised
    model. Scaling is refitted inside every inner fold.
    """
    from sklearn.preprocessing import StandardScaler
    from threadpoolctl import threadpool_limits

    X = np.asarray(X, dtype=np.float64)
    y = np.asarray(y).astype(int)
    groups = np.asarray(groups)
    if X.ndim != 2 or X.shape[0] != len(y):
        raise ValueError(f"X must be (n_subjects={len(y)}, n_features), got {X.shape}")
    folds = subject_folds(y, groups, spec.inner_folds, seed)
    n_feat = X.shape[1]
    if spec.kind == "svm":
        grid = [{"C": c, "gamma": g / n_feat} for c in sorted(spec.C) for g in sorted(spec.gamma)]
    else:
        grid = [{"C": c} for c in sorted(spec.C)]
    scorers = spec.scoring.split("+")
    scaled = []
    for tr, te in folds:
        sc = StandardScaler().fit(X[tr])
        scaled.append((sc.transform(X[tr]), sc.transform(X[te]), tr, te))
    with threadpool_limits(1), warnings.catch_warnings():
        warnings.simplefilter("ignore", category=UserWarning)
        best_i, best_score, best_oof = -1, -np.inf, None
        for i, params in enumerate(grid):
            oof = np.zeros(len(y))
            scores = {s: [] for s in scorers}
            for ztr, zte, tr, te in scaled:
                oof[te] = _make(spec.kind, params, spec.class_weight, seed).fit(ztr, y[tr]).decision_function(zte)
                for s in scorers:
                    scores[s].append(_score(s, y[te], oof[te]))
            total = float(sum(np.nan_to_num(np.nanmean(v) if not np.all(np.isnan(v)) else np.nan, nan=-1.0)
                              for v in scores.values()))
            if total > best_score + 1e-12:
                best_i, best_score, best_oof = i, total, oof
        a, b = fit_platt(best_oof, y)
        scaler = StandardScaler().fit(X)
        est = _make(spec.kind, grid[best_i], spec.class_weight, seed).fit(scaler.transform(X), y)
    scale = np.where(scaler.scale_ > 0, scaler.scale_, 1.0)
    info = {"best_params": {k: float(v) for k, v in grid[best_i].items()}, "inner_cv_score": best_score,
            "scoring": spec.scoring, "n_train": int(len(y)), "n_train_pos": int(y.sum()), "inner_folds": len(folds)}
    if spec.kind == "svm":
        return FittedClassifier(
            kind="svm", scaler_mean=scaler.mean_.copy(), scaler_scale=scale, intercept=float(est.intercept_[0]),
            platt_a=a, platt_b=b, gamma=float(est.gamma), support_vectors=est.support_vectors_.copy(),
            dual_coef=est.dual_coef_[0].copy(), info=info,
        )
    return FittedClassifier(
        kind="logreg", scaler_mean=scaler.mean_.copy(), scaler_scale=scale, intercept=float(est.intercept_[0]),
        platt_a=a, platt_b=b, coef=est.coef_[0].copy(), info=info,
    )
