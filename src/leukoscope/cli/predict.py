"""``leukoscope predict PATH... [--model NAME_OR_DIR] [--output FILE.csv] [--heatmaps DIR]``."""

from __future__ import annotations

import argparse
import sys


def add_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = sub.add_parser("predict", help="classify cell images (files, folders, globs) into a CSV")
    p.add_argument("paths", nargs="+", metavar="PATH", help="image files, folders (searched recursively) or globs")
    p.add_argument("--model", default=None, help="shipped model name or model directory (default: leukemia-cell)")
    p.add_argument("--output", "-o", help="CSV file to write (default: standard output)")
    p.add_argument("--heatmaps", metavar="DIR", help="also write Grad-CAM overlays, heatmaps and JSON into DIR")
    p.add_argument("--method", default="gradcam", help="explanation method for --heatmaps")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--tta", action="store_true",
                   help="average the logits over each image's 4 flips (4x the work; docs/TRAINING.md)")
    p.add_argument("--backend", default="auto", choices=["auto", "onnx", "int8", "torch"])
    p.add_argument("--no-quality-checks", action="store_true",
                   help="skip the image-quality checks (about 3x faster on many images; the warnings column then "
                        "says 'unchecked'); the out-of-distribution flag stays")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=main)
    return p


def main(args: argparse.Namespace) -> int:
    from leukoscope.models import load_model
    from leukoscope.predict import collect_paths, predict_files, write_csv

    paths, problems = collect_paths(args.paths)
    model = load_model(args.model, backend=args.backend, tta=args.tta)
    preds, failed = predict_files(model, paths, batch_size=args.batch_size,
                                  progress=not args.no_progress and sys.stderr.isatty(),
                                  quality=not args.no_quality_checks)
    write_csv(preds, model.classes, args.output)
    if args.heatmaps:
        from leukoscope.explain import write_explanations

        write_explanations(model, [p.path for p in preds], args.heatmaps, method=args.method)
    n_ood = sum(bool(p.ood) for p in preds)
    n_warn = sum(bool(p.warnings) for p in preds)  # None: not checked
    if n_ood or n_warn:
        print(f"leukoscope predict: {n_ood} of {len(preds)} image(s) unlike the model's training images (ood=true) "
              f"and {n_warn} with image-quality warnings: do not trust their class", file=sys.stderr)
    bad = problems + failed
    for path, reason in bad:
        print(f"leukoscope predict: cannot read {path}: {reason}", file=sys.stderr)
    if args.output:
        print(f"wrote {len(preds)} predictions to {args.output}" + (f"; {len(bad)} file(s) unreadable" if bad else ""),
              file=sys.stderr)
    return 1 if bad else 0
