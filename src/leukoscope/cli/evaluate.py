"""``leukoscope evaluate --model M --dataset NAME [--split test]``."""

from __future__ import annotations

import argparse
import json
import sys


def add_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = sub.add_parser("evaluate", help="metrics, plots and reports for a model on a dataset")
    p.add_argument("--model", default=None, help="shipped model name or model directory (default: leukemia-cell)")
    p.add_argument("--dataset", required=True, help="dataset name")
    p.add_argument("--root", help="dataset folder")
    p.add_argument("--split", default="test", help="part of the split (train, val, test, foldK) or 'all'")
    p.add_argument("--split-file", help="split JSON (default: the model's split.json)")
    p.add_argument("--out", help="folder for evaluation.json/.md/.html and the plots")
    p.add_argument("--json", action="store_true", help="print the metrics as JSON")
    p.add_argument("--tta", action="store_true",
                   help="average the logits over each image's 4 flips (4x the work; docs/TRAINING.md)")
    p.add_argument("--backend", default="auto", choices=["auto", "onnx", "int8", "torch"],
                   help="inference backend (int8: the model's model.int8.onnx, see `leukoscope export --int8`)")
    p.set_defaults(func=main)
    return p


def main(args: argparse.Namespace) -> int:
    from leukoscope.evaluate.report import markdown_report
    from leukoscope.evaluate.run import evaluate_model
    from leukoscope.models import load_model

    model = load_model(args.model, backend=args.backend, tta=args.tta)
    res = evaluate_model(model, args.dataset, args.split, args.out, args.root, args.split_file,
                         progress=sys.stderr.isatty())
    print(json.dumps(res, indent=1, default=float) if args.json else markdown_report(res))
    for u in res["unreadable"]:
        print(f"leukoscope evaluate: skipped unreadable {u['path']}: {u['reason']}", file=sys.stderr)
    return 0
