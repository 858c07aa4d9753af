"""White-cell detection and blast localisation on whole smear fields, with a naive baseline in the same run.

The classical detector's benchmark (``--detector classical`` of ``scan``, at threshold 0.5 as when it was the
default); the learned detector is measured by benchmarks/field_detection.py.

Measures, for :func:`leukoscope.preprocess.cells.detect_cells` and a fixed-pixel baseline (nucleus colour
threshold + connected components at the original resolution, no cell-size normalisation, no watershed):

* BCCD ``official_split == 'test'`` (72 fields; never used for tuning): WBC recall and precision, one-to-one, under
  two match rules: (a) the detection's centroid lies inside the WBC box, (b) box IoU >= 0.5.
  The same on ``train`` + ``val`` (the tuning fields), for comparison.
* ALL-IDB1 fields with white-cell masks (5): recall = mask components (4-connected) holding at least one detected
  centroid / components; precision = detected centroids inside the mask / detections. Touching cells can share one
  component, and smudge cells are not masked (a detected smudge counts against precision).
* Blast centroids of all 10 ALL-IDB1 fields (63 blasts): share with a detected cell within half that cell's
  diameter (the ceiling of blast recall), and with ``--model``: blast localisation, i.e. a cell the classifier
  calls abnormal matches a blast centroid (one-to-one) within half the cell's equivalent diameter; recall,
  precision, and the abnormal cells found in the 5 healthy fields (must be 0).
* Time for one 2592 x 1944 field (detection alone, and with ``--model`` the whole ``scan`` work: read, detect,
  classify, Grad-CAM, write the three files), median over repeats on the 4 fields of that size, torch and OpenCV
  limited to 2 threads.

    nice -n 10 .venv/bin/python benchmarks/wbc_detection.py [--model leukemia-cell [--sweep]] [--repeats 5]

Tuning: detection parameters were set on BCCD train/val and on the 5 masked ALL-IDB1 fields (Im001_1, Im003_1,
Im004_1, Im005_1, Im006_1); the 5 healthy fields were looked at (counts only). The crop border mode (``clip``) was
chosen on the blast-localisation results of all 10 ALL-IDB1 fields (``--sweep`` shows the alternatives). Numbers on
ALL-IDB1 are therefore not held out; BCCD test is. The shipped leukemia-cell model was trained on ALL-IDB2 crops cut
from Im001_1, Im003_1-Im006_1 and Im037_0 (13 of the 63 blast centroids are centres of its training crops).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import cv2
import numpy as np
from scipy import ndimage as ndi

from leukoscope.data.datasets import load_dataset
from leukoscope.data.images import read_image
from leukoscope.preprocess.cells import DetectConfig, detect_cells

OUT = Path(__file__).resolve().parent / "results" / "wbc_detection.json"

Box = tuple[float, float, float, float]
Point = tuple[float, float, Box]  # centroid x, y and box
Detector = Callable[[np.ndarray], list[Point]]


def ours(cfg: DetectConfig) -> Detector:
    def run(rgb: np.ndarray) -> list[Point]:
        return [(c.x, c.y, c.bbox) for c in detect_cells(rgb, cfg).cells]

    return run


def baseline(rgb: np.ndarray, threshold: float = 45.0, sigma_px: float = 2.0, min_area_px: int = 600) -> list[Point]:
    """Nucleus colour (blue - green) threshold and connected components in original pixels; no size normalisation,
    no watershed, no smudge filter. ``min_area_px`` suits a ~70 px red cell (ALL-IDB1 1712 px fields)."""
    f = rgb.astype(np.float32)
    score = cv2.GaussianBlur(np.clip(f[..., 2] - f[..., 1], 0, None), (0, 0), sigma_px)
    lab, n = ndi.label(score > threshold)
    out = []
    for i, sl in enumerate(ndi.find_objects(lab), start=1):
        m = lab[sl] == i
        if m.sum() < min_area_px:
            continue
        ys, xs = np.nonzero(m)
        out.append((float(xs.mean() + sl[1].start), float(ys.mean() + sl[0].start),
                    (sl[1].start, sl[0].start, sl[1].stop, sl[0].stop)))
    return out


def _iou(a: Box, b: Box) -> float:
    ix = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ix * iy
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def match_boxes(dets: list[Point], boxes: list[Box], rule: str) -> int:
    """True positives under one-to-one greedy matching (best-scoring pairs first)."""
    pairs = []
    for i, (x, y, db) in enumerate(dets):
        for j, b in enumerate(boxes):
            if rule == "centroid":
                if b[0] <= x <= b[2] and b[1] <= y <= b[3]:
                    cx, cy = (b[0] + b[2]) / 2, (b[1] + b[3]) / 2
                    pairs.append((-np.hypot(x - cx, y - cy), i, j))
            else:
                v = _iou(db, b)
                if v >= 0.5:
                    pairs.append((v, i, j))
    used_d, used_b = set(), set()
    for _, i, j in sorted(pairs, reverse=True):
        if i not in used_d and j not in used_b:
            used_d.add(i)
            used_b.add(j)
    return len(used_d)


def bccd_eval(detector: Detector, parts: tuple[str, ...]) -> dict:
    ds = load_dataset("bccd")
    samples = [s for s in ds.samples if s.meta["official_split"] in parts]
    n_gt = n_det = 0
    tp = {"centroid": 0, "iou": 0}
    for s in samples:
        boxes = [(b["xmin"], b["ymin"], b["xmax"], b["ymax"]) for b in s.meta["boxes"] if b["name"] == "WBC"]
        dets = detector(read_image(s.path))
        n_gt += len(boxes)
        n_det += len(dets)
        for rule in tp:
            tp[rule] += match_boxes(dets, boxes, rule)
    out = {"fields": len(samples), "wbc_boxes": n_gt, "detections": n_det}
    for rule, t in tp.items():
        out[f"recall_{rule}"] = t / n_gt if n_gt else float("nan")
        out[f"precision_{rule}"] = t / n_det if n_det else float("nan")
        out[f"tp_{rule}"] = t
    return out


def idb_mask_eval(detector: Detector) -> dict:
    ds = load_dataset("all_idb1")
    per_field, comps, hit, inside, n_det = [], 0, 0, 0, 0
    for s in ds.samples:
        if s.meta["wbc_mask"] is None:
            continue
        mask = read_image(s.meta["wbc_mask"])[..., 0] > 0
        lab, n = ndi.label(mask)  # 4-connectivity: the masks' 1-px separations between touching cells hold
        dets = detector(read_image(s.path))
        found = set()
        k_in = 0
        for x, y, _ in dets:
            v = lab[min(int(round(y)), lab.shape[0] - 1), min(int(round(x)), lab.shape[1] - 1)]
            if v:
                found.add(int(v))
                k_in += 1
        per_field.append({"field": s.path.stem, "components": n, "hit": len(found), "detections": len(dets),
                          "inside_mask": k_in})
        comps += n
        hit += len(found)
        inside += k_in
        n_det += len(dets)
    return {"fields": len(per_field), "components": comps, "components_hit": hit, "detections": n_det,
            "detections_inside_mask": inside, "recall": hit / comps, "precision": inside / n_det,
            "per_field": per_field}


def blast_coverage(detector_cells: Callable[[np.ndarray], list]) -> dict:
    """Blasts with a detected cell (any class) within half the cell's equivalent diameter."""
    ds = load_dataset("all_idb1")
    n, found = 0, 0
    for s in ds.samples:
        blasts = s.meta["blasts"]
        if not blasts:
            continue
        cells = detector_cells(read_image(s.path))
        n += len(blasts)
        found += match_points(cells, blasts)
    return {"blasts": n, "with_detected_cell": found, "coverage": found / n}


