"""Two or more training recipes side by side on the validation part of one split: each seed, the median and spread
over seeds, and each recipe's seed ensemble.

    # seeds of each recipe, all with split_seed 0 (the same validation images)
    leukoscope train --config configs/leukemia-cell-full.yaml --set seed=K split_seed=0 --out runs/full_sK
    python benchmarks/recipe_compare.py --recipe cached-stem src/leukoscope/weights/leukemia-cell runs/stem_s1 \
        runs/stem_s2 --recipe full-finetune runs/full_s0 runs/full_s1 runs/full_s2 \
        --json benchmarks/results/recipe_compare_leukemia-cell.json --doc docs/TRAINING.md

Only validation images are scored: this is where a recipe is chosen, and the test parts stay unseen. Per source: the
AUC where both classes occur, else the share of its (normal) cells called leukemic, at each model's stored
operating threshold (chosen on these same validation images, for every recipe alike). The rule that picks a recipe is
the one this project chose seeds by: the higher median over seeds of the mean per-source validation AUC (sources
with both classes), and, for a tie within 0.005, the lower median share of normal cells of a source of normal cells
only (PBC) called leukemic. The ensemble averages its members' calibrated probabilities; its threshold is the balanced
one on the same validation images; it costs one network per member at prediction.
"""

from __future__ import annotations

import argparse
import json
import re
import time
from pathlib import Path

import numpy as np

from leukoscope.evaluate.metrics import balanced_threshold, binary_metrics
from leukoscope.evaluate.run import model_logits, select
from leukoscope.models import load_model
from leukoscope.models.modeldir import softmax

MARK = "recipe-compare"


def val_probabilities(model_dir: str) -> tuple[dict, dict]:
    """Per source of the model: (P(leukemic), labels, paths) on its validation part; and the model's record."""
    model = load_model(model_dir)
    out = {}
    for src in model.info["datasets"]:
        logits, y, samples, _ = model_logits(model, select(model, src, "val"))
        p = softmax(logits / model.temperature)[:, model.classes.index("leukemic")]
        out[src] = (p, np.asarray(y), [str(s.path) for s in samples])
    record = {"model": str(model_dir), "threshold": model.info.get("threshold") or 0.5,
              "split_seed": json.loads((Path(model_dir) / "split.json").read_text()).get("seed"),
              "input_size": model.info["preprocess"]["size"], "trained_seconds": model.info.get("trained_seconds"),
              "trained_on": (model.info.get("trained_on") or {}).get("device")}
    return out, record


def score(probs: dict, threshold: float) -> dict:
    """Per source: AUC / sensitivity / specificity, or the share called leukemic; and the recipe rule's summary."""
    out = {}
    for src, (p, y, _) in probs.items():
        if 0 < y.sum() < len(y):
            m = binary_metrics(y, p, threshold=threshold, n_boot=0)
            out[src] = {"n": int(len(y)), "auc": m["auc"], "sensitivity": m["sensitivity"],
                        "specificity": m["specificity"]}
        else:
            out[src] = {"n": int(len(y)), ("called_leukemic" if y.sum() == 0 else "sensitivity"):
                        float((p >= threshold).mean())}
    aucs = [v["auc"] for v in out.values() if "auc" in v]
    normal = [v["called_leukemic"] for v in out.values() if "called_leukemic" in v]
    return {"sources": out, "mean_auc": float(np.mean(aucs)),
            "called_leukemic": float(np.mean(normal)) if normal else None}


def ensemble(members: list[dict]) -> dict:
    """Mean calibrated probability of the members, per source (the members must share the validation images)."""
    out = {}
    for src in members[0]:
        paths = members[0][src][2]
        if any(m[src][2] != paths for m in members):
            raise SystemExit(f"the members do not share their {src} validation images: train them with one split_seed")
        out[src] = (np.mean([m[src][0] for m in members], 0), members[0][src][1], paths)
    return out


def spread(values: list[float]) -> dict:
    return {"median": float(np.median(values)), "min": float(min(values)), "max": float(max(values))}


