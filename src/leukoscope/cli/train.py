"""``leukoscope train --config FILE [--set key=value ...] --out DIR``."""

from __future__ import annotations

import argparse
import os
import sys

from leukoscope.config import make_config, parse_set


def add_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = sub.add_parser("train", help="train a classifier and write a model directory",
                       description="Train as the config says. Works under torchrun for DistributedDataParallel.")
    p.add_argument("--config", help="YAML config (keys of leukoscope.config.TrainConfig)")
    p.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="override config keys")
    p.add_argument("--out", help="model directory to write (default runs/<name>)")
    p.add_argument("--resume", action="store_true", help="continue from <out>/checkpoints/last.pt")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=main)
    return p


def main(args: argparse.Namespace) -> int:
    cfg = make_config(parse_set(args.set), args.config)
    from leukoscope.train.distributed import distributed_context
    from leukoscope.train.trainer import train

    out = args.out or os.path.join("runs", cfg.name)
    with distributed_context(cfg.device) as rank:
        result = train(cfg, out, resume=args.resume, progress=not args.no_progress and sys.stderr.isatty())
        if rank == 0:
            pi = result.metrics["per_image"]
            print(f"wrote {result.out}")
            print(f"test (held-out groups): accuracy {pi['accuracy']:.4f}, AUC {pi['auc']:.4f} "
                  f"({pi['auc_ci_low']:.4f}-{pi['auc_ci_high']:.4f}), macro F1 {pi['macro']['f1']:.4f}")
    return 0
