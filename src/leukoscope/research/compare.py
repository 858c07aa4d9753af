"""Compare model families on one dataset and one group-level split: the CNN, the hybrid CNN-Transformer, the
handcrafted-feature Random Forest and SVM, and the SVM on frozen CNN embeddings.

Every model is tested on the same held-out groups (holdout) or the same group folds (``folds=K``, out-of-fold
predictions pooled). The split is saved in the output directory and recorded in the JSON.

- holdout: the neural models train on ``train`` and use ``val`` for early stopping and temperature calibration; the
  SVMs and the forest fit on ``train + val`` (the SVMs tune C / gamma and calibrate on group folds of it). All are
  scored on ``test``.
- k-fold: round k tests fold k; the classical models fit on the other folds; the neural models take a
  validation part out of the other folds by group (saved as ``splits/round{k}.json``).

Outputs in ``out``: ``split.json``, ``compare.md`` (the table), ``roc.png`` (every model's ROC curve on one plot;
macro-averaged one-vs-rest curves for more than two classes), ``compare.json`` (config, split, metrics, timings,
per-image test probabilities), and ``models/`` (the trained neural model directories).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import platform
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from leukoscope._registry import Registry
from leukoscope.data.datasets import Dataset, Sample, load_dataset
from leukoscope.data.splits import Split, assert_no_leak, group_kfold, group_split

log = logging.getLogger(__name__)

if TYPE_CHECKING:
    from leukoscope.research.classical import ClassicalConfig


def _classical_config(**kw: Any) -> ClassicalConfig:
    from leukoscope.research.classical import ClassicalConfig  # scikit-image and SciPy: imported when used

    return ClassicalConfig(**kw)


DEFAULT_MODELS = ("cnn", "hybrid", "rf", "svm", "cnn_svm")
NEURAL = ("cnn", "hybrid")
LABELS = {
    "cnn": "CNN (EfficientNet-Lite0, fine-tuned top)",
    "hybrid": "Hybrid CNN-Transformer",
    "rf": "Random Forest (handcrafted features)",
    "svm": "SVM (handcrafted features)",
    "cnn_svm": "SVM on frozen CNN embeddings",
}
TABLE_COLUMNS = ("Model", "Accuracy", "Precision", "Recall", "Specificity", "F1", "AUC (95% CI)", "Training time",
                 "Inference images/s")


@dataclass(frozen=True)
class CompareConfig:
    """One comparison.

    Attributes:
        dataset: registered dataset name.
        target: which label to predict (default: the dataset's own).
        root: dataset folder (default: the shared data location).
        models: which families to run, in table order (see :data:`COMPARE_MODELS`).
        folds: 0 for a holdout group split, K for stratified group K-fold.
        seed: seed of the split and of every model.
        test_size, val_size: fractions of the whole for the holdout split (the defaults are the training defaults,
            so a model trained with ``leukoscope train`` on the same dataset and seed sees the same split).
        split_file: use this saved split instead of making one.
        neural: :class:`~leukoscope.config.TrainConfig` overrides for both neural models (epochs, patience, ...).
        cnn, hybrid: overrides for one of them only (applied after ``neural``).
        embed_trainable_stages: which stem cache the embeddings read (default: the CNN's ``trainable_stages``).
        classical: settings of the forest and the SVMs.
        timing_images: images per round timed end to end for the classical models' images/s.
        n_boot: bootstrap samples (over groups) for the AUC confidence interval.
    """

    dataset: str
    target: str | None = None
    root: str | None = None
    models: tuple[str, ...] = DEFAULT_MODELS
    folds: int = 0
    seed: int = 0
    test_size: float = 0.2
    val_size: float = 0.15
    split_file: str = ""
    neural: dict = field(default_factory=dict)
    cnn: dict = field(default_factory=dict)
    hybrid: dict = field(default_factory=dict)
    embed_trainable_stages: int | None = None
    classical: ClassicalConfig = field(default_factory=lambda: _classical_config())
    timing_images: int = 32
    n_boot: int = 1000

    def __post_init__(self) -> None:
        object.__setattr__(self, "models", parse_models(self.models))
        if self.folds == 1 or self.folds < 0:
            raise ValueError(f"folds must be 0 (holdout) or at least 2, got {self.folds}")

    def train_overrides(self, name: str) -> dict:
        return {**self.neural, **getattr(self, name)}


@dataclass
class Round:
    """One train / (val) / test round of the comparison."""

    index: int
    train: list[Sample]
    val: list[Sample]
    test: list[Sample]
    split_file: Path  # holdout split (train / val / test) the neural models train on


@dataclass
class Context:
    config: CompareConfig
    ds: Dataset
    split: Split
    rounds: list[Round]
    out: Path
    progress: bool = False


COMPARE_MODELS: Registry[Callable[[Context, str], dict]] = Registry("model")


def parse_models(models: str | Sequence[str]) -> tuple[str, ...]:
    """``"cnn, rf"`` or ``["cnn", "rf"]`` -> ``("cnn", "rf")``; unknown names raise with the closest known name."""
    names = [m.strip() for m in (models.split(",") if isinstance(models, str) else models) if m.strip()]
    if not names:
        raise ValueError(f"no model names given; choose from {COMPARE_MODELS.names()}")
    for n in names:
        COMPARE_MODELS.get(n)  # "Unknown model 'rff'. Did you mean 'rf'? Available: [...]"
    return tuple(dict.fromkeys(names))


# ---------------------------------------------------------------------------------------------------------------------
# split and rounds
# ---------------------------------------------------------------------------------------------------------------------
def make_split(cfg: CompareConfig, ds: Dataset) -> Split:
    if cfg.split_file:
        split = Split.load(cfg.split_file)
    elif cfg.folds:
        split = group_kfold(ds, cfg.folds, cfg.seed)
    else:
        split = group_split(ds, cfg.test_size, cfg.val_size, cfg.seed)
    assert_no_leak(ds, split)
    return split


def make_rounds(cfg: CompareConfig, ds: Dataset, split: Split, out: Path) -> list[Round]:
    """Holdout: one round on ``split.json``. K-fold: round k tests fold k; a validation part for the neural models is
    taken out of the other folds by group and the round is saved as ``splits/round{k}.json``."""
    if split.kind == "holdout":
        parts = {p: split.subset(ds, p).samples if p in split.parts else [] for p in ("train", "val", "test")}
        if not parts["val"] and any(m in NEURAL for m in cfg.models):
            raise ValueError("the split has no validation part; the neural models need one (early stopping)")
        return [Round(0, parts["train"], parts["val"], parts["test"], out / "split.json")]
    if split.kind != "kfold":
        raise ValueError(f"split kind must be 'holdout' or 'kfold', got {split.kind!r}")
    rounds = []
    for k in range(split.n_folds):
        rest, test = split.fold(ds, k)
        rel = min(max(cfg.val_size / (1 - 1 / split.n_folds), 0.05), 0.5)
        inner = group_split(rest, test_size=rel, val_size=0.0, seed=cfg.seed + 100 + k)
        train, val = inner.subset(rest, "train").samples, inner.subset(rest, "test").samples
        path = out / "splits" / f"round{k}.json"
        Split(ds.name, ds.target, "holdout", cfg.seed, {"train": [ds.relpath(s) for s in train],
                                                        "val": [ds.relpath(s) for s in val],
                                                        "test": [ds.relpath(s) for s in test.samples]},
              {"from": "kfold", "fold": k, "n_folds": split.n_folds, "val_size_of_rest": rel}).save(path)
        rounds.append(Round(k, list(train), list(val), list(test.samples), path))
    return rounds


# ---------------------------------------------------------------------------------------------------------------------
# model families: each returns out-of-fold test probabilities and timings
# ---------------------------------------------------------------------------------------------------------------------
@COMPARE_MODELS.register("rf")
@COMPARE_MODELS.register("svm")
def _run_classical(ctx: Context, name: str) -> dict:
    from leukoscope.research.classical import cross_validate_classical

    return cross_validate_classical(ctx.ds, ctx.split, name, ctx.config.classical,
                                    timing_images=ctx.config.timing_images, progress=ctx.progress)


@COMPARE_MODELS.register("cnn_svm")
def _run_cnn_svm(ctx: Context, name: str) -> dict:
    from leukoscope.config import make_config
    from leukoscope.research.embed_svm import EmbedConfig, cross_validate_embed_svm

    cfg = ctx.config
    stages = cfg.embed_trainable_stages
    if stages is None:
        stages = make_config(cfg.train_overrides("cnn")).recipe.trainable_stages
    tc = make_config(cfg.train_overrides("cnn"))
    embed = EmbedConfig(backbone="efficientnet_lite0", trainable_stages=stages, input_size=tc.recipe.input_size,
                        seed=cfg.seed, cache_dir=tc.cache_dir)
    # train + val of a round is the whole training side: train + val of the holdout, the other folds of a k-fold
    rounds = [(r.train + r.val, r.test) for r in ctx.rounds]
    return cross_validate_embed_svm(ctx.ds, rounds, cfg.classical, embed, cfg.timing_images, ctx.progress)


@COMPARE_MODELS.register("cnn")
@COMPARE_MODELS.register("hybrid")
def _run_neural(ctx: Context, name: str) -> dict:
    from leukoscope.config import make_config
    from leukoscope.evaluate.run import model_logits
    from leukoscope.models.modeldir import load_model, softmax
    from leukoscope.train.trainer import train

    cfg, ds = ctx.config, ctx.ds
    probas, y_true, groups, paths, folds, fit_times, infer_rates, failed, rounds_info = ([] for _ in range(9))
    index = {c: i for i, c in enumerate(ds.classes)}
    for r in ctx.rounds:
        overrides = {**cfg.train_overrides(name), "name": f"{ds.name}-{ds.target}-{name}-round{r.index}",
                     "datasets": (ds.name,), "target": ds.target, "model": name, "split": str(r.split_file),
                     "seed": cfg.seed}
        if cfg.root:
            overrides["roots"] = {ds.name: cfg.root}
        tc = make_config(overrides)
        out = ctx.out / "models" / name / f"round{r.index}"
        t0 = time.perf_counter()
        res = train(tc, out, progress=ctx.progress)
        train_wall = time.perf_counter() - t0
        model = load_model(out)  # as `leukoscope predict` loads it (ONNX Runtime when available)
        if model.classes != ds.classes:
            raise RuntimeError(f"model classes {model.classes} differ from the dataset's {ds.classes}")
        test_ds = ds.subset(r.test)
        model_logits(model, ds.subset(r.test[:1]))  # warm-up, not timed
        t1 = time.perf_counter()
        logits, y, samples, bad = model_logits(model, test_ds)
        infer_rates.append(len(samples) / max(time.perf_counter() - t1, 1e-9))
        probas.append(softmax(logits / model.temperature))
        y_true += [index[s.label] for s in samples]
        groups += [s.group for s in samples]
        paths += [ds.relpath(s) for s in samples]
        folds += [r.index] * len(samples)
        failed += [{"path": p, "reason": why} for p, why in bad]
        training = res.metrics.get("training", {})
        fit_times.append(float(training.get("seconds", train_wall)))
        rounds_info.append({"model_dir": str(out), "epochs_run": training.get("epochs_run"),
                            "best_epoch": training.get("best_epoch"), "temperature": model.temperature,
                            "backend": model.backend, "train_wall_s": round(train_wall, 1),
                            "n_train": training.get("n_train"), "n_val": training.get("n_val")})
    return {
        "kind": name, "proba": np.concatenate(probas), "y_true": np.asarray(y_true, dtype=int), "groups": groups,
        "paths": paths, "fold": np.asarray(folds, dtype=int), "failed": failed,
        "fit_time_s": float(np.sum(fit_times)), "fit_time_s_per_round": fit_times,
        "infer_images_per_s": float(np.median(infer_rates)), "rounds": rounds_info,
        "train_config": {k: v for k, v in tc.to_dict().items() if k not in ("name", "split")},
    }


# ---------------------------------------------------------------------------------------------------------------------
# metrics, table, plot
# ---------------------------------------------------------------------------------------------------------------------
def summarize(run: dict, classes: Sequence[str], n_boot: int = 1000, seed: int = 0) -> dict:
    """The table's numbers for one model: binary metrics (positive = the second class) for two classes, macro
    averages and macro one-vs-rest AUC for more; the AUC CI resamples groups."""
    from leukoscope.evaluate.metrics import multiclass_metrics

    m = multiclass_metrics(run["y_true"], run["proba"], list(classes), n_boot=n_boot, seed=seed,
                           groups=run["groups"])
    src = m["binary"] if len(classes) == 2 else m["macro"]
    row = {k: float(src[k]) for k in ("precision", "recall", "specificity", "f1")}
    row.update(accuracy=float(m["accuracy"]), auc=float(m["auc"]), auc_ci_low=float(m["auc_ci_low"]),
               auc_ci_high=float(m["auc_ci_high"]), n=int(m["n"]), balanced_accuracy=float(m["macro"]["recall"]))
    return {"row": row, "metrics": m}


def _pct(v: float) -> str:
    return "n/a" if v is None or not np.isfinite(v) else f"{100 * v:.1f}"


def _secs(v: float) -> str:
    if not np.isfinite(v):
        return "n/a"
    return f"{v:.1f} s" if v < 120 else f"{v / 60:.1f} min"


def _rate(v: float) -> str:
    return "n/a" if not np.isfinite(v) else (f"{v:.0f}" if v >= 100 else f"{v:.1f}")


def markdown_table(result: dict) -> str:
    """The comparison table (metrics in %) followed by notes on the split and on what each column means."""
    lines = ["| " + " | ".join(TABLE_COLUMNS) + " |", "|" + "|".join(["---"] + ["---:"] * 8) + "|"]
    for name, r in result["models"].items():
        row = r["row"]
        auc = "n/a" if not np.isfinite(row["auc"]) else (
            f"{row['auc']:.3f} ({row['auc_ci_low']:.3f}-{row['auc_ci_high']:.3f})")
        lines.append("| " + " | ".join([LABELS.get(name, name), _pct(row["accuracy"]), _pct(row["precision"]),
                                        _pct(row["recall"]), _pct(row["specificity"]), _pct(row["f1"]), auc,
                                        _secs(r["fit_time_s"]), _rate(r["infer_images_per_s"])]) + " |")
    lines += ["", *[f"- {n}" for n in result["notes"]]]
    return "\n".join(lines) + "\n"


def _notes(result: dict) -> list[str]:
    s, classes = result["split"], result["classes"]
    if len(classes) == 2:
        avg = (f"Precision, recall (sensitivity), specificity and F1 are for the positive class {classes[1]!r} at "
               f"probability 0.5; AUC is its ROC AUC.")
    else:
        avg = (f"{len(classes)} classes: precision, recall, specificity and F1 are macro averages over the classes "
               "(unweighted; a class absent from the test part is left out), and AUC is the macro one-vs-rest AUC; "
               "the ROC plot shows macro-averaged one-vs-rest curves.")
    n = {name: r["row"]["n"] for name, r in result["models"].items()}
    notes = [f"Dataset {result['dataset']!r}, target {result['target']!r} ({', '.join(map(repr, classes))}); groups: "
             f"{result['group_by']}."]
    if s["kind"] == "holdout":
        notes.append(f"One stratified group holdout split (seed {s['seed']}): train {s['sizes']['train']} / val "
                     f"{s['sizes'].get('val', 0)} / test {s['sizes']['test']} images, {s['groups']['test']} test "
                     "groups, no group on two sides. Neural models train on train and use val for early stopping and "
                     "temperature calibration; the forest and the SVMs fit on train + val (the SVMs tune and calibrate "
                     "on group folds of it). All are scored on the same test images.")
    else:
        notes.append(f"Stratified group {s['n_folds']}-fold split (seed {s['seed']}); out-of-fold predictions of all "
                     "folds are pooled. Neural models take a validation part out of each round's training folds by "
                     "group.")
    notes.append(avg + " Accuracy, precision, recall, specificity and F1 in %.")
    notes.append("AUC 95% CI: percentile bootstrap over test groups (" + str(result["config"]["n_boot"]) +
                 " resamples).")
    notes.append("Training time: fitting only, summed over rounds (handcrafted features, CNN embeddings and the "
                 "stem-feature cache are computed once and cached; their time is in the JSON). Inference images/s: "
                 "end to end from the image file (read, preprocess, network or segmentation + features, classifier), "
                 "one process on this machine's shared CPUs; neural models and the embeddings run through ONNX Runtime "
                 "when available, timed over the test images (neural) or up to "
                 f"{result['config']['timing_images']} test images per round (others).")
    if len(set(n.values())) > 1:
        notes.append("Test images per model differ (unreadable files): " + ", ".join(f"{k} {v}" for k, v in n.items()))
    return notes


def write_roc_plot(result: dict, runs: dict[str, dict], path: Path) -> Path:
    """All models' ROC curves on one plot (binary: positive class; more classes: macro-averaged one-vs-rest)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from leukoscope.evaluate.metrics import roc_points

    classes = result["classes"]
    fig, ax = plt.subplots(figsize=(5.5, 5.0), dpi=120)
    grid = np.linspace(0, 1, 201)
    for name, run in runs.items():
        y, p = run["y_true"], run["proba"]
        if len(classes) == 2:
            fpr, tpr = roc_points(y, p[:, 1])
        else:
            curves = []
            for k in range(len(classes)):
                if 0 < (y == k).sum() < len(y):
                    f, t = roc_points((y == k).astype(int), p[:, k])
                    curves.append(np.interp(grid, f, t))
            fpr, tpr = grid, np.mean(curves, axis=0) if curves else np.full_like(grid, np.nan)
        auc = result["models"][name]["row"]["auc"]
        ax.plot(fpr, tpr, lw=1.6, label=f"{LABELS.get(name, name)} (AUC {auc:.3f})")
    ax.plot([0, 1], [0, 1], color="0.6", lw=0.8, ls="--")
    kind = f"positive class {classes[1]!r}" if len(classes) == 2 else "macro one-vs-rest"
    ax.set(xlabel="False positive rate", ylabel="True positive rate", xlim=(0, 1), ylim=(0, 1.01),
           title=f"{result['dataset']} ({result['target']}), {kind}")
    ax.title.set_fontsize(9)
    ax.legend(loc="lower right", fontsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path


def _jsonable(v: Any) -> Any:
    if isinstance(v, dict):
        return {str(k): _jsonable(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_jsonable(x) for x in v]
    if isinstance(v, np.ndarray):
        return _jsonable(v.tolist())
    if isinstance(v, (np.floating, float)):
        return None if not np.isfinite(v) else float(v)
    if isinstance(v, np.integer):
        return int(v)
    return v


# ---------------------------------------------------------------------------------------------------------------------
# the comparison
# ---------------------------------------------------------------------------------------------------------------------
def run_compare(config: CompareConfig, out: str | Path, json_file: str | Path | None = None,
                progress: bool = False) -> dict:
    """Train and evaluate every model of ``config.models`` on one split; write table, ROC plot and JSON.

    Args:
        out: output directory (split, table, plot, JSON, neural model directories).
        json_file: also write the JSON here, with the table (``<stem>.md``) and plot (``<stem>_roc.png``) beside it.

    Returns:
        The JSON document (``models[name]["row"]`` holds the table's numbers) plus ``markdown`` and ``paths``.
    """
    t_start = time.perf_counter()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    ds = load_dataset(config.dataset, root=config.root, target=config.target)
    split = make_split(config, ds)
    split_path = split.save(out / "split.json")
    rounds = make_rounds(config, ds, split, out)
    ctx = Context(config, ds, split, rounds, out, progress)

    part_of = split.part_of()
    groups_per_part: dict[str, set] = {p: set() for p in split.parts}
    for s in ds.samples:
        if ds.relpath(s) in part_of:
            groups_per_part[part_of[ds.relpath(s)]].add(s.group)
    result: dict = {
        "format": "leukoscope-compare/1", "dataset": ds.name, "target": ds.target, "classes": list(ds.classes),
        "group_by": ds.group_by, "n_images": len(ds),
        "config": {**dataclasses.asdict(config), "models": list(config.models)},
        "split": {"file": str(split_path), "kind": split.kind, "seed": split.seed, "params": split.params,
                  "n_folds": split.n_folds, "sizes": {k: len(v) for k, v in split.parts.items()},
                  "groups": {k: len(v) for k, v in groups_per_part.items()}, "parts": split.parts,
                  "round_files": [str(r.split_file) for r in rounds] if split.kind == "kfold" else []},
        "models": {},
    }
    runs: dict[str, dict] = {}
    for name in config.models:
        log.info("compare %s/%s: %s", ds.name, ds.target, name)
        t0 = time.perf_counter()
        run = COMPARE_MODELS.get(name)(ctx, name)
        wall = time.perf_counter() - t0
        runs[name] = run
        summary = summarize(run, ds.classes, config.n_boot, config.seed)
        extra = {k: v for k, v in run.items() if k not in ("proba", "y_true", "groups", "paths", "fold", "classes",
                                                            "dataset", "target", "kind")}
        result["models"][name] = {
            "label": LABELS.get(name, name), "row": summary["row"], "metrics": summary["metrics"],
            "fit_time_s": float(run["fit_time_s"]), "infer_images_per_s": float(run["infer_images_per_s"]),
            "wall_s": wall, **{k: v for k, v in extra.items() if k not in ("fit_time_s", "infer_images_per_s")},
            "predictions": {"paths": run["paths"], "fold": run["fold"], "y_true": run["y_true"],
                            "proba": np.round(run["proba"], 5)},
        }
        log.info("  %s: accuracy %.3f, AUC %.3f, fit %.1f s, %.1f s in all", name, summary["row"]["accuracy"],
                 summary["row"]["auc"], run["fit_time_s"], wall)
    result["notes"] = _notes(result)
    result["machine"] = {"python": platform.python_version(), "processor": platform.machine(),
                         "cpus": os.cpu_count()}
    result["wall_s"] = time.perf_counter() - t_start
    md = markdown_table(result)
    targets = [(out / "compare.json", out / "compare.md", out / "roc.png")]
    if json_file:
        j = Path(json_file)
        targets.append((j, j.with_suffix(".md"), j.with_name(f"{j.stem}_roc.png")))
    result["paths"] = {"json": [str(t[0]) for t in targets], "markdown": [str(t[1]) for t in targets],
                       "roc": [str(t[2]) for t in targets]}
    doc = _jsonable(result)
    for j, m, roc in targets:
        j.parent.mkdir(parents=True, exist_ok=True)
        j.write_text(json.dumps(doc, indent=1))
        m.write_text(md)
        write_roc_plot(result, runs, roc)
    result["markdown"] = md
    return result
