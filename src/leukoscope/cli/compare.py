"""``leukoscope compare --dataset NAME [--target T] --models cnn,hybrid,rf,svm,cnn_svm [--folds K] [--json FILE]
[--out DIR]``: train and evaluate every model family on the same group-level split."""

from __future__ import annotations

import argparse
import os
import sys


def add_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = sub.add_parser(
        "compare", help="train and evaluate several model families on one group-level split",
        description="Train and evaluate the CNN, the hybrid CNN-Transformer, the Random Forest and SVM on handcrafted "
                    "features and the SVM on frozen CNN embeddings on the same group-level split (holdout by "
                    "default; --folds K for group K-fold). Writes a markdown table, one ROC plot and a JSON file.")
    p.add_argument("--dataset", required=True, help="dataset name (see `leukoscope data summary`)")
    p.add_argument("--target", help="label to predict (e.g. binary, subtype, cell_type)")
    p.add_argument("--root", help="dataset folder (default: the shared data location)")
    # the research code is imported by main() only, so that the parser (every command's --help) stays light
    p.add_argument("--models", default=None,
                   help="comma-separated families, in table order: cnn, hybrid, rf, svm, cnn_svm (default: all)")
    p.add_argument("--folds", type=int, default=0, help="K for stratified group K-fold (default: one holdout split)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--test-size", type=float, default=0.2, help="holdout test fraction (default 0.2)")
    p.add_argument("--val-size", type=float, default=0.15, help="holdout validation fraction (default 0.15)")
    p.add_argument("--split", default="", help="use this saved split file instead of making one")
    p.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE",
                   help="training config overrides for both neural models (e.g. epochs=10 patience=3)")
    p.add_argument("--cnn-set", nargs="*", default=[], metavar="KEY=VALUE", help="overrides for the CNN only")
    p.add_argument("--hybrid-set", nargs="*", default=[], metavar="KEY=VALUE", help="overrides for the hybrid only")
    p.add_argument("--embed-stages", type=int, default=None,
                   help="stem cache the CNN embeddings read (default: the CNN's trainable_stages)")
    p.add_argument("--timing-images", type=int, default=32,
                   help="images per round timed end to end for the classical models (default 32)")
    p.add_argument("--n-boot", type=int, default=1000, help="bootstrap resamples for the AUC CI (default 1000)")
    p.add_argument("--out", help="output directory (default runs/compare/<dataset>-<target>)")
    p.add_argument("--json", help="also write the JSON here, with <stem>.md and <stem>_roc.png beside it")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(func=main)
    return p


def main(args: argparse.Namespace) -> int:
    from leukoscope.config import make_config, parse_set
    from leukoscope.research.compare import DEFAULT_MODELS, CompareConfig, run_compare

    neural, cnn, hybrid = parse_set(args.set), parse_set(args.cnn_set), parse_set(args.hybrid_set)
    for overrides in (neural, cnn, hybrid):
        make_config(overrides)  # unknown keys fail here, before anything is trained
    models = DEFAULT_MODELS if args.models is None else args.models
    cfg = CompareConfig(dataset=args.dataset, target=args.target, root=args.root, models=models,
                        folds=args.folds, seed=args.seed, test_size=args.test_size, val_size=args.val_size,
                        split_file=args.split, neural=neural, cnn=cnn, hybrid=hybrid,
                        embed_trainable_stages=args.embed_stages, timing_images=args.timing_images,
                        n_boot=args.n_boot)
    out = args.out or os.path.join("runs", "compare", f"{args.dataset}-{args.target or 'default'}")
    result = run_compare(cfg, out, json_file=args.json, progress=not args.no_progress and sys.stderr.isatty())
    print(result["markdown"])
    print("wrote " + ", ".join(result["paths"]["json"] + result["paths"]["markdown"] + result["paths"]["roc"]))
    return 0