def compare(recipes: dict[str, list[str]]) -> dict:
    res = {}
    for name, dirs in recipes.items():
        probs, seeds = [], []
        for d in dirs:
            pr, rec = val_probabilities(d)
            probs.append(pr)
            seeds.append(rec | score(pr, rec["threshold"]))
        ens = ensemble(probs)
        y_all = np.concatenate([ens[s][1] for s in ens])
        p_all = np.concatenate([ens[s][0] for s in ens])
        t = balanced_threshold(y_all, p_all)
        srcs = seeds[0]["sources"]
        summary = {"mean_auc": spread([s["mean_auc"] for s in seeds])}
        if seeds[0]["called_leukemic"] is not None:
            summary["called_leukemic"] = spread([s["called_leukemic"] for s in seeds])
        for src in srcs:
            for k in srcs[src]:
                if k != "n":
                    summary[f"{src}.{k}"] = spread([s["sources"][src][k] for s in seeds])
        res[name] = {"seeds": seeds, "summary": summary,
                     "ensemble": {"members": len(dirs), "threshold": float(t)} | score(ens, t)}
    ranked = sorted(res, key=lambda r: (-round(res[r]["summary"]["mean_auc"]["median"] / 0.005),
                                        res[r]["summary"].get("called_leukemic", {}).get("median", 0)))
    return {"part": "val", "recipes": res, "chosen_by_rule": ranked[0],
            "rule": "median over seeds of the mean per-source validation AUC (ties within 0.005: the lower median "
                    "share of normal-only sources called leukemic)"}


def table(doc: dict, command: str) -> str:
    first = next(iter(doc["recipes"].values()))["seeds"][0]["sources"]
    srcs = list(first)
    head = ["recipe", "input", "seconds per model", "mean AUC"] + [
        f"{s} {'called leukemic' if 'called_leukemic' in first[s] else 'AUC'}" for s in srcs]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]

    def cell(v: dict) -> str:
        return f"{v['median']:.3f} ({v['min']:.3f}-{v['max']:.3f})"

    for name, r in doc["recipes"].items():
        first = r["seeds"][0]["sources"]
        keys = [f"{s}.{'called_leukemic' if 'called_leukemic' in first[s] else 'auc'}" for s in srcs]
        secs = spread([s["trained_seconds"] for s in r["seeds"] if s["trained_seconds"]])
        sizes = sorted({s["input_size"] for s in r["seeds"]})
        devices = sorted({str(s["trained_on"]) for s in r["seeds"]})
        lines.append(f"| {name}, {len(r['seeds'])} seeds | {'/'.join(map(str, sizes))} px | {secs['median']:.0f} "
                     f"({'/'.join(devices)}) | {cell(r['summary']['mean_auc'])} | "
                     + " | ".join(cell(r["summary"][k]) for k in keys) + " |")
        e = r["ensemble"]
        vals = [e["sources"][s].get("called_leukemic", e["sources"][s].get("auc")) for s in srcs]
        lines.append(f"| {name}, ensemble of {e['members']} | | x{e['members']} at prediction | {e['mean_auc']:.3f} | "
                     + " | ".join(f"{v:.3f}" for v in vals) + " |")
    n = {s: first[s]["n"] for s in srcs}
    return "\n".join([
        f"Validation images of split seed 0 (n per source: {', '.join(f'{s} {v}' for s, v in n.items())}); median "
        "(min-max) over seeds; normal-only sources: the share called leukemic at each model's operating threshold. "
        f"Rule: {doc['rule']}. By it: **{doc['chosen_by_rule']}**. "
        f"Source: `benchmarks/results/{Path(doc.get('json', 'recipe_compare.json')).name}`, made by `{command}`.",
        "", *lines])


def write_doc(doc_path: Path, text: str) -> None:
    page = doc_path.read_text()
    pat = re.compile(rf"<!-- {MARK} -->.*?<!-- /{MARK} -->", re.S)
    if not pat.search(page):
        raise SystemExit(f"{doc_path} has no <!-- {MARK} --> ... <!-- /{MARK} --> block")
    doc_path.write_text(pat.sub(lambda _: f"<!-- {MARK} -->\n{text}\n<!-- /{MARK} -->", page))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--recipe", nargs="+", action="append", required=True, metavar="NAME DIR",
                    help="a recipe's name and its model directories (one per seed); repeat for each recipe")
    ap.add_argument("--json")
    ap.add_argument("--doc", help="rewrite the recipe-compare block of this page")
    args = ap.parse_args()
    recipes = {r[0]: r[1:] for r in args.recipe}
    if any(len(d) < 1 for d in recipes.values()):
        raise SystemExit("each --recipe needs a name and at least one model directory")
    doc = compare(recipes) | {"date": time.strftime("%Y-%m-%d"), "json": args.json}
    if args.json:
        Path(args.json).write_text(json.dumps(doc, indent=1, default=float))
    command = "python benchmarks/recipe_compare.py " + " ".join(
        "--recipe " + " ".join(r) for r in args.recipe)
    text = table(doc, command)
    print(text)
    if args.doc:
        write_doc(Path(args.doc), text)


if __name__ == "__main__":
    main()
