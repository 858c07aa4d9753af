"""``leukoscope ood --model NAME_OR_DIR [--method knn]``: fit a model's out-of-distribution detector and
image-quality reference on the training part of its split (training does this itself; this is for older model
directories, or another method)."""

from __future__ import annotations

import argparse
import json


def add_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = sub.add_parser("ood", help="fit a model's out-of-distribution detector and image-quality reference")
    p.add_argument("--model", default=None, help="shipped model name or model directory (default: leukemia-cell)")
    from leukoscope.models.ood import DEFAULT_METHOD, OOD_METHODS

    p.add_argument("--method", default=DEFAULT_METHOD, choices=OOD_METHODS,
                   help=f"the out-of-distribution score (default {DEFAULT_METHOD}; benchmarks/ood_shifts.py compares "
                        "them)")
    p.add_argument("--keep", type=float, default=0.95, help="share of validation images left unflagged")
    p.add_argument("--max-train", type=int, default=4000, help="at most this many training images fit the detector")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=main)
    return p


def main(args: argparse.Namespace) -> int:
    from leukoscope.train.trust import fit_trust

    res = fit_trust(args.model, method=args.method, keep=args.keep, max_train=args.max_train,
                    progress=not args.no_progress)
    print(json.dumps(res, indent=1))
    return 0
