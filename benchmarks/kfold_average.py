"""ALL-IDB2 source-field k-fold runs of ``cnn_targets.py`` (same folds, e.g. other seeds or recipes), and the average
of their P(leukemic) per crop.

    python benchmarks/cnn_targets.py --idb2-kfold 5 --kfold-only --kfold-val all --set seed=K --json runs/kfold_sK.json
    python benchmarks/kfold_average.py benchmarks/results/idb2_kfold_crops_shipped.json runs/kfold_s1.json ... \
        --out benchmarks/results/idb2_kfold_seed_average.json

Each run's ``crops`` hold the calibrated P(leukemic) of every test crop of every fold. The runs must cover the same
crops with the same labels (checked). For each run and for the average of all of them: pooled accuracy at 0.5 and the
wrong crops. Nothing is chosen among the runs.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def crops_of(path: Path) -> dict[str, dict]:
    kf = json.loads(path.read_text())["all_idb2_kfold"]
    out = {}
    for fold in kf["folds"]:
        for c in fold["crops"]:
            out[c["image"]] = {"label": c["label"], "p": c["p_leukemic"], "fold": fold["fold"]}
    return out


def score(p: dict[str, float], labels: dict[str, str]) -> dict:
    wrong = sorted(k for k, v in p.items() if (v >= 0.5) != (labels[k] == "leukemic"))
    return {"n": len(p), "accuracy": 1 - len(wrong) / len(p), "errors": len(wrong),
            "missed_leukemic": sum(labels[k] == "leukemic" for k in wrong),
            "flagged_healthy": sum(labels[k] != "leukemic" for k in wrong), "wrong": wrong}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("runs", nargs="+", type=Path, help="cnn_targets.py --idb2-kfold --kfold-only results files")
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    runs = {str(r): crops_of(r) for r in args.runs}
    first = next(iter(runs.values()))
    labels = {k: v["label"] for k, v in first.items()}
    for name, c in runs.items():
        if {k: v["label"] for k, v in c.items()} != labels or any(c[k]["fold"] != first[k]["fold"] for k in c):
            raise SystemExit(f"{name}: other crops, labels or folds than {args.runs[0]}")
    rows = {name: score({k: v["p"] for k, v in c.items()}, labels) for name, c in runs.items()}
    avg = {k: sum(c[k]["p"] for c in runs.values()) / len(runs) for k in labels}
    rows["average"] = score(avg, labels)
    print("| run | accuracy | errors (missed leukemic / flagged healthy) |")
    print("|---|---|---|")
    for name, r in rows.items():
        print(f"| {Path(name).name} | {r['accuracy']:.4f} | {r['errors']} ({r['missed_leukemic']} / "
              f"{r['flagged_healthy']}) |")
    if args.out:
        args.out.write_text(json.dumps({"runs": [str(r) for r in args.runs], "results": rows,
                                        "p_average": {k: round(v, 4) for k, v in avg.items()}}, indent=1))


if __name__ == "__main__":
    main()