def match_points(cells: list, blasts: list[tuple[int, int]]) -> int:
    """One-to-one greedy matching of cells to blast centroids within half the cell's equivalent diameter."""
    pairs = []
    for i, c in enumerate(cells):
        r = np.sqrt(4 * c.area / np.pi) / 2
        for j, (bx, by) in enumerate(blasts):
            dist = np.hypot(c.x - bx, c.y - by)
            if dist <= r:
                pairs.append((dist, i, j))
    used_c, used_b = set(), set()
    for _, i, j in sorted(pairs):
        if i not in used_c and j not in used_b:
            used_c.add(i)
            used_b.add(j)
    return len(used_b)


def training_crop_centres() -> dict[str, list[tuple[int, int]]]:
    """Centres of the ALL-IDB2 crops cut from each ALL-IDB1 field (DATA.md's crop-to-field table; top-left + 128).
    Each ``_1`` crop is centred on a blast of its field."""
    import re

    from leukoscope.data.datasets import default_root

    text = (default_root("all_idb1") / "DATA.md").read_text()
    out: dict[str, list[tuple[int, int]]] = {}
    for _, field, x, y in re.findall(r"(Im\d+_\d)→(Im\d+_\d)@(\d+),(\d+)", text):
        out.setdefault(field, []).append((int(x) + 128, int(y) + 128))
    return out


