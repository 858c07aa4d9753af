"""Patient-level AML vs APL on DeepAPL: patient-grouped cross-validation of three ways to go from cells to a patient.

    (a) mean    mean of a cell-level AML/APL classifier's probabilities (a fine-tuned CNN head, or a logistic
                regression on frozen ImageNet embeddings)
    (b) proportions   the cell-type model's mean probability per type (a soft differential count) -> logistic regression
    (c) mil     gated-attention multiple-instance learning over cell embeddings (frozen ImageNet, or the cell-type
                model's own)

Every model used inside a fold is fitted on that fold's training patients only: the cell-type and cell-level CNNs
are re-trained per fold with ``leukoscope.train`` (their early stopping and temperature use an inner validation
split of the training patients), scalers, logistic regressions and MIL models are fitted on the training patients.

All cell inputs come from the frozen stem's cached output (``~/.cache/leukoscope/stem``), the same cache that
``leukoscope train`` fills, so a fold costs seconds once the cache exists.
"""

from __future__ import annotations

import json
import logging
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import StratifiedKFold

from leukoscope.config import TrainConfig, make_config
from leukoscope.data.datasets import Dataset, load_dataset
from leukoscope.data.splits import Split
from leukoscope.diagnose.mil import MILConfig, fit_mil
from leukoscope.diagnose.model import PatientModel, copy_top, pooled
from leukoscope.evaluate.metrics import binary_metrics, multiclass_metrics
from leukoscope.models.modeldir import load_model, softmax

log = logging.getLogger(__name__)

BLAST = "Blast, no lineage spec"
PROMYELOCYTE = "Promyelocyte"
POSITIVE = "APL"


# ---------------------------------------------------------------------------------------------------------------------
# cells
# ---------------------------------------------------------------------------------------------------------------------
@dataclass
class CellData:
    """Every readable DeepAPL cell with its cached stem features.

    Attributes:
        ds: the dataset (target ``cell_type``), readable samples only.
        stem: (N, V, 320, 7, 7) float16 stem outputs; view 0 is the un-augmented cell.
        patients, diagnosis (1 = APL), cell_type (index into ``ds.classes``): per cell.
        unreadable: (path, reason) of the files the stem could not read.
        imagenet_top: the frozen ImageNet conv head (the pooled 1280-d "ImageNet embedding").
        weights_source: where the ImageNet weights came from.
    """

    ds: Dataset
    stem: torch.Tensor
    patients: np.ndarray
    diagnosis: np.ndarray
    cell_type: np.ndarray
    unreadable: list[tuple[str, str]]
    imagenet_top: torch.nn.Module
    weights_source: str

    def patient_labels(self) -> dict[str, int]:
        return {p: int(d) for p, d in zip(self.patients, self.diagnosis, strict=True)}


def load_cells(cfg: TrainConfig, views: int = 1) -> CellData:
    """DeepAPL cells and their stem features under ``cfg`` (the cell-type config), from or into the stem cache."""
    from leukoscope.cache import cache_root
    from leukoscope.models.backbones import mean_std
    from leukoscope.models.modeldir import build_network
    from leukoscope.preprocess.transforms import Augment, Preprocess
    from leukoscope.train.stem_cache import StemCache, stem_key

    if cfg.recipe.stain != "none":
        raise ValueError(f"the study assumes no stain normalisation (stain={cfg.recipe.stain!r})")
    name = cfg.datasets[0]
    ds = load_dataset(name, root=cfg.roots.get(name), target="cell_type")
    net, source = build_network(cfg.spec(), len(ds.classes), cfg.recipe.pretrained)
    mean, std = mean_std(cfg.recipe.backbone)
    pre = Preprocess(cfg.recipe.input_size, tuple(mean), tuple(std), cfg.recipe.denoise, None)
    aug = Augment(**cfg.recipe.augment)
    cache = StemCache(cache_root(cfg.cache_dir) / "stem" / f"{stem_key(cfg.spec(), source, pre, aug, cfg.seed)}.pt")
    feats, ok, failed = cache.compute(net._stem, ds.samples, views, pre, aug, cfg.seed, desc="stem features")
    del cache
    ds = ds.subset([ds.samples[i] for i in ok])
    index = {c: i for i, c in enumerate(ds.classes)}
    return CellData(ds, feats, np.array(ds.groups), np.array([s.labels["diagnosis"] == POSITIVE for s in ds.samples],
                                                             dtype=int),
                    np.array([index[s.label] for s in ds.samples]), failed,
                    copy_top(net.backbone.conv_head, net.backbone.bn2), source)


