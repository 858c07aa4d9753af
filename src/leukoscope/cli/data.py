"""``leukoscope data summary|check|split``: look at a dataset and at a split before training on it."""

from __future__ import annotations

import argparse
import json
import sys

from leukoscope.data.datasets import list_datasets, load_dataset
from leukoscope.data.inspect import check_split, summarize
from leukoscope.data.splits import Split, group_kfold, group_split


def add_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = sub.add_parser("data", help="summarise datasets, make and check splits")
    dsub = p.add_subparsers(dest="data_command", metavar="ACTION", required=True)

    def common(q: argparse.ArgumentParser) -> None:
        q.add_argument("name", help=f"dataset: {', '.join(list_datasets())}")
        q.add_argument("--root", help="dataset folder (default: ../shared/data/<folder> or $LEUKOSCOPE_DATA_ROOT)")
        q.add_argument("--target", help="which label to use (e.g. binary, subtype, cell_type, diagnosis)")
        q.add_argument("--no-progress", action="store_true", help="no progress bar")

    s = dsub.add_parser("summary", help="images and groups per class, images per group, image sizes")
    common(s)
    s.add_argument("--json", action="store_true", help="print a JSON object instead of a table")

    c = dsub.add_parser("check", help="report leaks across a split; exit 1 if it leaks")
    common(c)
    c.add_argument("--split", help="split file (default: the split the library makes with --seed)")
    c.add_argument("--seed", type=int, default=0)
    c.add_argument("--json", action="store_true")

    m = dsub.add_parser("split", help="make a group-level split and save it")
    common(m)
    m.add_argument("--out", required=True, help="JSON file to write")
    m.add_argument("--folds", type=int, default=0, help="k for a stratified group k-fold (default: holdout)")
    m.add_argument("--test-size", type=float, default=0.2)
    m.add_argument("--val-size", type=float, default=0.1)
    m.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=main)
    return p


def main(args: argparse.Namespace) -> int:
    ds = load_dataset(args.name, root=args.root, target=args.target)
    progress = not args.no_progress and sys.stderr.isatty()
    if args.data_command == "summary":
        info = summarize(ds, progress=progress)
        print(json.dumps(info, indent=2) if args.json else _summary_text(info))
        return 0
    if args.data_command == "split":
        split = group_kfold(ds, args.folds, args.seed) if args.folds else group_split(
            ds, args.test_size, args.val_size, args.seed)
        split.save(args.out)
        print(f"wrote {args.out}: " + ", ".join(f"{k} {len(v)}" for k, v in split.parts.items()))
        return 0
    split = Split.load(args.split) if args.split else group_split(ds, seed=args.seed)
    report = check_split(ds, split, progress=progress)
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        print(_check_text(report))
    return 1 if report["leaks"] else 0


def _summary_text(info: dict) -> str:
    lines = [f"{info['dataset']}  ({info['root']})", f"target: {info['target']}; groups: {info['group_by']}",
             f"{info['n_images']} images in {info['n_groups']} groups", "",
             f"{'class':<28}{'images':>8}{'groups':>8}"]
    for c, n in info["classes"].items():
        lines.append(f"{c:<28}{n:>8}{info['groups_per_class'][c]:>8}")
    ipg = info["images_per_group"]
    lines += ["", f"images per group: min {ipg['min']}, median {ipg['median']:g}, max {ipg['max']}",
              "image sizes: " + ", ".join(f"{k} ({v})" for k, v in info["image_sizes"].items())]
    for key, title in (("excluded", "left out on purpose"), ("unreadable", "unreadable files")):
        if info[key]:
            lines.append(f"{title} ({len(info[key])}):")
            lines += [f"  {e['path']}: {e['reason']}" for e in info[key]]
    return "\n".join(lines)


def _check_text(r: dict) -> str:
    lines = [f"{r['dataset']}: {r['split_kind']} split, " + ", ".join(f"{k} {v}" for k, v in r["parts"].items())]
    lines.append(f"groups on both sides: {len(r['groups_on_both_sides'])}")
    lines += [f"  {g}: {', '.join(p)}" for g, p in list(r["groups_on_both_sides"].items())[:20]]
    lines.append(f"exact duplicate images across parts: {len(r['exact_duplicates_across'])}")
    lines += [f"  {a}  ==  {b}" for a, b in r["exact_duplicates_across"][:20]]
    lines.append(f"near-duplicate images across parts: {len(r['near_duplicates_across'])}")
    lines += [f"  {d['a']}  ~  {d['b']} (hamming {d['hamming']})" for d in r["near_duplicates_across"][:20]]
    if r["unreadable"]:
        lines.append(f"unreadable files ({len(r['unreadable'])}):")
        lines += [f"  {e['path']}: {e['reason']}" for e in r["unreadable"]]
    lines.append("LEAKS" if r["leaks"] else "no leaks")
    return "\n".join(lines)