def blast_localisation(model, thresholds: list[float], partial_sweep: tuple[float, ...] = (0.0, 0.5, 0.6, 0.7, 0.8,
                                                                                         0.9, 1.0, 1.2)) -> dict:
    """Blast recall / precision of the abnormal cells at each threshold (cells cut by the field edge not counted, as
    ``leukoscope scan`` does by default), then at threshold 0.5 for other partial-cell distances (0: every cell
    counted, the behaviour before partial cells existed). These fields also chose the default distance."""
    from leukoscope.scan import ScanConfig, is_partial, scan_field

    ds = load_dataset("all_idb1")
    default = ScanConfig().partial_rbc_diameters
    cfg = ScanConfig(detector="classical", gradcam=False, abnormal_threshold=0.0, partial_rbc_diameters=0.0)
    fields = []
    for s in ds.samples:
        rgb = read_image(s.path)
        h, w = rgb.shape[:2]
        res = scan_field(rgb, model, cfg)
        fields.append((s.path.stem, s.meta["blasts"], [(sc.cell, sc.p_abnormal) for sc in res.cells], w, h,
                       res.rbc_diameter))
    crops = training_crop_centres()
    rows = []
    for t, partial in [(t, default) for t in thresholds] + [(0.5, d) for d in partial_sweep if d != default]:
        n_blast = matched = n_abn = healthy_abn = n_unseen = matched_unseen = 0
        per_field = {}
        for name, blasts, cells, w, h, rbc in fields:
            abn = [c for c, p in cells if p >= t and not is_partial(c, w, h, partial * rbc)]
            n_abn += len(abn)
            if blasts:
                m = match_points(abn, blasts)
                matched += m
                n_blast += len(blasts)
                # Blasts that were not the centre of an ALL-IDB2 crop (the model may have trained on those crops).
                unseen = [b for b in blasts if all(np.hypot(b[0] - x, b[1] - y) > 10 for x, y in crops.get(name, []))]
                n_unseen += len(unseen)
                matched_unseen += match_points(abn, unseen)
                per_field[name] = {"blasts": len(blasts), "white_cells": len(cells), "abnormal": len(abn), "tp": m}
            else:
                healthy_abn += len(abn)
                per_field[name] = {"blasts": 0, "white_cells": len(cells), "abnormal": len(abn)}
        rows.append({"threshold": t, "partial_rbc_diameters": partial, "blasts": n_blast, "abnormal_cells": n_abn,
                     "tp": matched, "recall": matched / n_blast, "blasts_not_crop_centres": n_unseen,
                     "recall_not_crop_centres": matched_unseen / n_unseen if n_unseen else float("nan"),
                     "precision": matched / n_abn if n_abn else float("nan"),
                     "healthy_fields_abnormal_cells": healthy_abn, "per_field": per_field})
    return {"rows": rows, "default_partial_rbc_diameters": default}


def crop_sweep(model) -> list[dict]:
    """Blast localisation at threshold 0.5 for other crop sizes and border modes (these fields also chose the
    default border mode, so this is a sensitivity check, not a held-out result)."""
    from leukoscope.scan import ScanConfig, scan_field

    ds = load_dataset("all_idb1")
    fields = [(read_image(s.path), s.meta["blasts"]) for s in ds.samples]
    rows = []
    for crop in (3.0, 3.3, 3.6):
        for border in ("clip", "shift", "reflect"):
            n_blast = matched = n_abn = healthy_abn = 0
            for rgb, blasts in fields:
                res = scan_field(rgb, model, ScanConfig(detector="classical", gradcam=False, abnormal_threshold=0.5,
                                                        crop_rbc_diameters=crop, border=border))
                abn = [sc.cell for sc in res.cells if sc.abnormal]
                if blasts:
                    n_blast += len(blasts)
                    matched += match_points(abn, blasts)
                    n_abn += len(abn)
                else:
                    healthy_abn += len(abn)
            rows.append({"crop_rbc_diameters": crop, "border": border, "recall": matched / n_blast,
                         "precision": matched / n_abn if n_abn else float("nan"), "tp": matched,
                         "abnormal_cells": n_abn, "healthy_fields_abnormal_cells": healthy_abn})
    return rows


