"""Healthy vs leukemic cell models on data they never saw: each source's held-out part, and each source held out whole.

    # the split parts of trained models (several seeds of one recipe), per source; --part val for choices
    python benchmarks/heldout_sources.py parts runs/ms_s0 runs/ms_s1 runs/ms_s2 --part val --json out.json
    # leave-one-source-out: train the config without source S (seeds 0 1 2), score every image of S
    python benchmarks/heldout_sources.py loso --config configs/leukemia-cell.yaml --hold-out pbc \
        --seeds 0 1 2 --json benchmarks/results/loso_leukemia-cell.json

For each source: n, AUC, sensitivity and specificity at the model's operating threshold (0.5 when it stores none),
and for a source of normal cells only (PBC) the share called leukemic. Several models of one recipe (seeds) are
summarised by their median, minimum and maximum: never the best alone.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

from leukoscope.config import make_config, parse_set
from leukoscope.data.datasets import load_dataset
from leukoscope.evaluate.metrics import binary_metrics
from leukoscope.evaluate.run import model_logits, select
from leukoscope.models import load_model
from leukoscope.models.modeldir import softmax


def source_metrics(model, ds, threshold: float | None = None) -> dict:
    """Per-image metrics of ``model`` on ``ds`` (binary target): AUC where both classes occur, else the share of the
    one class called the other."""
    logits, y, samples, failed = model_logits(model, ds)
    p = softmax(logits / model.temperature)[:, model.classes.index("leukemic")]
    t = model.info.get("threshold", 0.5) if threshold is None else threshold
    out: dict = {"n": int(len(y)), "n_leukemic": int(y.sum()), "threshold": float(t), "unreadable": len(failed)}
    if 0 < y.sum() < len(y):
        m = binary_metrics(y, p, threshold=t, n_boot=500)
        out |= {k: m[k] for k in ("auc", "auc_ci_low", "auc_ci_high", "sensitivity", "specificity", "accuracy")}
    elif y.sum() == 0:
        out["called_leukemic"] = float((p >= t).mean())
        if "pbc_group" in samples[0].labels:  # which normal types are mistaken
            out["called_leukemic_by_type"] = {
                g: float((p[[s.labels["pbc_group"] == g for s in samples]] >= t).mean())
                for g in sorted({s.labels["pbc_group"] for s in samples})}
    else:
        out["sensitivity"] = float((p >= t).mean())
    return out


def summarise(runs: list[dict]) -> dict:
    """Median, min and max over runs of every numeric metric, per source."""
    out: dict = {}
    for src in runs[0]:
        keys = [k for k, v in runs[0][src].items() if isinstance(v, (int, float)) and not isinstance(v, bool)]
        out[src] = {k: {"median": float(np.median([r[src][k] for r in runs])),
                        "min": float(min(r[src][k] for r in runs)), "max": float(max(r[src][k] for r in runs))}
                    for k in keys if all(k in r[src] for r in runs)}
    return out


def parts(args: argparse.Namespace) -> dict:
    runs = []
    for m in args.models:
        model = load_model(m)
        runs.append({src: source_metrics(model, select(model, src, args.part)) for src in model.info["datasets"]})
    return {"mode": "parts", "part": args.part, "models": args.models, "runs": runs, "summary": summarise(runs)}


def loso(args: argparse.Namespace) -> dict:
    from leukoscope.train.trainer import train

    base = make_config(parse_set(args.set), file=args.config)
    results = {}
    for held in args.hold_out:
        if held not in base.datasets:
            raise SystemExit(f"{held!r} is not among the config's datasets {list(base.datasets)}")
        rest = tuple(d for d in base.datasets if d != held)
        runs = []
        for seed in args.seeds:
            out = Path(args.runs) / f"loso_{held}_s{seed}"
            over = {"datasets": rest, "seed": seed, "name": f"loso-{held}"}
            if held == "cnmc2019":  # the only cells on black: without them cam_mask has nothing to learn from
                over["cam_mask"] = 0.0
            cfg = make_config(over | parse_set(args.set), file=args.config)
            t0 = time.time()
            if not (out / "model.json").exists():
                train(cfg, out, progress=False)
            model = load_model(str(out))
            ds = load_dataset(held, target=cfg.target)
            runs.append({held: source_metrics(model, ds) | {"seed": seed, "seconds": round(time.time() - t0, 1),
                                                            "cam_mask": cfg.recipe.cam_mask,
                                                            "input_size": model.input_size,  # after a cpu profile
                                                            "trained_on": model.info.get("trained_on")}})
            print(held, seed, json.dumps(runs[-1][held])[:300], flush=True)
        results[held] = {"trained_on": list(rest), "runs": [r[held] for r in runs], "summary": summarise(runs)[held]}
    return {"mode": "loso", "config": args.config, "set": args.set, "seeds": args.seeds, "held_out": results}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = ap.add_subparsers(dest="mode", required=True)
    p = sub.add_parser("parts", help="score trained models on a part of their own split, per source")
    p.add_argument("models", nargs="+")
    p.add_argument("--part", default="val", choices=["val", "test"])
    q = sub.add_parser("loso", help="leave one source out: train without it, score all of it")
    q.add_argument("--config", required=True)
    q.add_argument("--hold-out", nargs="+", required=True)
    q.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    q.add_argument("--set", nargs="*", default=[])
    q.add_argument("--runs", default="runs")
    for x in (p, q):
        x.add_argument("--json")
    args = ap.parse_args()
    res = parts(args) if args.mode == "parts" else loso(args)
    res["date"] = time.strftime("%Y-%m-%d")
    text = json.dumps(res, indent=1, default=float)
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(text)
    summary = res["summary"] if args.mode == "parts" else {k: v["summary"] for k, v in res["held_out"].items()}
    for src, m in summary.items():
        cells = [f"{k} {v['median']:.3f} [{v['min']:.3f}-{v['max']:.3f}]" for k, v in m.items()
                 if k in ("auc", "sensitivity", "specificity", "called_leukemic", "n")]
        print(f"{src:>10}: " + "; ".join(cells))


if __name__ == "__main__":
    main()
