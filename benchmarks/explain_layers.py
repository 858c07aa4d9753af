"""Which layer can Grad-CAM localise from? Mass of the heatmap inside the cell on held-out C-NMC 2019 cells, for each
method x layer of the backbone, next to a map that follows the cell's outline at each grid size.

    .venv/bin/python benchmarks/explain_layers.py [--model leukemia-cell] [--n-cells 40]

The outline map of a g x g grid: the cell mask averaged onto g x g cells, upsampled as a CAM is (to the network's
input, then to the image); its mass inside the mask. Not an upper bound: a map concentrated on the middle of the cell
keeps more of its upsampled mass inside (JSON files before 2026-11-26 call it "ceiling ... (a perfect map)").
Target of issue 4: mass inside the cell >= 0.9. ``cameras`` (multi-scale CAM) runs the network at several input
sizes (scales x 224 px), so its grid at ``bn2`` is up to 28 x 28; ``cameras (1,)`` is its single-scale form (relu of
sum_c gradient x activation at 7 x 7), the baseline the extra scales add to. Also records the median seconds per image
of each map (1 thread) and the mass by predicted class. Writes
benchmarks/results/explain_layers_<model>.json.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import cv2
import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from explain_localisation import cell_mask, heldout_names, mass_in  # noqa: E402

from leukoscope.data.datasets import load_dataset  # noqa: E402
from leukoscope.data.images import read_image  # noqa: E402
from leukoscope.explain import CAM, gradcam_array  # noqa: E402
from leukoscope.explain.cam import get_method, resolve_layer  # noqa: E402
from leukoscope.models import LoadedModel, load_model  # noqa: E402
from leukoscope.preprocess.transforms import crop_square  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
CONFIGS = [("gradcam", None), ("gradcam", "backbone.blocks.5"), ("gradcam", "backbone.blocks.4"),
           ("gradcam", "backbone.blocks.3"), ("gradcam", "backbone.blocks.2"), ("gradcam++", "backbone.blocks.4"),
           ("layercam", None), ("layercam", "backbone.bn2"), ("layercam", "backbone.blocks.3"),
           ("layercam", "backbone.blocks.2"), ("cameras", None)]
# multi-scale CAM at the model's target layer with other scale sets than its default (1, 2, 3, 4)
CAMERAS_SCALES = [(1,), (1, 2), (1, 2, 3)]


def cameras_map(model: LoadedModel, rgb: np.ndarray, scales: tuple[float, ...]) -> np.ndarray:
    """``gradcam_array(model, rgb, method="cameras")`` with other scales (same preprocessing and resizing)."""
    x = torch.from_numpy(model.preprocess(rgb)[None])
    with CAM(model.module, "cameras", model.target_layer, lock=model._lock, scales=scales) as cam:
        small = cam(x)[0]
    return np.clip(model.preprocess.to_image(small, rgb), 0, 1)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="leukemia-cell")
    ap.add_argument("--n-cells", type=int, default=40)
    ap.add_argument("--out", default=None, help="JSON to write (default results/explain_layers_<model name>.json)")
    args = ap.parse_args()
    torch.set_num_threads(1)
    model = load_model(args.model, backend="torch")
    held = heldout_names(model.path)
    samples = [s for s in load_dataset("cnmc2019").samples if held is None or s.path.name in held]
    samples = samples[::max(1, len(samples) // args.n_cells)][:args.n_cells]
    size = model.input_size
    res: dict[str, list[float]] = {}
    sec: dict[str, list[float]] = {}
    predicted: list[str] = []
    for s in samples:
        rgb = read_image(s.path)
        mask = cell_mask(rgb)
        predicted.append(model.classes[int(model.predict_arrays([rgb])[0].argmax())])
        box = model.preprocess.frame(rgb)  # the part of the image the network sees (all of it without a crop)
        seen = (mask if box is None else crop_square(mask, *box)).astype(np.float32)
        for g in (7, 14, 28):
            small = cv2.resize(seen, (g, g), interpolation=cv2.INTER_AREA)
            up = model.preprocess.to_image(cv2.resize(small, (size, size)), rgb)
            res.setdefault(f"outline map {g}x{g}", []).append(mass_in(np.clip(up, 0, 1), mask))
        for method, layer in CONFIGS:
            t = time.perf_counter()
            heat = gradcam_array(model, rgb, method=method, layer=layer)
            dt = time.perf_counter() - t
            m = get_method(method)
            used = resolve_layer(model.module, m, layer, model.target_layer)
            name = f"{method} @ {used}" + (f" scales {tuple(m.scales)}" if m.scales else "") + (
                " (its default)" if layer is None else "")
            res.setdefault(name, []).append(mass_in(heat, mask))
            sec.setdefault(name, []).append(dt)
        for scales in CAMERAS_SCALES:
            t = time.perf_counter()
            heat = cameras_map(model, rgb, scales)
            dt = time.perf_counter() - t
            name = f"cameras @ {model.target_layer} scales {tuple(float(s) for s in scales)}"
            res.setdefault(name, []).append(mass_in(heat, mask))
            sec.setdefault(name, []).append(dt)
    table = {k: float(np.nanmean(v)) for k, v in res.items()}
    print(f"{len(samples)} held-out C-NMC 2019 cells, model {model.name}; mean share of heatmap mass inside the cell\n")
    seconds = {k: float(np.median(v)) for k, v in sec.items()}
    classes = sorted(set(predicted))
    by_class = {k: {c: float(np.nanmean([x for x, p in zip(v, predicted, strict=True) if p == c])) for c in classes}
                for k, v in res.items()}
    counts = ", ".join(f"{c} {predicted.count(c)}" for c in classes)
    print(f"| map | mass in cell | by predicted class ({counts}) | s / image (median, 1 thread) |\n|---|---|---|---|")
    for k, v in table.items():
        per = " / ".join(f"{by_class[k][c]:.3f}" for c in classes)
        print(f"| {k} | {v:.3f} | {per} | " + (f"{seconds[k]:.3f} |" if k in seconds else "|"))
    out = Path(args.out) if args.out else RESULTS / f"explain_layers_{model.name}.json"
    out.write_text(json.dumps({"model": model.name, "n_cells": len(samples), "mass_in_cell": table,
                               "predicted": {c: predicted.count(c) for c in classes},
                               "mass_in_cell_by_predicted_class": by_class, "seconds_per_image_median": seconds},
                              indent=1))
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main()