def timing(repeats: int, model=None) -> dict:
    import torch

    torch.set_num_threads(2)
    cv2.setNumThreads(2)
    ds = load_dataset("all_idb1")
    big = [s.path for s in ds.samples if read_image(s.path).shape[:2] == (1944, 2592)]
    det_t, scan_t, read_t = [], [], []
    for _ in range(repeats):
        for p in big:
            t = time.perf_counter()
            rgb = read_image(p)
            read_t.append(time.perf_counter() - t)
            t = time.perf_counter()
            detect_cells(rgb)
            det_t.append(time.perf_counter() - t)
            if model is not None:
                from leukoscope.scan import ScanConfig, scan_field, write_outputs

                # The whole `leukoscope scan` work for one field: read, detect, classify, Grad-CAM on abnormal
                # cells, write JSON, GeoJSON and the full-size overlay PNG.
                with tempfile.TemporaryDirectory() as tmp:
                    t = time.perf_counter()
                    rgb = read_image(p)
                    write_outputs(scan_field(rgb, model, ScanConfig(detector="classical", abnormal_threshold=0.5)),
                                  rgb, tmp, p.stem)
                    scan_t.append(time.perf_counter() - t)
    crowded = {}
    if model is not None:
        # A crowded ALL field (33 white cells, ~28 abnormal): Grad-CAM on the 25 most confident abnormal cells.
        from leukoscope.scan import ScanConfig, scan_field, write_outputs

        path = next(s.path for s in ds.samples if s.path.stem == "Im005_1")
        for gradcam in (False, True):
            times = []
            for _ in range(repeats):
                with tempfile.TemporaryDirectory() as tmp:
                    t = time.perf_counter()
                    rgb = read_image(path)
                    res = scan_field(rgb, model, ScanConfig(detector="classical", abnormal_threshold=0.5,
                                                            gradcam=gradcam))
                    write_outputs(res, rgb, tmp, path.stem)
                    times.append(time.perf_counter() - t)
            crowded[f"gradcam_{str(gradcam).lower()}_median_s"] = float(np.median(times))
    out = {"fields": [p.stem for p in big], "repeats": repeats, "read_median_s": float(np.median(read_t)),
           "detect_median_s": float(np.median(det_t)), "detect_max_s": float(np.max(det_t))}
    if scan_t:
        out["scan_median_s"] = float(np.median(scan_t))
        out["scan_max_s"] = float(np.max(scan_t))
        out["crowded_1712x1368_Im005_1"] = crowded
    out["load_avg_1m_at_end"] = os.getloadavg()[0]
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=None, help="classifier for blast localisation (name or model directory)")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--tta", action="store_true", help="with --model: classify with test-time flips (--tta)")
    p.add_argument("--sweep", action="store_true", help="with --model: also crop sizes x border modes")
    p.add_argument("--out", type=Path, default=OUT)
    args = p.parse_args(argv)
    cfg = DetectConfig()
    doc: dict = {"command": " ".join([Path(sys.argv[0]).name, *(argv if argv is not None else sys.argv[1:])]),
                 "machine": {"python": platform.python_version(), "cpus": os.cpu_count(),
                             "load_avg_1m_at_start": os.getloadavg()[0]},
                 "detect_config": cfg.__dict__,
                 "tuned_on": "BCCD train+val; ALL-IDB1 Im001_1, Im003_1, Im004_1, Im005_1, Im006_1 (masks, blasts)"}
    rows = []
    for name, det in (("leukoscope", ours(cfg)), ("baseline", baseline)):
        rows.append({"detector": name, "bccd_test": bccd_eval(det, ("test",)),
                     "bccd_trainval": bccd_eval(det, ("train", "val")), "all_idb1_masks": idb_mask_eval(det)})
    doc["detection"] = rows
    doc["blast_coverage"] = blast_coverage(lambda rgb: detect_cells(rgb, cfg).cells)
    model = None
    if args.model:
        from leukoscope.models import load_model

        model = load_model(args.model, tta=args.tta)
        doc["model"] = {"name": getattr(model, "name", args.model), "classes": list(model.classes),
                        "path": str(getattr(model, "path", "")), "tta": args.tta}
        doc["blast_localisation"] = blast_localisation(model, [0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9])
        if args.sweep:
            doc["crop_sweep"] = crop_sweep(model)
    doc["timing_2592x1944"] = timing(args.repeats, model)
    print(report(doc))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(doc, indent=1, default=float))
    print(f"\nwrote {args.out}", file=sys.stderr)
    return 0


