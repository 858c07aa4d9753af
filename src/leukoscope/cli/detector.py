"""``leukoscope detector train``: rebuild the white-cell detector that ``scan`` uses, from the shared data.

Field-grouped k-fold cross-validation first (its results, with every field's detections, go to ``--cv-json``), then
the detector trained on every field is written to ``--out`` (default: the shipped ``weights/wbc-detector``).
``benchmarks/field_detection.py`` turns the k-fold results into recall, blast and timing figures.
"""

from __future__ import annotations

import argparse
from pathlib import Path


def add_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = sub.add_parser("detector", help="rebuild the learned white-cell detector used by scan")
    dsub = p.add_subparsers(dest="action", metavar="ACTION", required=True)
    t = dsub.add_parser("train", help="k-fold cross-validation, then the detector trained on every field")
    t.add_argument("--out", type=Path, default=None, help="detector directory (default: the shipped one)")
    t.add_argument("--cv-json", type=Path, default=Path("benchmarks/results/wbc_detector_cv.json"),
                   help="where the k-fold results go (default benchmarks/results/wbc_detector_cv.json)")
    t.add_argument("--folds", type=int, default=5)
    t.add_argument("--steps", type=int, default=None, help="head optimisation steps (default 1200)")
    t.add_argument("--views", type=int, default=None, help="feature views per field (default 6)")
    t.add_argument("--no-bccd", action="store_true", help="train on ALL-IDB1 fields only")
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=main)
    return p


def main(args: argparse.Namespace) -> int:
    from dataclasses import replace

    from leukoscope.preprocess.wbc_detector import DETECTOR_DIR
    from leukoscope.train.wbc_detector import DetectorTrainConfig, train_detector

    if args.folds < 2:
        raise ValueError(f"--folds must be at least 2, got {args.folds}")
    cfg = replace(DetectorTrainConfig(), seed=args.seed, bccd=not args.no_bccd)
    if args.steps is not None:
        cfg = replace(cfg, steps=args.steps)
    if args.views is not None:
        cfg = replace(cfg, views=args.views)
    out = args.out or DETECTOR_DIR
    doc = train_detector(out, cfg, args.folds, args.cv_json, progress=not args.no_progress)
    print(f"detector written to {out} (threshold {doc['threshold']:.2f}, fold thresholds "
          f"{[f['threshold'] for f in doc['cv']['folds']]}); k-fold results in {args.cv_json} "
          f"({doc['seconds']:.0f} s)")
    return 0