# ---------------------------------------------------------------------------------------------------------------------
# folds
# ---------------------------------------------------------------------------------------------------------------------
def patient_folds(patient_labels: dict[str, int], n_splits: int = 5, seed: int = 0) -> dict[str, int]:
    """Patient -> fold, stratified by diagnosis: every patient is in exactly one test fold."""
    names = sorted(patient_labels)
    y = np.array([patient_labels[p] for p in names])
    fold = np.empty(len(names), int)
    for k, (_, test) in enumerate(StratifiedKFold(n_splits, shuffle=True, random_state=seed).split(names, y)):
        fold[test] = k
    return dict(zip(names, fold.tolist(), strict=True))


def fold_indices(patients: np.ndarray, folds: dict[str, int], k: int) -> tuple[np.ndarray, np.ndarray]:
    """(train cell indices, test cell indices) of round ``k``."""
    f = np.array([folds[p] for p in patients])
    return np.flatnonzero(f != k), np.flatnonzero(f == k)


def inner_validation(patient_labels: dict[str, int], train_patients: list[str], frac: float = 0.15,
                     seed: int = 0) -> list[str]:
    """A diagnosis-stratified share of the training patients for early stopping and temperature scaling."""
    rng = np.random.default_rng(seed)
    val = []
    for label in (0, 1):
        group = sorted(p for p in train_patients if patient_labels[p] == label)
        val += list(rng.choice(group, max(1, round(frac * len(group))), replace=False))
    return sorted(val)


def fold_split(data: CellData, folds: dict[str, int], k: int, seed: int = 0) -> Split:
    """A holdout :class:`Split` for ``leukoscope.train``: test = fold ``k``, val = inner validation patients."""
    labels = data.patient_labels()
    train_patients = sorted(p for p, f in folds.items() if f != k)
    val = set(inner_validation(labels, train_patients, seed=seed + k))
    parts: dict[str, list[str]] = {"train": [], "val": [], "test": []}
    for s in data.ds.samples:
        part = "test" if folds[s.group] == k else ("val" if s.group in val else "train")
        parts[part].append(data.ds.relpath(s))
    return Split(data.ds.name, "cell_type", "holdout", seed, parts, {"fold": k, "n_folds": len(set(folds.values()))})


# ---------------------------------------------------------------------------------------------------------------------
# fold-wise CNNs (leukoscope.train on the fold's training patients)
# ---------------------------------------------------------------------------------------------------------------------
def train_fold_cnn(config_file: str | Path, split: Split, target: str, out: Path) -> Path:
    """Train (or reuse) the CNN of one fold for ``target`` (``cell_type`` or ``diagnosis``)."""
    from leukoscope.train.trainer import train

    out = Path(out)
    split_path = out.parent / f"split-{out.name}.json"
    split.save(split_path)
    done = out / "model.json"
    if done.exists() and json.loads((out / "split.json").read_text())["parts"] == split.parts:
        return out
    base = make_config(file=config_file)
    cfg = make_config({"split": str(split_path), "target": target, "name": f"{base.name}-{out.name}"}, file=config_file)
    log.info("training %s", out)
    train(cfg, out, progress=False)
    return out


