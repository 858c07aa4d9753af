"""C-NMC 2019 cells that leukemia-cell models did not train on, model against model, with paired uncertainty.

    python benchmarks/cnmc_heldout.py leukemia-cell runs/other-recipe runs/other-seed --json out.json
    python benchmarks/cnmc_heldout.py leukemia-cell runs/x --smear-background     # also with the black replaced

The C-NMC copy here is small (238 cells); the validation + test parts of a leukemia-cell split hold 114 of them, 19
healthy. For each model: accuracy, sensitivity, specificity (leukemic = positive, threshold 0.5) and ROC AUC over
those cells, and against the first model: the AUC difference with a 95 % bootstrap CI over cells (paired: the same
resampled cells for both) and the discordant pairs (cells only one of the two gets right; McNemar's exact p). Every
model must have been trained on the same split (its ``split.json``), or the cells would differ; this is checked.

``--smear-background`` scores the same cells again with the black surround replaced by a smear-like background
(:func:`leukoscope.preprocess.background.replace_background`, seeded): how much a model's answer rests on the black.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
from scipy.stats import binomtest
from sklearn.metrics import roc_auc_score

from leukoscope.data.datasets import load_dataset
from leukoscope.data.images import read_image
from leukoscope.evaluate.metrics import binary_metrics
from leukoscope.models import load_model
from leukoscope.preprocess.background import replace_background


def heldout_cells(model_path: Path, names: set[str]) -> list[str]:
    parts = json.loads((model_path / "split.json").read_text())["parts"]
    return sorted({Path(p).name for q in ("val", "test") for p in parts[q]} & names)


def paired(y: np.ndarray, base: np.ndarray, other: np.ndarray, n_boot: int = 2000, seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    diffs = []
    for _ in range(n_boot):
        i = rng.integers(0, len(y), len(y))
        if y[i].all() or not y[i].any():
            continue
        diffs.append(roc_auc_score(y[i], other[i]) - roc_auc_score(y[i], base[i]))
    right_b, right_o = (base >= 0.5) == y, (other >= 0.5) == y
    only_b, only_o = int((right_b & ~right_o).sum()), int((~right_b & right_o).sum())
    p = binomtest(only_b, only_b + only_o).pvalue if only_b + only_o else 1.0
    return {"auc_diff": float(roc_auc_score(y, other) - roc_auc_score(y, base)),
            "auc_diff_ci": [float(np.percentile(diffs, 2.5)), float(np.percentile(diffs, 97.5))],
            "only_first_right": only_b, "only_this_right": only_o, "mcnemar_p": float(p)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("models", nargs="+", help="model names or directories; the first is the reference")
    ap.add_argument("--smear-background", action="store_true")
    ap.add_argument("--json")
    args = ap.parse_args()

    ds = load_dataset("cnmc2019", target="binary")
    by_name = {s.path.name: s for s in ds.samples}
    models = [load_model(m) for m in args.models]
    cells = heldout_cells(Path(models[0].path), set(by_name))
    for m in models[1:]:
        if heldout_cells(Path(m.path), set(by_name)) != cells:
            raise SystemExit(f"{m.path} was trained on another split than {models[0].path}: its held-out cells differ")
    samples = [by_name[n] for n in cells]
    y = np.array([s.label == "leukemic" for s in samples])
    images = [read_image(s.path) for s in samples]
    variants = {"black": images}
    if args.smear_background:
        rng = np.random.default_rng(0)
        variants["smear background"] = [replace_background(im, rng) for im in images]

    command = "cnmc_heldout.py " + " ".join(args.models) + (" --smear-background" if args.smear_background else "")
    out: dict = {"cells": cells, "command": command, "results": {}}
    print(f"C-NMC 2019, validation + test parts of the split: {len(y)} cells, {int((~y).sum())} healthy")
    print("| model | images | accuracy | sensitivity | specificity | AUC | AUC - first [95 % CI] | "
          "only first / only this right (McNemar p) |")
    print("|---|---|---|---|---|---|---|---|")
    for variant, ims in variants.items():
        probs = [m.predict_arrays(ims)[:, m.classes.index("leukemic")] for m in models]
        for name, m, p in zip(args.models, models, probs, strict=True):
            r = binary_metrics(y, p)  # leukemic positive at p >= 0.5, AUC with its own bootstrap CI
            if m is not models[0]:
                r["vs_first"] = paired(y, probs[0], p)
            out["results"].setdefault(name, {})[variant] = r
            v = r.get("vs_first")
            cmp = "— | —" if v is None else (
                f"{v['auc_diff']:+.3f} [{v['auc_diff_ci'][0]:+.3f}, {v['auc_diff_ci'][1]:+.3f}] | "
                f"{v['only_first_right']} / {v['only_this_right']} ({v['mcnemar_p']:.3f})")
            print(f"| {name} | {variant} | {r['accuracy']:.3f} | {r['sensitivity']:.3f} | {r['specificity']:.3f} | "
                  f"{r['auc']:.3f} | {cmp} |")
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=1))
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
