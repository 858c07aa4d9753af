"""``leukoscope explain PATH... [--model M] [--method gradcam|gradcam++|layercam|scorecam|occlusion] --out DIR``."""

from __future__ import annotations

import argparse
import sys

# Spelled out so that building the parser imports neither torch nor the CAM library (a test checks it equals
# leukoscope.explain.METHODS.names()).
METHOD_NAMES = ("gradcam", "gradcam++", "layercam", "cameras", "occlusion", "scorecam")


def add_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = sub.add_parser("explain", help="heatmaps of what drove each prediction: overlays, .npy maps, JSON, index.html")
    p.add_argument("paths", nargs="+", metavar="PATH", help="image files, folders (searched recursively) or globs")
    p.add_argument("--model", default=None, help="shipped model name or model directory (default: leukemia-cell)")
    p.add_argument("--method", default="gradcam",
                   help=f"one of {', '.join(METHOD_NAMES)} (default: gradcam; scorecam is slow on CPU: one forward "
                        "pass per channel; cameras runs the network at 2-4x the input size, ~30x Grad-CAM)")
    p.add_argument("--target-class", default=None,
                   help="class name or index to explain (default: the predicted class of each image)")
    p.add_argument("--layer", default=None, help="dotted name of the layer to explain (default: the model's)")
    p.add_argument("--out", required=True, help="folder for <stem>.overlay.png, <stem>.heatmap.npy, <stem>.json and "
                                                "index.html")
    p.add_argument("--tta", action="store_true",
                   help="average the logits over each image's 4 flips (4x the work; docs/TRAINING.md)")
    p.add_argument("--backend", default="auto", choices=["auto", "onnx", "int8", "torch"],
                   help="inference for the probabilities (and the gradient-free methods' many passes); gradients "
                        "always come from PyTorch")
    p.add_argument("--no-html", action="store_true", help="do not write index.html")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=main)
    return p


def main(args: argparse.Namespace) -> int:
    """Exit status: 0 when every input was explained, 1 when some could not be read (listed on stderr), 2 when none
    could."""
    from leukoscope.explain.cam import get_method
    from leukoscope.explain.report import report_failures, write_explanations
    from leukoscope.models import load_model

    get_method(args.method)  # an unknown method fails before the model loads
    target = args.target_class
    if target is not None and target.lstrip("-").isdigit():
        target = int(target)
    model = load_model(args.model, backend=args.backend, tta=args.tta)
    records = write_explanations(model, args.paths, args.out, method=args.method, target_class=target,
                                 layer=args.layer, html_report=not args.no_html,
                                 progress=not args.no_progress and sys.stderr.isatty())
    # the reader should know before trusting the maps: the verdict of each image's own kind (cut-out cell / smear)
    faith = next((r["faithfulness"] for r in records if r.get("faithfulness", {}).get("verdict", "passes") != "passes"),
                 None)
    if faith:
        print(f"leukoscope explain: note: {faith['note']}", file=sys.stderr)
    n_bad = report_failures(records)
    n_ok = len(records) - n_bad
    print(f"explained {n_ok} image(s) into {args.out}" + (f"; {n_bad} input(s) unreadable" if n_bad else ""),
          file=sys.stderr)
    if n_bad:
        return 2 if n_ok == 0 else 1
    return 0
