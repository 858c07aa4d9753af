"""``leukoscope scan FIELD... [--model M] --out DIR``: find, classify and mark the white cells of whole smear fields.

For each field writes ``<stem>.json`` (cells with centroid, box, area, label, confidence, ``p_<class>``; field
totals), ``<stem>.overlay.png`` (boxes coloured by class and confidence, Grad-CAM on abnormal cells) and
``<stem>.geojson`` (QuPath detections with classifications).
"""

from __future__ import annotations

import argparse
import sys


def add_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = sub.add_parser("scan", help="find and classify every white cell in whole smear fields")
    p.add_argument("fields", nargs="+", metavar="FIELD", help="field images, folders (searched recursively) or globs")
    p.add_argument("--model", default=None, help="shipped model name or model directory (default: leukemia-cell)")
    p.add_argument("--out", "-o", required=True, metavar="DIR", help="folder for the JSON, overlay and GeoJSON files")
    p.add_argument("--threshold", type=float, default=None,
                   help="a cell is abnormal when its probability of abnormal classes reaches this (default: the "
                        "model's stored operating point, e.g. 0.64 for leukemia-cell; 0.5 for models without one)")
    p.add_argument("--normal-class", action="append", default=None, metavar="NAME",
                   help="a class of the model that is not abnormal (repeatable; default: healthy/normal/hem/...)")
    p.add_argument("--detector", default="learned", metavar="NAME|DIR",
                   help="white-cell detector: learned (default; the shipped one, separates touching cells), "
                        "classical (nucleus segmentation + watershed), or a detector directory")
    p.add_argument("--crop-rbc", type=float, default=3.6, metavar="N",
                   help="side of each cell crop in red-cell diameters (default 3.6, like ALL-IDB2 crops)")
    p.add_argument("--rbc-diameter", type=float, default=None, metavar="PX",
                   help="red-cell diameter in pixels, if known (default: measured in each field)")
    p.add_argument("--partial-rbc", type=float, default=0.8, metavar="N",
                   help="cells touching the field edge with their centroid closer to it than N red-cell diameters "
                        "are partial: shown, not counted (default 0.8; 0 counts every cell)")
    p.add_argument("--no-gradcam", action="store_true", help="do not draw Grad-CAM on abnormal cells")
    p.add_argument("--no-overlay", action="store_true", help="write only the JSON and GeoJSON files")
    p.add_argument("--tta", action="store_true",
                   help="average the logits over each image's 4 flips (4x the work; docs/TRAINING.md)")
    p.add_argument("--backend", default="auto", choices=["auto", "onnx", "int8", "torch"])
    p.set_defaults(func=main)
    return p


def main(args: argparse.Namespace) -> int:
    from leukoscope.data.images import read_image
    from leukoscope.errors import ImageReadError
    from leukoscope.models import load_model
    from leukoscope.predict import collect_paths
    from leukoscope.scan import ScanConfig, scan_field, with_detect, write_outputs

    cfg = ScanConfig(crop_rbc_diameters=args.crop_rbc, abnormal_threshold=args.threshold,
                     normal_classes=tuple(args.normal_class or ()), gradcam=not args.no_gradcam,
                     partial_rbc_diameters=args.partial_rbc, detector=args.detector)
    if args.rbc_diameter is not None:
        cfg = with_detect(cfg, rbc_diameter=args.rbc_diameter)
    paths, problems = collect_paths(args.fields)
    model = load_model(args.model, backend=args.backend, tta=args.tta)
    used: set[str] = set()
    for path in paths:
        try:
            rgb = read_image(path)
        except ImageReadError as exc:
            problems.append((str(path), exc.reason))
            continue
        stem = path.stem
        n = 1
        while stem in used:  # two fields with one name from different folders
            n += 1
            stem = f"{path.stem}-{n}"
        used.add(stem)
        try:
            result = scan_field(rgb, model, cfg)
        except ValueError as exc:  # e.g. a blank image: no red cells to measure; the other fields still run
            problems.append((str(path), str(exc)))
            used.discard(stem)
            continue
        write_outputs(result, rgb, args.out, stem, source=str(path), overlay=not args.no_overlay)
        ci = result.abnormal_share_interval()
        share = "n/a" if ci is None else f"{result.abnormal_share:.1%}, 95% CI {ci[0]:.0%}-{ci[1]:.0%}"
        partial = f", {result.n_partial} cut by the edge (not counted)" if result.n_partial else ""
        print(f"{path}: {result.n_white_cells} white cells, {result.n_abnormal} abnormal ({share}){partial} -> "
              f"{args.out}/{stem}.json")
    for item, reason in problems:
        print(f"leukoscope scan: cannot scan {item}: {reason}", file=sys.stderr)
    return 1 if problems else 0