def report(doc: dict) -> str:
    lines = ["| detector | data | GT | detections | recall | precision | match rule |", "|---|---|---|---|---|---|---|"]
    for r in doc["detection"]:
        for part in ("bccd_test", "bccd_trainval"):
            b = r[part]
            for rule, text in (("centroid", "centroid in box"), ("iou", "IoU >= 0.5")):
                lines.append(f"| {r['detector']} | BCCD {part[5:]} ({b['fields']} fields) | {b['wbc_boxes']} | "
                             f"{b['detections']} | {b[f'recall_{rule}']:.3f} | {b[f'precision_{rule}']:.3f} | {text} |")
        m = r["all_idb1_masks"]
        lines.append(f"| {r['detector']} | ALL-IDB1 masks ({m['fields']} fields) | {m['components']} | "
                     f"{m['detections']} | {m['recall']:.3f} | {m['precision']:.3f} | centroid in mask component |")
    c = doc["blast_coverage"]
    lines.append(f"\nblasts with a detected cell within half its diameter: {c['with_detected_cell']}/{c['blasts']} "
                 f"= {c['coverage']:.3f}")
    if "blast_localisation" in doc:
        lines += ["", f"blast localisation with {doc['model']['name']} (classes {doc['model']['classes']}):",
                  "| threshold | partial if centroid < N red-cell diameters from the edge | blasts | abnormal cells "
                  "| matched | recall | precision "
                  "| abnormal in healthy fields | recall, blasts not centres of training crops |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for r in doc["blast_localisation"]["rows"]:
            part = f"{r['partial_rbc_diameters']:.2f}" + (" (default)" if r['partial_rbc_diameters'] ==
                                                           doc['blast_localisation']['default_partial_rbc_diameters']
                                                           else " (0: all counted)" if not r['partial_rbc_diameters']
                                                           else "")
            lines.append(f"| {r['threshold']:.1f} | {part} | {r['blasts']} | {r['abnormal_cells']} | {r['tp']} | "
                         f"{r['recall']:.3f} | {r['precision']:.3f} | {r['healthy_fields_abnormal_cells']} | "
                         f"{r['recall_not_crop_centres']:.3f} (of {r['blasts_not_crop_centres']}) |")
    if "crop_sweep" in doc:
        lines += ["", "crop size and border mode (threshold 0.5; these fields chose the default, not held out):",
                  "| crop (red-cell diameters) | border | recall | precision | abnormal in healthy fields |",
                  "|---|---|---|---|---|"]
        for r in doc["crop_sweep"]:
            lines.append(f"| {r['crop_rbc_diameters']:.1f} | {r['border']} | {r['recall']:.3f} | "
                         f"{r['precision']:.3f} | {r['healthy_fields_abnormal_cells']} |")
    t = doc["timing_2592x1944"]
    lines.append(f"\n2592x1944 field ({len(t['fields'])} fields x {t['repeats']} repeats, median): read "
                 f"{t['read_median_s']:.2f} s, detect {t['detect_median_s']:.2f} s (max {t['detect_max_s']:.2f})"
                 + (f", whole scan (read, detect, classify, Grad-CAM, write JSON/GeoJSON/overlay) "
                    f"{t['scan_median_s']:.2f} s (max {t['scan_max_s']:.2f})"
                    if "scan_median_s" in t else "")
                 + f"; load average at start {doc['machine']['load_avg_1m_at_start']:.1f}, at the end "
                 f"{t['load_avg_1m_at_end']:.1f}")
    if t.get("crowded_1712x1368_Im005_1"):
        c = t["crowded_1712x1368_Im005_1"]
        lines.append(f"crowded 1712x1368 field Im005_1, whole scan, median: without Grad-CAM "
                     f"{c['gradcam_false_median_s']:.2f} s, with Grad-CAM on up to 25 abnormal cells "
                     f"{c['gradcam_true_median_s']:.2f} s")
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
