"""``leukoscope models``: the shipped models with their classes and headline metrics."""

from __future__ import annotations

import argparse
import json


def add_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = sub.add_parser("models", help="list the shipped models")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=main)
    return p


def main(args: argparse.Namespace) -> int:
    from leukoscope.models.modeldir import SHIPPED_DIR, shipped_models

    rows = []
    for name in shipped_models():
        info = json.loads((SHIPPED_DIR / name / "model.json").read_text())
        if "spec" not in info:  # patient-level (apl) and flow models have their own formats
            rows.append({"name": name, "classes": list(info.get("classes", [])), "backbone": info.get("format", "-"),
                         "test_accuracy": None, "test_auc": None})
            continue
        mpath = SHIPPED_DIR / name / "metrics.json"
        m = json.loads(mpath.read_text())["per_image"] if mpath.exists() else {}
        rows.append({"name": name, "classes": info["classes"], "backbone": info["spec"]["backbone"],
                     "test_accuracy": m.get("accuracy"), "test_auc": m.get("auc")})
    if args.json:
        print(json.dumps(rows, indent=1))
    else:
        for r in rows:
            score = (f"test accuracy={r['test_accuracy']:.3f} AUC={r['test_auc']:.3f}" if r["test_auc"] is not None
                     else "(see its MODEL_CARD.md)")
            print(f"{r['name']:<16} {r['backbone']:<20} classes={','.join(r['classes'])}  {score}")
    return 0
