"""``leukoscope faithfulness PATH... [--model M] [--methods ...] [--record [--image-set NAME --title T]]``: do the
heatmaps of this model point at what it uses? Deletion / insertion (and ROAD) of each method's map against a random
map on held-out images. ``--from RESULTS.json`` records (or prints) an earlier run's ``--out`` without measuring."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from leukoscope.cli.explain import METHOD_NAMES

DEFAULT_METHODS = ("gradcam", "gradcam++", "layercam", "occlusion")
DEFAULT_MAX_IMAGES = 50
DEFAULT_STEPS = 16


def add_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = sub.add_parser("faithfulness", help="measure each heatmap method against a random map on held-out images "
                                            "(and record the verdicts in the model directory)")
    p.add_argument("paths", nargs="*", metavar="PATH",
                   help="held-out images (files, folders or globs); none may be in the model's training split")
    p.add_argument("--from", dest="from_results", default=None, metavar="RESULTS_JSON",
                   help="instead of measuring, take an earlier run's --out file (same model weights, checked)")
    p.add_argument("--model", default=None, help="shipped model name or model directory (default: leukemia-cell)")
    p.add_argument("--methods", nargs="+", default=list(DEFAULT_METHODS), choices=METHOD_NAMES,
                   help=f"default: {' '.join(DEFAULT_METHODS)} (scorecam and cameras are slow on a CPU)")
    p.add_argument("--max-images", type=int, default=DEFAULT_MAX_IMAGES,
                   help="images used, evenly spaced over those found (0: all)")
    p.add_argument("--n-slow", type=int, default=None, help="images for scorecam (default: all of them)")
    p.add_argument("--steps", type=int, default=DEFAULT_STEPS,
                   help="points on the deletion / insertion curves, minus one")
    p.add_argument("--no-road", action="store_true", help="skip ROAD (slower: one sparse solve per point)")
    p.add_argument("--out", default=None, help="also write the full results as JSON")
    p.add_argument("--record", action="store_true",
                   help="write the verdicts into the model directory's faithfulness.json, which `leukoscope explain` "
                        "reports with every heatmap (needs a writable model directory)")
    p.add_argument("--image-set", default=None, metavar="NAME",
                   help="with --record: record these images as a further image set NAME (kept beside the main set "
                        "and the other sets; without it they replace the main set's methods)")
    p.add_argument("--title", default="", help="with --record: what the images are, in words (e.g. 'ALL-IDB2 smear "
                                               "crops'), shown in the note with every heatmap")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=main)
    return p


def seen_in_training(model_dir: Path, paths: list[Path]) -> list[Path]:
    """The given images that the model's ``split.json`` puts in its train or validation part (matched on the path
    relative to the data root, i.e. the end of the given path)."""
    split = model_dir / "split.json"
    if not split.is_file():
        return []
    parts = json.loads(split.read_text()).get("parts", {})
    used = {Path(p).as_posix() for part in ("train", "val") for p in parts.get(part, [])}
    by_name: dict[str, list[str]] = {}
    for u in used:
        by_name.setdefault(u.rsplit("/", 1)[-1], []).append(u)
    return [p for p in paths if any(p.resolve().as_posix().endswith("/" + u) for u in by_name.get(p.name, []))]


def main(args: argparse.Namespace) -> int:
    """Exit status 0; 2 when no image could be read or some were seen in training (nothing is measured then)."""
    import numpy as np

    from leukoscope.data.images import read_image
    from leukoscope.errors import ImageReadError
    from leukoscope.explain.record import (
        PRIMARY,
        SECONDARY,
        image_kind,
        images_kind,
        record_from_results,
        verdict,
    )
    from leukoscope.explain.record import weights_sha256 as sha_of
    from leukoscope.models import load_model
    from leukoscope.predict import collect_paths
    from leukoscope.research.faithfulness import ROAD_PERCENTILES, measure

    if (args.image_set or args.title) and not args.record:
        print("leukoscope faithfulness: --image-set and --title name what --record writes; add --record",
              file=sys.stderr)
        return 2
    if args.from_results:
        measuring = {"--methods": args.methods != list(DEFAULT_METHODS),
                     "--max-images": args.max_images != DEFAULT_MAX_IMAGES, "--n-slow": args.n_slow is not None,
                     "--steps": args.steps != DEFAULT_STEPS, "--no-road": args.no_road}
        given = [k for k, v in measuring.items() if v]
        if args.paths or given:
            print("leukoscope faithfulness: --from takes an earlier run as it was; images and "
                  f"{', '.join(given) or 'measuring options'} do not go with it", file=sys.stderr)
            return 2
    model = load_model(args.model)
    if args.from_results:
        result = json.loads(Path(args.from_results).read_text())
        if not isinstance(result.get("cells"), dict) or not result["cells"].get("images"):
            print(f"leukoscope faithfulness: {args.from_results} is not the --out file of a leukoscope faithfulness "
                  "run (no 'cells' with their 'images')", file=sys.stderr)
            return 2
        if result.get("weights_sha256") != sha_of(model.path):
            print(f"leukoscope faithfulness: {args.from_results} was measured on other weights than "
                  f"{model.path}/model.safetensors", file=sys.stderr)
            return 2
        used = result["cells"]["images"]
        seen = seen_in_training(Path(model.path), [Path(u) for u in used])
        if seen:
            print(f"leukoscope faithfulness: {len(seen)} of its images are in {model.name}'s training or validation "
                  f"split (e.g. {seen[0]})", file=sys.stderr)
            return 2
        if "kind" not in result:  # runs before image kinds were recorded
            try:
                result["kind"] = images_kind([image_kind(read_image(u)) for u in used])
            except ImageReadError as exc:
                print(f"leukoscope faithfulness: the run's kind of image is not recorded and cannot be told: "
                      f"{exc}", file=sys.stderr)
                return 2
        res, n_images = result["cells"], len(used)
    else:
        if not args.paths:
            print("leukoscope faithfulness: give held-out images (or --from RESULTS_JSON)", file=sys.stderr)
            return 2
        files, problems = collect_paths(args.paths)
        for p, reason in problems:
            print(f"leukoscope faithfulness: {p}: {reason}", file=sys.stderr)
        seen = seen_in_training(Path(model.path), files)
        if seen:
            print(f"leukoscope faithfulness: {len(seen)} of the images are in {model.name}'s training or validation "
                  f"split (e.g. {seen[0]}); measure on held-out images only", file=sys.stderr)
            return 2
        if args.max_images and len(files) > args.max_images:
            files = [files[int(i)] for i in np.linspace(0, len(files) - 1, args.max_images).round()]
        images, used = [], []
        for f in files:
            try:
                images.append(read_image(f))
                used.append(str(f))
            except ImageReadError as exc:
                print(f"leukoscope faithfulness: cannot read {f}: {exc.reason}", file=sys.stderr)
        if not images:
            print("leukoscope faithfulness: no readable image", file=sys.stderr)
            return 2
        kind = images_kind([image_kind(im) for im in images])
        if args.record:  # a kind that the record cannot take is refused before the long measurement, not after
            from leukoscope.explain.record import RECORD_FILE, kind_conflict

            rec_path = Path(model.path) / RECORD_FILE
            conflict = kind_conflict(json.loads(rec_path.read_text()) if rec_path.is_file() else None,
                                     sha_of(model.path), args.image_set, kind)
            if conflict:
                print(f"leukoscope faithfulness: nothing measured: {conflict}", file=sys.stderr)
                return 2
        t0 = time.time()
        res = measure(model, images, list(args.methods), steps=args.steps,
                      road_percentiles=None if args.no_road else ROAD_PERCENTILES, n_slow=args.n_slow,
                      progress=not args.no_progress and sys.stderr.isatty())
        result = {"model": model.name, "model_path": str(model.path), "weights_sha256": sha_of(model.path),
                  "date": time.strftime("%Y-%m-%d"), "args": {k: v for k, v in vars(args).items() if k != "func"},
                  "wall_seconds": round(time.time() - t0, 1),
                  "kind": kind,
                  "cells": {**res, "selection": f"{len(images)} held-out image(s) given to leukoscope faithfulness",
                            "part": "test", "images": used}}
        n_images = len(images)
    print(f"{model.name}: {n_images} image(s), method minus random map, mean [95 % CI]; verdict on "
          "insertion - deletion")
    print(f"{'method':>10} {'n':>4}  {'insertion - deletion':<28} {'ROAD combined':<28} verdict")
    for name, m in res["methods"].items():
        if name == "random":
            continue
        cols = []
        for key in (PRIMARY, SECONDARY):
            d = m["paired_vs_random"].get(key)
            cols.append(f"{d['mean']:+.3f} [{d['ci'][0]:+.3f}, {d['ci'][1]:+.3f}]" if d else "not measured")
        print(f"{name:>10} {m['n']:>4}  {cols[0]:<28} {cols[1]:<28} {verdict(m['paired_vs_random'][PRIMARY])}")
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=1))
        print(f"wrote {args.out}")
    if args.record:
        from leukoscope.explain.record import RECORD_FILE

        path = Path(model.path) / RECORD_FILE
        prev = json.loads(path.read_text()) if path.is_file() else None
        try:
            rec = record_from_results(result, prev, sha_of(model.path), image_set=args.image_set,
                                      kind=result["kind"], title=args.title)
        except ValueError as exc:
            print(f"leukoscope faithfulness: nothing recorded: {exc}", file=sys.stderr)
            return 2
        path.write_text(json.dumps(rec, indent=1) + "\n")
        print(f"wrote {path}")
    return 0
