"""Whole fields: the learned white-cell detector against today's classical one, with field-grouped cross-validation.

Reads the detector's k-fold results (``leukoscope detector train`` writes them; every field is scored by the fold
model that never saw it, at the threshold chosen on that fold's validation fields) and, in the same run, runs the
classical detector (:func:`leukoscope.preprocess.cells.detect_cells`) on the same fields. For each magnification
(1712x1368, 2592x1944, and all 54 ALL-IDB1 fields):

* BCCD's official test fields (never trained on): white-cell recall and precision of both detectors;
* white-cell recall: annotated white-cell centres (blasts + nucleated "other objects"; platelets excluded, see
  :mod:`leukoscope.train.wbc_detector`) with a detection within one cell radius (0.6 red-cell diameters at the
  field's measured scale), one to one; and the share of white-cell mask components (10 fields) holding a detection;
* unexplained detections: detections matching no annotated centre and no ignored object (the annotations are not
  complete, so this bounds false detections from above);
* with ``--model`` (one or more classifiers): blasts, i.e. cells the classifier calls abnormal at ``--threshold``,
  against the expert blast centroids: recall and precision in the ALL fields, and flagged cells in healthy fields;
  per field the blast count and share with their intervals (``leukoscope.scan``);
* time per 2592 x 1944 field for the whole scan work (read, detect, classify, write JSON + GeoJSON) with each
  detector, and with the learned one also with Grad-CAM on the abnormal cells (``scan``'s default), median over the
  fields of that size, 2 threads.

    python benchmarks/field_detection.py --cv benchmarks/results/wbc_detector_cv.json \\
        --model leukemia-cell runs/loso_all_idb2_s0 --json benchmarks/results/field_detection.json

The shipped ``leukemia-cell`` was trained on ALL-IDB2 crops, which are cut out of these very fields (DATA.md): its
blast figures here are not held out. ``runs/loso_all_idb2_s0`` (``benchmarks/heldout_sources.py loso --hold-out
all_idb2``) never saw ALL-IDB: its figures are.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parent
OUT = ROOT / "results" / "field_detection.json"
CV = ROOT / "results" / "wbc_detector_cv.json"


def _fields(doc: dict[str, Any]) -> list[Any]:
    from leukoscope.train.wbc_detector import FieldLabels

    return [FieldLabels(**d) for d in doc["labels"]]


def _mask_recall(fl: Any, dets: list[tuple[float, float]]) -> tuple[int, int]:
    from scipy import ndimage as ndi

    from leukoscope.data.images import read_image

    lab, n = ndi.label(read_image(fl.mask)[..., 0] > 0)
    hit = {int(lab[min(int(round(y)), lab.shape[0] - 1), min(int(round(x)), lab.shape[1] - 1)]) for x, y in dets}
    hit.discard(0)
    return len(hit), n


def detection_rows(fields: list[Any], dets: dict[str, list[tuple[float, float]]], radius: float) -> dict[str, Any]:
    from leukoscope.train.wbc_detector import detection_counts

    groups: dict[str, dict[str, Any]] = {}
    for fl in fields:
        c = detection_counts(dets[fl.name], fl, radius)
        for g in (fl.size, "all"):
            row = groups.setdefault(g, {"fields": 0, "white_cells": 0, "found": 0, "detections": 0,
                                        "unexplained": 0, "mask_components": 0, "mask_hit": 0})
            row["fields"] += 1
            row["white_cells"] += c["tp"] + c["fn"]
            row["found"] += c["tp"]
            row["detections"] += len(dets[fl.name])
            row["unexplained"] += c["fp"]
            if fl.mask:
                hit, n = _mask_recall(fl, dets[fl.name])
                row["mask_components"] += n
                row["mask_hit"] += hit
    for row in groups.values():
        row["recall"] = row["found"] / max(1, row["white_cells"])
        row["mask_recall"] = row["mask_hit"] / row["mask_components"] if row["mask_components"] else None
    return groups


def bccd_test() -> dict[str, Any]:
    """BCCD's official test fields (never trained on; another laboratory's camera and magnification): white-cell
    recall and precision of each detector, a detection counting when its centre lies inside a WBC box (one to one)."""
    from wbc_detection import match_boxes  # the classical benchmark's BCCD rule, so both report alike

    from leukoscope.data.datasets import load_dataset
    from leukoscope.data.images import read_image
    from leukoscope.preprocess.cells import detect_cells
    from leukoscope.scan import get_detector

    learned = get_detector("learned")
    rows = {k: {"fields": 0, "wbc_boxes": 0, "detections": 0, "found": 0} for k in ("learned", "classical")}
    for s in load_dataset("bccd").samples:
        if s.meta["official_split"] != "test":
            continue
        boxes = [(b["xmin"], b["ymin"], b["xmax"], b["ymax"]) for b in s.meta["boxes"] if b["name"] == "WBC"]
        rgb = read_image(s.path)
        for name, cells in (("learned", learned.detect(rgb).cells), ("classical", detect_cells(rgb).cells)):
            r = rows[name]
            r["fields"] += 1
            r["wbc_boxes"] += len(boxes)
            r["detections"] += len(cells)
            r["found"] += match_boxes([(c.x, c.y, c.bbox) for c in cells], boxes, "centroid")
    for r in rows.values():
        r["recall"] = r["found"] / max(1, r["wbc_boxes"])
        r["precision"] = r["found"] / max(1, r["detections"])
    return rows


def classify(model: Any, rgb: np.ndarray, cells: list[tuple[float, float]], rbc: float) -> np.ndarray:
    """P(abnormal) of each cell, from the crops ``scan`` would give the model (leukoscope.scan.cell_crops)."""
    from leukoscope.scan import ScanConfig, abnormal_class_names, cell_crops

    cfg = ScanConfig()
    crops, _ = cell_crops(rgb, cells, cfg.crop_rbc_diameters * rbc, int(model.input_size), cfg.border)
    if not crops:
        return np.zeros(0)
    classes = list(model.classes)
    ab = [classes.index(c) for c in abnormal_class_names(classes)]
    p = np.concatenate([model.predict_arrays(crops[i:i + 32]) for i in range(0, len(crops), 32)])
    return p[:, ab].sum(1)


def blast_rows(fields: list[Any], dets: dict[str, list[tuple[float, float]]], p_ab: dict[str, np.ndarray],
               partial: dict[str, list[bool]], threshold: float, radius: float) -> dict[str, Any]:
    """Blast recall / precision and healthy fields flagged. As in ``scan``, a cell cut by the field's edge
    (``partial``) is never flagged and not counted; blasts there stay in the denominator."""
    from leukoscope.scan import poisson_binomial_interval, wilson_interval
    from leukoscope.train.wbc_detector import match

    groups: dict[str, dict[str, Any]] = {}
    per_field = []
    for fl in fields:
        flagged = [d for d, p, cut in zip(dets[fl.name], p_ab[fl.name], partial[fl.name], strict=True)
                   if p >= threshold and not cut]
        n_flag = len(flagged)
        m = len(match(flagged, fl.blasts, radius * fl.rbc)) if fl.blasts else 0
        n_cells = len(dets[fl.name]) - sum(partial[fl.name])
        share_ci = wilson_interval(n_flag, n_cells) if n_cells else None
        per_field.append({"field": fl.name, "size": fl.size, "label": fl.label, "blasts": len(fl.blasts),
                          "white_cells": n_cells, "flagged": n_flag, "flagged_on_blast": m,
                          "count_ci95": list(poisson_binomial_interval(
                              [p for p, cut in zip(p_ab[fl.name], partial[fl.name], strict=True) if not cut])),
                          "share": n_flag / n_cells if n_cells else None,
                          "share_ci95": None if share_ci is None else [round(v, 4) for v in share_ci]})
        for g in (fl.size, "all"):
            row = groups.setdefault(g, {"blasts": 0, "blasts_found": 0, "flagged_in_all_fields": 0,
                                        "healthy_fields": 0, "healthy_fields_flagged": 0, "healthy_cells_flagged": 0})
            if fl.label == "healthy":
                row["healthy_fields"] += 1
                row["healthy_fields_flagged"] += int(n_flag > 0)
                row["healthy_cells_flagged"] += n_flag
            else:
                row["blasts"] += len(fl.blasts)
                row["blasts_found"] += m
                row["flagged_in_all_fields"] += n_flag
    for row in groups.values():
        row["blast_recall"] = row["blasts_found"] / max(1, row["blasts"])
        row["blast_precision"] = (row["blasts_found"] / row["flagged_in_all_fields"]
                                  if row["flagged_in_all_fields"] else None)
    return {"groups": groups, "per_field": per_field}


def timing(fields: list[Any], model: Any, repeats: int) -> dict[str, Any]:
    """Seconds per 2592 x 1944 field for the whole scan (read, detect, classify, write JSON + GeoJSON), without and
    (learned detector) with Grad-CAM on the abnormal cells, as ``scan`` does by default."""
    from leukoscope.data.images import read_image
    from leukoscope.scan import ScanConfig, get_detector, scan_field, write_outputs

    big = [fl for fl in fields if fl.size == "2592x1944"]
    get_detector("learned")
    out: dict[str, Any] = {"fields": len(big), "leukemic_fields": sum(fl.label != "healthy" for fl in big)}
    with tempfile.TemporaryDirectory() as tmp:
        for name, gradcam in (("classical", False), ("learned", False), ("learned", True)):
            cfg = ScanConfig(detector=name, gradcam=gradcam)
            # Once per process, untimed: the first Grad-CAM builds the PyTorch network (the ONNX path has none),
            # ~3-4 s that a `scan` run pays once, not per field. Measured separately below.
            t0 = time.perf_counter()
            scan_field(read_image(next(fl for fl in big if fl.label != "healthy").path), model, cfg)
            first = time.perf_counter() - t0
            per_field = []
            for fl in big:
                times = []
                for _ in range(repeats):
                    t0 = time.perf_counter()
                    rgb = read_image(fl.path)
                    res = scan_field(rgb, model, cfg)
                    write_outputs(res, rgb, tmp, fl.name, overlay=False)
                    times.append(time.perf_counter() - t0)
                per_field.append(min(times))
            leuk = [t for t, fl in zip(per_field, big, strict=True) if fl.label != "healthy"]
            out[name + (" + gradcam" if gradcam else "")] = {
                "median_s": statistics.median(per_field), "max_s": max(per_field),
                "median_leukemic_s": statistics.median(leuk), "max_leukemic_s": max(leuk), "first_call_s": first}
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--cv", type=Path, default=CV, help="k-fold results of `leukoscope detector train`")
    p.add_argument("--seed-cv", nargs="*", type=Path, default=[],
                   help="k-fold results of the same recipe with other seeds (`leukoscope detector train --seed N "
                        "--out DIR --cv-json FILE`): white-cell recall median and range over all seeds")
    p.add_argument("--model", nargs="*", default=[], help="classifiers for the blast figures (names or directories)")
    p.add_argument("--thresholds", nargs="+", default=["0.5", "model"],
                   help="a cell is a blast when P(abnormal) reaches this; 'model' = the model's stored operating "
                        "threshold (chosen on its own validation images)")
    p.add_argument("--repeats", type=int, default=1, help="timing repeats per field (the fastest counts)")
    p.add_argument("--no-timing", action="store_true")
    p.add_argument("--json", type=Path, default=OUT)
    p.add_argument("--doc", type=Path, default=None,
                   help="write the results table into this markdown file between the field_detection markers")
    args = p.parse_args(argv)
    os.environ.setdefault("OMP_NUM_THREADS", "2")
    import cv2
    import torch

    cv2.setNumThreads(2)
    torch.set_num_threads(2)
    from leukoscope.data.images import read_image
    from leukoscope.models import load_model
    from leukoscope.preprocess.cells import detect_cells
    from leukoscope.preprocess.wbc_detector import disc_cell
    from leukoscope.scan import ScanConfig, is_partial

    doc = json.loads(args.cv.read_text())
    fields = _fields(doc)
    radius = doc["config"]["match_radius"]
    learned = {f.name: [(x, y) for x, y, q in doc["cv"]["fields"][f.name]["detections"]
                        if q >= doc["cv"]["fields"][f.name]["threshold"]] for f in fields}
    t0 = time.perf_counter()
    classical = {}
    images = {}
    crop_rbc: dict[str, float] = {}
    partial: dict[str, dict[str, list[bool]]] = {"learned": {}, "classical": {}}
    cut = ScanConfig().partial_rbc_diameters
    for fl in fields:
        rgb = read_image(fl.path)
        images[fl.name] = rgb
        h, w = rgb.shape[:2]
        det = detect_cells(rgb)
        classical[fl.name] = [(c.x, c.y) for c in det.cells]
        crop_rbc[fl.name] = det.rbc_diameter  # today's scan cuts crops at its own red-cell estimate
        partial["classical"][fl.name] = [is_partial(c, w, h, cut * det.rbc_diameter) for c in det.cells]
        discs = [disc_cell(x, y, doc["config"]["cell_radius"] * fl.rbc, 1.0, (h, w)) for x, y in learned[fl.name]]
        partial["learned"][fl.name] = [is_partial(c, w, h, cut * fl.rbc) for c in discs]
    result: dict[str, Any] = {
        "command": "python benchmarks/field_detection.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "machine": {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
                    "cpus": os.cpu_count()},
        "cv_file": str(args.cv.relative_to(ROOT.parent) if args.cv.is_absolute() else args.cv),
        "folds": doc["k"], "fold_thresholds": [f["threshold"] for f in doc["cv"]["folds"]],
        "match_radius_rbc": radius,
        "detection": {"learned": detection_rows(fields, learned, radius),
                      "classical": detection_rows(fields, classical, radius)},
        "blasts": {},
        "bccd_test": bccd_test(),
    }
    if args.seed_cv:
        per_seed = [(doc["config"]["seed"], result["detection"]["learned"])]
        for path in args.seed_cv:
            other = json.loads(path.read_text())
            dets = {f.name: [(x, y) for x, y, q in other["cv"]["fields"][f.name]["detections"]
                             if q >= other["cv"]["fields"][f.name]["threshold"]] for f in fields}
            per_seed.append((other["config"]["seed"], detection_rows(fields, dets, radius)))
        result["seeds"] = {g: {"seeds": [sd for sd, _ in per_seed],
                               "recall": [rows[g]["recall"] for _, rows in per_seed],
                               "unexplained": [rows[g]["unexplained"] for _, rows in per_seed]}
                           for g in per_seed[0][1]}
    for name in args.model:
        model = load_model(name)
        for det_name, dets in (("learned", learned), ("classical", classical)):
            p_ab = {fl.name: classify(model, images[fl.name], dets[fl.name],
                                      fl.rbc if det_name == "learned" else crop_rbc[fl.name]) for fl in fields}
            for t in args.thresholds:
                thr = float(model.info.get("threshold", 0.5)) if t == "model" else float(t)
                key = f"{name} / {det_name} / {'operating point' if t == 'model' else t}"
                result["blasts"][key] = blast_rows(fields, dets, p_ab, partial[det_name], thr, radius) | {
                    "threshold": round(thr, 4)}
    if not args.no_timing and args.model:
        result["timing_2592"] = timing(fields, load_model(args.model[0]), args.repeats)
    result["seconds"] = round(time.perf_counter() - t0, 1)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=1) + "\n")
    print(report(result))
    if args.doc is not None:
        write_doc(args.doc, result)
    return 0


START, END = "<!-- field_detection:start -->", "<!-- field_detection:end -->"


def write_doc(path: Path, doc: dict[str, Any]) -> None:
    """Replace the block between the markers in ``path`` with the tables of ``doc`` (generated, never typed)."""
    text = path.read_text()
    if START not in text or END not in text:
        raise ValueError(f"{path} has no {START} ... {END} block")
    head, rest = text.split(START, 1)
    _, tail = rest.split(END, 1)
    body = (f"\n<!-- generated by benchmarks/field_detection.py from {OUT.relative_to(ROOT.parent)}; "
            f"do not edit -->\n`{doc['command']}`\n\n" + report(doc) + "\n")
    path.write_text(head + START + body + END + tail)


def report(doc: dict[str, Any]) -> str:
    lines = [f"White cells, {doc['folds']}-fold field-grouped cross-validation (fold thresholds "
             f"{doc['fold_thresholds']}), a match within {doc['match_radius_rbc']} red-cell diameters:", "",
             "| detector, fields | fields | white cells | recall | mask recall | detections | unexplained |",
             "|---" * 7 + "|"]
    for det, groups in doc["detection"].items():
        for g, r in groups.items():
            mr = "" if r["mask_recall"] is None else f"{r['mask_recall']:.3f} ({r['mask_hit']}/{r['mask_components']})"
            lines.append(f"| {det} {g} | {r['fields']} | {r['white_cells']} | {r['recall']:.3f} | {mr} | "
                         f"{r['detections']} | {r['unexplained']} |")
    if doc.get("bccd_test"):
        lines += ["", "BCCD test fields (never trained on; another camera and magnification), a detection inside a "
                  "white-cell box:", "", "| detector | fields | white cells | recall | detections | precision |",
                  "|---" * 6 + "|"]
        for name, r in doc["bccd_test"].items():
            lines.append(f"| {name} | {r['fields']} | {r['wbc_boxes']} | {r['recall']:.3f} | {r['detections']} | "
                         f"{r['precision']:.3f} |")
    if doc.get("seeds"):
        lines += ["", "Learned detector over seeds (views, windows and head initialisation), median (min-max):", "",
                  "| fields | seeds | recall | unexplained |", "|---|---|---|---|"]
        for g, r in doc["seeds"].items():
            rec, un = r["recall"], r["unexplained"]
            lines.append(f"| {g} | {len(r['seeds'])} | {statistics.median(rec):.3f} ({min(rec):.3f}-{max(rec):.3f}) | "
                         f"{statistics.median(un):g} ({min(un)}-{max(un)}) |")
    if doc["blasts"]:
        lines += ["", "Blasts (cells called abnormal) against the expert blast centroids:", "",
                  "| classifier, detector | fields | blasts | recall | precision | healthy fields flagged |",
                  "|---" * 6 + "|"]
    for name, b in doc["blasts"].items():
        for g, r in b["groups"].items():
            prec = "n/a" if r["blast_precision"] is None else f"{r['blast_precision']:.3f}"
            if not r["blasts"] and not r["healthy_fields"]:
                continue
            rec = f"{r['blast_recall']:.3f}" if r["blasts"] else "n/a"
            lines.append(f"| {name} ({b['threshold']}) | {g} | {r['blasts']} | {rec} | "
                         f"{prec} | {r['healthy_fields_flagged']} of {r['healthy_fields']} "
                         f"({r['healthy_cells_flagged']} cells) |")
    if "timing_2592" in doc:
        t = doc["timing_2592"]
        lines += ["", f"Whole scan (read, detect, classify, write JSON + GeoJSON) per 2592 x 1944 field on "
                      f"{doc['machine']['cpus']} cores, {t['fields']} fields ({t['leukemic_fields']} with blasts):", "",
                      "| scan | median | slowest | median, fields with blasts | slowest of those | "
                      "first call in a process |", "|---" * 6 + "|"]
        for k, r in t.items():
            if isinstance(r, dict):
                lines.append(f"| {k} | {r['median_s']:.2f} s | {r['max_s']:.2f} s | {r['median_leukemic_s']:.2f} s | "
                             f"{r['max_leukemic_s']:.2f} s | {r['first_call_s']:.2f} s |")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