@torch.inference_mode()
def cnn_on_stem(model_dir: str | Path, stem: torch.Tensor, batch_size: int = 256) -> tuple[np.ndarray, np.ndarray]:
    """A cached-stem CNN (``trainable_stages: 0``) applied to stem features: (calibrated probabilities, embeddings)."""
    m = load_model(model_dir, backend="torch")
    if m.info["spec"].get("trainable_stages") != 0:
        raise ValueError(f"{model_dir}: cnn_on_stem needs trainable_stages 0, got {m.info['spec']}")
    probs, embs = [], []
    for i in range(0, len(stem), batch_size):
        f = m.module.top(stem[i:i + batch_size].float())
        embs.append(f.flatten(1).numpy())
        probs.append(softmax(m.module.head(f).numpy() / m.temperature))
    return np.concatenate(probs), np.concatenate(embs)


# ---------------------------------------------------------------------------------------------------------------------
# aggregation methods: each returns a PatientModel fitted on the training patients
# ---------------------------------------------------------------------------------------------------------------------
def _scaler(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    return x.mean(0), np.maximum(x.std(0), 1e-6)


def bags_of(patients: np.ndarray, x: np.ndarray, names: list[str]) -> list[np.ndarray]:
    return [x[patients == p] for p in names]


def fit_mean_lr(emb: np.ndarray, y_cell: np.ndarray, top: torch.nn.Module, c: float = 0.01) -> PatientModel:
    """(a) a logistic regression per cell on standardised embeddings; the patient gets the mean probability."""
    mean, scale = _scaler(emb)
    lr = LogisticRegression(C=c, class_weight="balanced", max_iter=2000).fit((emb - mean) / scale, y_cell)
    linear = np.concatenate([lr.coef_[0], lr.intercept_])
    return PatientModel("apl", None, "mean", {"cell_classifier": f"logistic regression (C={c}, balanced)"}, top, mean,
                        scale, linear=linear)


def mean_from_cnn(model_dir: str | Path, top_source: str = "cnn") -> PatientModel:
    """(a) a fine-tuned cell-level AML/APL CNN as a ``mean`` patient model: p_APL(cell) = sigmoid((z1 - z0) / T)."""
    m = load_model(model_dir, backend="torch")
    if m.classes != ["AML", "APL"]:
        raise ValueError(f"{model_dir} is not an AML/APL cell model (classes {m.classes})")
    lin = m.module.head[-1]
    w = (lin.weight[1] - lin.weight[0]).detach().numpy() / m.temperature
    b = float((lin.bias[1] - lin.bias[0]).detach()) / m.temperature
    top = copy_top(m.module.backbone.conv_head, m.module.backbone.bn2)
    return PatientModel("apl", None, "mean", {"cell_classifier": f"fine-tuned CNN head ({top_source})"}, top,
                        np.zeros(len(w)), np.ones(len(w)), linear=np.concatenate([w, [b]]))


def fit_proportions(props: np.ndarray, y: np.ndarray, top: torch.nn.Module, c: float = 1.0) -> PatientModel:
    """(b) logistic regression on per-patient mean cell-type probabilities (standardised)."""
    mean, scale = _scaler(props)
    lr = LogisticRegression(C=c, class_weight="balanced", max_iter=2000).fit((props - mean) / scale, y)
    return PatientModel("apl", None, "proportions", {"patient_classifier": f"logistic regression (C={c}, balanced)"},
                        top, mean, scale, linear=np.concatenate([lr.coef_[0], lr.intercept_]))


def fit_mil_model(bags: list[np.ndarray], y: np.ndarray, top: torch.nn.Module, cfg: MILConfig = MILConfig(),
                  views: list[np.ndarray] | None = None) -> PatientModel:
    """(c) gated-attention MIL on standardised cell embeddings (scaler fitted on the training cells)."""
    mean, scale = _scaler(np.concatenate(bags))
    std_bags = [((b - mean) / scale).astype(np.float32) for b in bags]
    std_views = None if views is None else [((v - mean) / scale).astype(np.float32) for v in views]
    mil = fit_mil(std_bags, y, cfg, std_views)
    return PatientModel("apl", None, "mil", {"mil_config": cfg.to_dict()}, top, mean, scale, mil=mil)


# ---------------------------------------------------------------------------------------------------------------------
# the study
# ---------------------------------------------------------------------------------------------------------------------
def operating_point(p_val: np.ndarray, y_val: np.ndarray, target_sensitivity: float = 0.95) -> float:
    """The highest threshold that keeps sensitivity >= target on the validation cells."""
    pos = np.sort(np.asarray(p_val)[np.asarray(y_val) == 1])
    if not len(pos):
        raise ValueError("no positive cells to choose an operating point on")
    k = int(np.floor((1 - target_sensitivity) * len(pos) + 1e-9))
    return float(pos[min(k, len(pos) - 1)])


def sens_spec(p: np.ndarray, y: np.ndarray, t: float) -> tuple[float, float]:
    p, y = np.asarray(p), np.asarray(y).astype(bool)
    return float((p[y] >= t).mean()) if y.any() else float("nan"), float((p[~y] < t).mean()) if (~y).any() else \
        float("nan")


def patient_metrics(names: list[str], y: dict[str, int], p: dict[str, float], threshold: float = 0.5,
                    n_boot: int = 1000) -> dict:
    yt = np.array([y[n] for n in names])
    pp = np.array([p[n] for n in names])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return binary_metrics(yt, pp, threshold=threshold, n_boot=n_boot, seed=0)


def youden_threshold(y: np.ndarray, score: np.ndarray) -> float:
    """The score threshold (``score >= t`` is APL) with the largest sensitivity + specificity."""
    from sklearn.metrics import roc_curve

    fpr, tpr, thr = roc_curve(np.asarray(y).astype(int), np.asarray(score, dtype=float))
    j = tpr - fpr
    return float(np.clip(thr[int(np.argmax(j))], 0.0, 1.0))


@dataclass
class Method:
    """A way from cells to a patient: ``fit(train patient names) -> PatientModel``, and the per-cell inputs
    (embedding, cell-type probabilities) its ``score`` reads."""

    fit: Callable[[list[str]], PatientModel]
    emb: np.ndarray
    cell_p: np.ndarray

    def scores(self, pm: PatientModel, patients: np.ndarray, names: list[str]) -> dict[str, float]:
        return {p: pm.score(self.emb[patients == p], self.cell_p[patients == p]).p_apl for p in names}


def inner_threshold(method: Method, patients: np.ndarray, labels: dict[str, int], train_names: list[str],
                    n_inner: int = 4, seed: int = 0) -> float:
    """Youden threshold from an inner CV over the training patients only."""
    inner = patient_folds({p: labels[p] for p in train_names}, n_inner, seed=seed)
    sc: dict[str, float] = {}
    for k in range(n_inner):
        fit_on = [p for p in train_names if inner[p] != k]
        sc.update(method.scores(method.fit(fit_on), patients, [p for p in train_names if inner[p] == k]))
    return youden_threshold(np.array([labels[p] for p in train_names]), np.array([sc[p] for p in train_names]))


def run_cv(data: CellData, config_file: str | Path, work: Path, n_splits: int = 5, repeats: int = 1,
           cnn_repeats: int = 1, mil_cfg: MILConfig = MILConfig(), use_views: bool = True,
           diagnosis_cnn: bool = False, inner_thresholds: bool = True) -> dict:
    """Patient-level CV of every method. Returns out-of-fold patient scores, metrics and the cell-level results.

    CNN-based methods (fold-wise ``leukoscope.train`` runs) use the first ``cnn_repeats`` repeats; methods on the
    frozen ImageNet embedding use all ``repeats``. ``diagnosis_cnn`` adds (a) with a fold-wise fine-tuned cell-level
    AML/APL CNN head (five more training runs per repeat). With ``inner_thresholds`` each method of repeat 0 also
    gets a threshold from an inner 4-fold CV of each outer fold's training patients (Youden), so that its
    sensitivity and specificity there are measured at a threshold chosen without the test patients.
    """
    work = Path(work)
    labels = data.patient_labels()
    names = sorted(labels)
    pts = data.patients
    n_classes = len(data.ds.classes)
    emb_in = pooled(data.imagenet_top, data.stem[:, 0])  # (N, 1280) frozen ImageNet embedding, view 0
    views_in = None
    if use_views and data.stem.shape[1] > 1:
        views_in = np.stack([pooled(data.imagenet_top, data.stem[:, v]) for v in range(data.stem.shape[1])], 1)
    no_cells = np.zeros((len(pts), 1))
    onehot = np.eye(n_classes)[data.cell_type]

    def y_of(ps: list[str]) -> np.ndarray:
        return np.array([labels[p] for p in ps])

    def frozen_methods() -> dict[str, Method]:
        def cells_of(ps: list[str]) -> np.ndarray:
            return np.isin(pts, ps)

        return {
            # (a) cell-level logistic regression on the frozen ImageNet embedding, mean over cells
            "mean_lr_imagenet": Method(lambda ps: fit_mean_lr(emb_in[cells_of(ps)], data.diagnosis[cells_of(ps)],
                                                              data.imagenet_top), emb_in, no_cells),
            # (c) gated-attention MIL on the frozen ImageNet embedding
            "mil_imagenet": Method(lambda ps: fit_mil_model(
                bags_of(pts, emb_in, ps), y_of(ps), data.imagenet_top, mil_cfg,
                None if views_in is None else bags_of(pts, views_in, ps)), emb_in, no_cells),
        }

    def fold_methods(ct_p: np.ndarray, ct_emb: np.ndarray) -> dict[str, Method]:
        def props(x: np.ndarray, ps: list[str]) -> np.ndarray:
            return np.stack([x[pts == p].mean(0) for p in ps])

        return {
            # (b) proportions of the fold's cell-type CNN -> logistic regression
            "proportions_cnn": Method(lambda ps: fit_proportions(props(ct_p, ps), y_of(ps), data.imagenet_top),
                                      emb_in, ct_p),
            # (b, reference) proportions of the annotators' labels: what (b) could reach with a perfect cell-type
            # model on this sample of cells (sampling-distorted; see docs/DIAGNOSE.md)
            "proportions_true_labels": Method(lambda ps: fit_proportions(props(onehot, ps), y_of(ps),
                                                                         data.imagenet_top), emb_in, onehot),
            # (c') gated-attention MIL on the fold's cell-type CNN embedding
            "mil_celltype": Method(lambda ps: fit_mil_model(bags_of(pts, ct_emb, ps), y_of(ps), data.imagenet_top,
                                                            mil_cfg), ct_emb, ct_p),
        }

    oof: dict[str, list[dict[str, float]]] = {}
    thresholds: dict[str, dict[str, float]] = {}  # method -> patient -> inner-CV threshold of its outer fold
    cell_oof = np.zeros((len(pts), n_classes))
    blast: dict = {"per_fold": []}
    blast_test: list[tuple[np.ndarray, ...]] = []
    fold_docs = []
    for r in range(repeats):
        folds = patient_folds(labels, n_splits, seed=r)
        fold_docs.append(folds)
        scores: dict[str, dict[str, float]] = {}
        for k in range(n_splits):
            tr, te = fold_indices(pts, folds, k)
            if set(pts[tr]) & set(pts[te]):
                raise AssertionError(f"fold {k}: patients on both sides")
            tr_names, te_names = sorted(set(pts[tr])), sorted(set(pts[te]))
            methods = frozen_methods()
            if r < cnn_repeats:
                split = fold_split(data, folds, k, seed=r)
                ct_dir = train_fold_cnn(config_file, split, "cell_type", work / f"r{r}-cell_type-fold{k}")
                ct_p, ct_emb = cnn_on_stem(ct_dir, data.stem[:, 0])
                cell_oof[te] = ct_p[te]
                _blast_fold(data, split, ct_p, te, r, k, blast, blast_test)
                methods.update(fold_methods(ct_p, ct_emb))
                if diagnosis_cnn:
                    # (a) fine-tuned cell-level AML/APL CNN head (fold-wise), mean over cells
                    dx_dir = train_fold_cnn(config_file, split, "diagnosis", work / f"r{r}-diagnosis-fold{k}")
                    _, dx_emb = cnn_on_stem(dx_dir, data.stem[:, 0])
                    dx_pm = mean_from_cnn(dx_dir)
                    methods["mean_cnn"] = Method(lambda ps, _pm=dx_pm: _pm, dx_emb, ct_p)
            for name, m in methods.items():
                scores.setdefault(name, {}).update(m.scores(m.fit(tr_names), pts, te_names))
                if r == 0 and inner_thresholds and name != "mean_cnn":
                    t = inner_threshold(m, pts, labels, tr_names, seed=k)
                    thresholds.setdefault(name, {}).update({p: t for p in te_names})
            log.info("repeat %d fold %d done", r, k)
        for method, sc in scores.items():
            oof.setdefault(method, []).append(sc)

    results: dict = {"n_patients": len(names), "n_apl": int(sum(labels.values())), "n_cells": int(len(pts)),
                     "n_splits": n_splits, "repeats": repeats, "cnn_repeats": cnn_repeats,
                     "mil_config": mil_cfg.to_dict(), "methods": {}, "folds": fold_docs}
    for method, runs in oof.items():
        per_repeat = [patient_metrics(names, labels, sc, n_boot=1000 if i == 0 else 0) for i, sc in enumerate(runs)]
        aucs = [m["auc"] for m in per_repeat]
        entry = {"repeat0": per_repeat[0], "auc_repeats": aucs, "auc_mean": float(np.mean(aucs)),
                 "auc_sd": float(np.std(aucs)), "oof_repeat0": runs[0]}
        if method in thresholds:
            t = thresholds[method]
            called = {p: int(runs[0][p] >= t[p]) for p in names}
            y = np.array([labels[p] for p in names]).astype(bool)
            c = np.array([called[p] for p in names]).astype(bool)
            entry["inner_threshold"] = {"sensitivity": float(c[y].mean()), "specificity": float((~c[~y]).mean()),
                                        "thresholds_per_fold": sorted(set(t.values()))}
        results["methods"][method] = entry
    if blast_test:
        results["cell_type_oof"] = multiclass_metrics(data.cell_type, cell_oof, data.ds.classes, n_boot=200,
                                                      groups=list(pts))
        pb, yb, tb, gb = (np.concatenate(x) for x in zip(*blast_test, strict=True))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            auc = binary_metrics(yb.astype(int), pb, n_boot=200, groups=list(gb))
        blast.update({"pooled_test_sensitivity": float((pb[yb] >= tb[yb]).mean()),
                      "pooled_test_specificity": float((pb[~yb] < tb[~yb]).mean()), "n_blasts": int(yb.sum()),
                      "n_other": int((~yb).sum()), "auc": auc["auc"], "auc_ci_low": auc["auc_ci_low"],
                      "auc_ci_high": auc["auc_ci_high"]})
        results["blast_oof"] = blast
    return results


def _blast_fold(data: CellData, split: Split, ct_p: np.ndarray, te: np.ndarray, r: int, k: int, blast: dict,
                blast_test: list) -> None:
    """Blast vs rest in one fold: operating point on the inner validation patients, applied to the test fold."""
    bi = data.ds.classes.index(BLAST)
    val_paths = set(split.parts["val"])
    val_idx = np.array([i for i, smp in enumerate(data.ds.samples) if data.ds.relpath(smp) in val_paths])
    t = operating_point(ct_p[val_idx, bi], data.cell_type[val_idx] == bi)
    s, sp = sens_spec(ct_p[te, bi], data.cell_type[te] == bi, t)
    blast["per_fold"].append({"repeat": r, "fold": k, "threshold": t, "test_sensitivity": s, "test_specificity": sp,
                              "n_val_blasts": int((data.cell_type[val_idx] == bi).sum())})
    blast_test.append((ct_p[te, bi], data.cell_type[te] == bi, np.full(len(te), t), data.patients[te]))
