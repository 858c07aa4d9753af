"""Classical baselines (handcrafted features + Random Forest / calibrated RBF SVM) with group 5-fold CV.

Tasks: Aria healthy vs ALL and its 4 subtypes (groups: blocks of neighbouring image numbers), ALL-IDB2 blast vs
normal (groups: source field), DeepAPL cell types (groups: patient). Out-of-fold predictions of all folds are pooled;
95% CIs come from a bootstrap over groups. Prints a markdown table and writes JSON.

    nice -n 10 python benchmarks/classical_baselines.py            # all tasks, rf and svm
    python benchmarks/classical_baselines.py --tasks all_idb2 --models rf
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from leukoscope.data.datasets import load_dataset
from leukoscope.data.splits import group_kfold, groups_on_both_sides
from leukoscope.evaluate.metrics import binary_metrics, multiclass_metrics
from leukoscope.research.classical import FEATURE_NAMES, FEATURE_VERSION, ClassicalConfig, cross_validate_classical

OUT = Path(__file__).resolve().parent / "results" / "classical_baselines.json"


@dataclass(frozen=True)
class Task:
    name: str
    dataset: str
    target: str | None


TASKS = {
    "aria_binary": Task("aria_binary", "aria", "binary"),
    "aria_subtype": Task("aria_subtype", "aria", "subtype"),
    "all_idb2": Task("all_idb2", "all_idb2", "binary"),
    "deepapl_cell_type": Task("deepapl_cell_type", "deepapl", "cell_type"),
}


def _group_bootstrap(y: np.ndarray, proba: np.ndarray, groups: list[str], stat, n_boot: int = 1000, seed: int = 0
                     ) -> tuple[float, float]:
    """Percentile 95% CI of ``stat(y, proba)`` resampling whole groups."""
    rng = np.random.default_rng(seed)
    g = np.asarray(groups)
    units = [np.flatnonzero(g == u) for u in np.unique(g)]
    vals = []
    for _ in range(n_boot):
        idx = np.concatenate([units[i] for i in rng.integers(0, len(units), len(units))])
        v = stat(y[idx], proba[idx])
        if np.isfinite(v):
            vals.append(v)
    return (float(np.quantile(vals, 0.025)), float(np.quantile(vals, 0.975))) if vals else (np.nan, np.nan)


def _accuracy(y: np.ndarray, p: np.ndarray) -> float:
    return float((p.argmax(1) == y).mean())


def _macro_f1(y: np.ndarray, p: np.ndarray) -> float:
    from sklearn.metrics import f1_score

    return float(f1_score(y, p.argmax(1), average="macro", labels=np.unique(y)))


def _binary_f1(y: np.ndarray, p: np.ndarray) -> float:
    from sklearn.metrics import f1_score

    return float(f1_score(y, (p[:, 1] >= 0.5).astype(int), zero_division=np.nan))


def summarise(res: dict) -> dict:
    y, proba, groups, classes = res["y_true"], res["proba"], res["groups"], res["classes"]
    binary = len(classes) == 2
    if binary:
        m = binary_metrics(y, proba[:, 1], groups=groups)
        row = {k: m[k] for k in ("accuracy", "precision", "recall", "specificity", "f1", "auc", "auc_ci_low",
                                 "auc_ci_high")}
        f1_stat = _binary_f1
    else:
        m = multiclass_metrics(y, proba, classes, groups=groups)
        row = {"accuracy": m["accuracy"], "precision": m["macro"]["precision"], "recall": m["macro"]["recall"],
               "specificity": m["macro"]["specificity"], "f1": m["macro"]["f1"], "auc": m["auc"],
               "auc_ci_low": m["auc_ci_low"], "auc_ci_high": m["auc_ci_high"], "per_class": m["per_class"]}
        f1_stat = _macro_f1
    row["accuracy_ci_low"], row["accuracy_ci_high"] = _group_bootstrap(y, proba, groups, _accuracy)
    row["f1_ci_low"], row["f1_ci_high"] = _group_bootstrap(y, proba, groups, f1_stat)
    row["averaging"] = "binary (positive = leukemic)" if binary else "macro over classes"
    return row


def run(task: Task, kinds: list[str], folds: int, seed: int, config: ClassicalConfig) -> list[dict]:
    ds = load_dataset(task.dataset, target=task.target)
    split = group_kfold(ds, folds, seed=seed)
    leaks = groups_on_both_sides(ds, split)
    if leaks:
        raise SystemExit(f"{task.name}: split leaks groups {list(leaks)[:5]}")
    rows = []
    for kind in kinds:
        t0 = time.perf_counter()
        res = cross_validate_classical(ds, split, kind, config=config)
        wall = time.perf_counter() - t0
        row = {"task": task.name, "dataset": task.dataset, "target": ds.target, "model": kind,
               "n_images": int(len(res["y_true"])), "n_groups": len(set(res["groups"])), "n_classes": len(ds.classes),
               "group_by": ds.group_by, "folds": folds, "seed": seed, **summarise(res),
               "fit_time_s_total": res["fit_time_s"], "fit_time_s_per_fold": res["fit_time_s_per_round"],
               "infer_images_per_s": res["infer_images_per_s"], "predict_images_per_s": res["predict_images_per_s"],
               "feature_extraction_s": res["feature_extraction_s"], "wall_s": wall,
               "failed": res["failed"], "best_params": res["best_params"]}
        rows.append(row)
        print(f"  {task.name:18s} {kind:3s} acc {row['accuracy']:.3f} auc {row['auc']:.3f} "
              f"({wall:.0f} s)", file=sys.stderr, flush=True)
    return rows


def fmt_ci(v: float, lo: float, hi: float) -> str:
    return f"{v:.3f} [{lo:.3f}, {hi:.3f}]"


def table(rows: list[dict]) -> str:
    head = ("| task | model | n img / groups | accuracy [95% CI] | precision | recall | specificity | F1 [95% CI] "
            "| AUC [95% CI] | fit s (5 folds) | infer img/s |")
    lines = [head, "|" + "---|" * 11]
    for r in rows:
        lines.append(
            f"| {r['task']} | {r['model']} | {r['n_images']} / {r['n_groups']} | "
            f"{fmt_ci(r['accuracy'], r['accuracy_ci_low'], r['accuracy_ci_high'])} | {r['precision']:.3f} | "
            f"{r['recall']:.3f} | {r['specificity']:.3f} | {fmt_ci(r['f1'], r['f1_ci_low'], r['f1_ci_high'])} | "
            f"{fmt_ci(r['auc'], r['auc_ci_low'], r['auc_ci_high'])} | {r['fit_time_s_total']:.1f} | "
            f"{r['infer_images_per_s']:.1f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tasks", nargs="+", default=list(TASKS), choices=list(TASKS))
    p.add_argument("--models", nargs="+", default=["rf", "svm"], choices=["rf", "svm"])
    p.add_argument("--folds", type=int, default=5)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--n-jobs", type=int, default=1)
    p.add_argument("--out", type=Path, default=OUT)
    args = p.parse_args(argv)
    config = ClassicalConfig(n_jobs=args.n_jobs, seed=args.seed)
    rows = []
    for name in args.tasks:
        rows += run(TASKS[name], args.models, args.folds, args.seed, config)
    print(table(rows))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    doc = {"command": " ".join([Path(sys.argv[0]).name, *(argv if argv is not None else sys.argv[1:])]),
           "feature_version": FEATURE_VERSION, "n_features": len(FEATURE_NAMES),
           "config": {"n_estimators": config.n_estimators, "svm_C": config.svm_C, "svm_gamma_x_1_over_n_features":
                      config.svm_gamma, "inner_splits": config.inner_splits, "seed": config.seed},
           "machine": {"python": platform.python_version(), "processor": platform.processor() or platform.machine()},
           "notes": "group k-fold, out-of-fold predictions pooled; CIs: 1000-sample bootstrap over groups; "
                    "precision/recall/specificity/F1 are binary (positive = leukemic) or macro averages; "
                    "infer img/s is end to end (read, segment, features, predict) on up to 32 images per fold, "
                    "one process", "results": rows}
    args.out.write_text(json.dumps(doc, indent=1, default=float))
    print(f"\nwrote {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
