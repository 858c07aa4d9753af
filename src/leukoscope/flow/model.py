"""Flow models end to end: training, subject-level cross-validation, prediction, and the model directory.

A flow model directory holds ``config.yaml`` (the resolved :class:`FlowConfig`), ``classes.json``,
``model.safetensors`` (scaler, support vectors / coefficients, cluster centres as float64 arrays),
``model.json`` (scalars: kernel gamma, intercept, Platt sigmoid, feature names), ``metrics.json`` and
``MODEL_CARD.md``. Nothing in it is pickled.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from leukoscope.flow.classifier import FittedClassifier, fit_classifier, subject_folds
from leukoscope.flow.config import FlowConfig, load_flow_config
from leukoscope.flow.data import CLASSES, FlowCase, flowcap_fcs_cases, load_feature_table, read_manifest
from leukoscope.flow.fcs import FCSReadError, match_channels, panel_differences, read_fcs, read_fcs_text
from leukoscope.flow.features import Featurizer, case_events, sample_matrix

__all__ = [
    "FlowModel", "train_flow_model", "cross_validate", "cv_metrics", "load_cases", "load_flow_model",
    "save_flow_model", "default_flow_model_dir", "predict_files", "FORMAT_VERSION",
]

log = logging.getLogger(__name__)
FORMAT_VERSION = 1
DEFAULT_MODEL = "flow-aml"


@dataclass
class FlowModel:
    """A fitted flow model: featurizer (None for feature-table input) + calibrated classifier."""

    config: FlowConfig
    classifier: FittedClassifier
    feature_names: list[str]
    featurizer: Featurizer | None = None
    classes: tuple[str, ...] = CLASSES
    training: dict = field(default_factory=dict)

    @property
    def input(self) -> str:
        return self.config.data.input

    def predict_proba_features(self, X: np.ndarray) -> np.ndarray:
        """(n, 2) class probabilities from a feature matrix whose columns follow ``feature_names``."""
        return self.classifier.predict_proba(X)

    def features_from_events(self, events: list[dict[int, np.ndarray]]) -> np.ndarray:
        if self.featurizer is None:
            raise ValueError("this model reads a feature table, not FCS events; pass features instead")
        return self.featurizer.transform(events)

    def predict_proba_cases(self, cases: Sequence[FlowCase]) -> np.ndarray:
        """(n, 2) probabilities for cases read from FCS files (raises FCSReadError on the first bad file)."""
        spec = self.config.features
        return self.predict_proba_features(self.features_from_events([case_events(c, spec) for c in cases]))


def load_cases(config: FlowConfig) -> list[FlowCase]:
    """The labelled FCS cases a config trains on."""
    d = config.data
    if d.dataset == "manifest":
        return read_manifest(d.manifest)
    return flowcap_fcs_cases(d.root, tubes=config.features.tubes, sources=d.sources)


def _table(config: FlowConfig):
    d = config.data
    return load_feature_table(d.table, root=d.root)


def _fit(config: FlowConfig, X_or_events, y: np.ndarray, groups: np.ndarray, seed: int
         ) -> tuple[Featurizer | None, FittedClassifier]:
    if config.data.input == "table":
        return None, fit_classifier(X_or_events, y, groups, config.model, seed=seed)
    featurizer = Featurizer(config.features).fit(X_or_events)
    X = featurizer.transform(X_or_events)
    return featurizer, fit_classifier(X, y, groups, config.model, seed=seed)


def _predict(featurizer: Featurizer | None, clf: FittedClassifier, X_or_events) -> np.ndarray:
    X = X_or_events if featurizer is None else featurizer.transform(X_or_events)
    return clf.predict_proba(X)[:, 1]


def _subset(X_or_events, idx: np.ndarray):
    if isinstance(X_or_events, np.ndarray):
        return X_or_events[idx]
    return [X_or_events[i] for i in idx]


def cross_validate(
    config: FlowConfig, X_or_events, y: np.ndarray, groups: np.ndarray,
    progress: Callable[[str], None] | None = None,
) -> dict:
    """Repeated subject-level stratified k-fold; inner CV (tuning + calibration) runs inside each training part.

    Returns:
        ``{"p": (repeats, n) held-out P(aml), "folds": fold index of each subject per repeat, "groups", "y"}``.
    """
    y = np.asarray(y).astype(int)
    groups = np.asarray(groups)
    cv = config.cv
    P = np.full((cv.repeats, len(y)), np.nan)
    fold_of = np.full((cv.repeats, len(y)), -1)
    for r in range(cv.repeats):
        for k, (tr, te) in enumerate(subject_folds(y, groups, cv.folds, cv.seed + r)):
            featurizer, clf = _fit(config, _subset(X_or_events, tr), y[tr], groups[tr], seed=cv.seed + r)
            P[r, te] = _predict(featurizer, clf, _subset(X_or_events, te))
            fold_of[r, te] = k
            if progress:
                progress(f"repeat {r + 1}/{cv.repeats} fold {k + 1}: {len(tr)} train / {len(te)} test subjects")
    return {"p": P, "folds": fold_of, "groups": groups, "y": y}


def cv_metrics(cv_out: dict, n_boot: int = 1000, threshold: float = 0.5, seed: int = 0) -> dict:
    """Metrics of the repeat-averaged held-out probabilities (bootstrap CI over subjects), plus the spread of
    AUC / F1 / sensitivity / specificity across repeats."""
    from leukoscope.evaluate.metrics import binary_metrics

    y, P = cv_out["y"], cv_out["p"]
    pooled = binary_metrics(y, P.mean(0), threshold=threshold, n_boot=n_boot, seed=seed)
    # exact (Clopper-Pearson) intervals: a bootstrap cannot widen a score without errors
    for key, k, n in (("sensitivity", pooled["tp"], pooled["tp"] + pooled["fn"]),
                      ("specificity", pooled["tn"], pooled["tn"] + pooled["fp"])):
        pooled[f"{key}_ci_low"], pooled[f"{key}_ci_high"] = exact_binomial_ci(k, n)
    per = [binary_metrics(y, p, threshold=threshold, n_boot=0) for p in P]
    spread = {}
    for key in ("auc", "f1", "sensitivity", "specificity"):
        vals = np.array([m[key] for m in per], dtype=float)
        spread[key] = {"mean": float(np.nanmean(vals)), "sd": float(np.nanstd(vals)),
                       "min": float(np.nanmin(vals)), "max": float(np.nanmax(vals))}
    return {"pooled": pooled, "per_repeat": spread, "n_subjects": int(len(y)), "n_aml": int(y.sum()),
            "repeats": int(P.shape[0])}


def exact_binomial_ci(k: int, n: int, alpha: float = 0.05) -> tuple[float, float]:
    """Clopper-Pearson interval of a proportion k / n (NaN when n = 0)."""
    from scipy.stats import beta

    if n == 0:
        return float("nan"), float("nan")
    lo = float(beta.ppf(alpha / 2, k, n - k + 1)) if k > 0 else 0.0
    hi = float(beta.ppf(1 - alpha / 2, k + 1, n - k)) if k < n else 1.0
    return lo, hi


def train_flow_model(config: FlowConfig, evaluate: bool = True, progress: Callable[[str], None] | None = None
                     ) -> tuple[FlowModel, dict]:
    """Fit the final model on every subject and (optionally) estimate its performance by subject-level CV.

    Returns:
        (model, metrics); metrics hold the CV results and the held-out probability of every subject.
    """
    if config.data.input == "table":
        table = _table(config)
        data, y, groups, names = table.X, table.y, np.asarray(table.subjects), table.feature_names
        described = {"input": "table", "source": table.source}
    else:
        cases = load_cases(config)
        unlabeled = [c.subject for c in cases if c.label not in CLASSES]
        if unlabeled:
            raise ValueError(f"training cases need labels; subjects without one: {unlabeled[:5]}")
        data = [case_events(c, config.features) for c in cases]
        y = np.array([c.y for c in cases])
        groups = np.array([c.subject for c in cases])
        names = None
        case_info = [{"subject": c.subject, "label": c.label, "source": c.source,
                      "files": {str(t): f"{p.parent.name}/{p.name}" for t, p in c.files.items()},
                      "n_events": {str(t): int(ev[t].shape[0]) for t in ev}}
                     for c, ev in zip(cases, data, strict=True)]
        described = {"input": "fcs", "panel": _training_panel(cases, config), "cases": case_info}
    metrics: dict = {"n_subjects": int(len(y)), "n_aml": int(y.sum()), "n_normal": int(len(y) - y.sum())}
    if evaluate:
        out = cross_validate(config, data, y, groups, progress=progress)
        metrics["cv"] = cv_metrics(out, n_boot=config.cv.n_boot, threshold=config.cv.threshold, seed=config.cv.seed)
        metrics["cv"]["protocol"] = (f"{config.cv.repeats} x {config.cv.folds}-fold subject-level stratified CV; "
                                     f"inner {config.model.inner_folds}-fold CV for tuning and Platt calibration")
        metrics["heldout"] = [{"subject": str(g), "label": CLASSES[int(t)], "p_aml": float(p)}
                              for g, t, p in zip(groups, y, out["p"].mean(0), strict=True)]
    featurizer, clf = _fit(config, data, y, groups, seed=config.cv.seed)
    model = FlowModel(config=config, classifier=clf, featurizer=featurizer,
                      feature_names=featurizer.feature_names if featurizer else list(names), training=described)
    return model, metrics


def _training_panel(cases: Sequence[FlowCase], config: FlowConfig) -> dict[str, list[str]]:
    """Most common ``$PnS`` of each model channel per tube over the training files (for warnings only)."""
    from collections import Counter

    spec = config.features
    panel = {}
    for tube in spec.tubes:
        counts = [Counter() for _ in spec.channels]
        for case in cases:
            path = case.files.get(tube) or next(iter(case.files.values()))
            names, markers, _ = read_fcs_text(path, spec.dataset)
            idx = match_channels(names, list(spec.channels), list(spec.positions) if spec.positions else None, path)
            for j, i in enumerate(idx):
                counts[j][markers[i]] += 1
        panel[str(tube)] = [c.most_common(1)[0][0] if c else "" for c in counts]
    return panel


# ----------------------------------------------------------------------------------------------- model directory


def default_flow_model_dir() -> Path:
    """The flow model shipped inside the package (``leukoscope/weights/flow-aml``)."""
    from importlib.resources import files

    return Path(str(files("leukoscope") / "weights" / DEFAULT_MODEL))


def save_flow_model(model: FlowModel, out_dir: str | Path, metrics: dict | None = None, card: str | None = None
                    ) -> Path:
    """Write a model directory (see module docstring)."""
    import yaml
    from safetensors.numpy import save_file

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    arrays = dict(model.classifier.arrays())
    if model.featurizer is not None:
        arrays.update({k: np.ascontiguousarray(v, dtype=np.float64) for k, v in model.featurizer.arrays().items()})
    # a single metadata key keeps the header byte-identical across runs (several keys come out in random order)
    save_file(arrays, str(out / "model.safetensors"), metadata={"format": "leukoscope-flow/1"})
    (out / "model.safetensors").chmod(0o644)  # safetensors writes 0600; package data must be world-readable
    info = {"kind": "flow", "format_version": FORMAT_VERSION, "task": "flow-aml-vs-normal", "input": model.input,
            "classifier": model.classifier.scalars(), "feature_names": model.feature_names,
            "training": {k: v for k, v in model.training.items() if k != "cases"}}
    (out / "model.json").write_text(json.dumps(info, indent=2) + "\n")
    (out / "config.yaml").write_text(yaml.safe_dump(model.config.to_dict(), sort_keys=False))
    (out / "classes.json").write_text(json.dumps(list(model.classes)) + "\n")
    if model.training.get("cases"):
        (out / "training_cases.json").write_text(json.dumps(model.training["cases"], indent=1) + "\n")
    if metrics is not None:
        (out / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    if card is not None:
        (out / "MODEL_CARD.md").write_text(card)
    return out


def load_flow_model(path: str | Path | None = None) -> FlowModel:
    """Load a flow model directory (default: the shipped ``flow-aml``)."""
    from safetensors.numpy import load_file

    root = Path(path) if path is not None else default_flow_model_dir()
    need = ["config.yaml", "classes.json", "model.safetensors", "model.json"]
    missing = [n for n in need if not (root / n).is_file()]
    if missing:
        raise FileNotFoundError(f"{root} is not a flow model directory: missing {missing}")
    config = load_flow_config(root / "config.yaml")
    info = json.loads((root / "model.json").read_text())
    if info.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"{root}: flow model format {info.get('format_version')!r}, this version reads "
                         f"{FORMAT_VERSION}")
    classes = tuple(json.loads((root / "classes.json").read_text()))
    if classes != CLASSES:
        raise ValueError(f"{root}: classes {list(classes)}; flow models here have {list(CLASSES)}")
    arrays = load_file(str(root / "model.safetensors"))
    clf = FittedClassifier.from_parts(info["classifier"], arrays)
    featurizer = Featurizer.from_arrays(config.features, arrays) if config.data.input == "fcs" else None
    names = list(info["feature_names"])
    if featurizer is not None and featurizer.feature_names != names:
        raise ValueError(f"{root}: feature names in model.json do not match the config's features")
    if clf.n_features != len(names):
        raise ValueError(f"{root}: classifier expects {clf.n_features} features, model.json names {len(names)}")
    return FlowModel(config=config, classifier=clf, feature_names=names, featurizer=featurizer, classes=classes,
                     training=info.get("training", {}))


def predict_files(model: FlowModel, paths: Sequence[str | Path]) -> tuple[list[dict], list[tuple[str, str]]]:
    """Predict each FCS file as its own subject (single-tube models).

    Returns:
        (rows, errors): rows ``{"path", "label", "confidence", "p_normal", "p_aml"}`` for readable files;
        errors ``(path, message)`` for files that could not be read. One bad file does not stop the others.
    """
    if model.featurizer is None:
        raise ValueError("this model was trained on a feature table; it cannot read FCS files")
    if len(model.config.features.tubes) != 1:
        raise ValueError(f"this model needs tubes {list(model.config.features.tubes)} per subject; predict a "
                         "manifest of subjects instead of single files")
    spec = model.config.features
    tube = spec.tubes[0]
    expected = (model.training.get("panel") or {}).get(str(tube))
    rows, errors = [], []
    for path in paths:
        try:
            sample = read_fcs(path, dataset=spec.dataset)
            if expected:
                idx = match_channels(sample.channels, list(spec.channels),
                                     list(spec.positions) if spec.positions else None, path)
                diff = panel_differences([sample.markers[i] for i in idx], expected)
                if diff:
                    log.warning("%s: marker names differ from the training panel (%s); the probability is not "
                                "meaningful for another antibody panel", path,
                                ", ".join(f"{spec.channels[i]} {got!r} vs {want!r}" for i, got, want in diff))
            p = model.predict_proba_features(model.features_from_events([{tube: sample_matrix(sample, spec)}]))[0]
        except (FCSReadError, ValueError, OSError) as exc:
            errors.append((str(path), str(exc)))
            continue
        k = int(np.argmax(p))
        rows.append({"path": str(path), "label": model.classes[k], "confidence": float(p[k]),
                     **{f"p_{c}": float(p[i]) for i, c in enumerate(model.classes)}})
    return rows, errors
