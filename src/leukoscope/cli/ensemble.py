"""``leukoscope ensemble MODEL_DIR MODEL_DIR... --out DIR``: one model directory that answers with the mean of
several trained models' logits (seeds of one recipe on one split); see :mod:`leukoscope.train.ensemble`."""

from __future__ import annotations

import argparse


def add_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = sub.add_parser("ensemble", help="combine trained models of one split into an ensemble model directory")
    p.add_argument("members", nargs="+", help="model directories (same classes, preprocessing and split)")
    p.add_argument("--out", required=True, help="the ensemble's model directory (must not exist)")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=main)
    return p


def main(args: argparse.Namespace) -> int:
    from leukoscope.train.ensemble import make_ensemble

    model = make_ensemble(args.members, args.out, progress=not args.no_progress)
    m = model.info
    print(f"wrote {args.out}: {1 + len(model.members)} members, temperature {m['temperature']:.3f}"
          + (f", threshold {m['threshold']:.3f}" if m.get("threshold") is not None else ""))
    return 0
