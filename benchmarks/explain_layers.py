"""Which layer can Grad-CAM localise from? Mass of the heatmap inside the cell on held-out C-NMC 2019 cells, for each
method x layer of the backbone, next to the ceiling of a perfect map at each grid size.

    .venv/bin/python benchmarks/explain_layers.py [--model leukemia-cell] [--n-cells 40]

The ceiling of a g x g grid: the cell mask averaged onto g x g cells, upsampled as a CAM is (to the network's input,
then to the image), its mass inside the mask. A map of a stride-32 layer (7 x 7 at 224 px) cannot exceed the 7 x 7
ceiling however right it is. Target of issue 4: mass inside the cell >= 0.9. Writes
benchmarks/results/explain_layers_<model>.json.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import cv2
import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from explain_localisation import cell_mask, heldout_names, mass_in  # noqa: E402

from leukoscope.data.datasets import load_dataset  # noqa: E402
from leukoscope.data.images import read_image  # noqa: E402
from leukoscope.explain import gradcam_array  # noqa: E402
from leukoscope.explain.cam import get_method, resolve_layer  # noqa: E402
from leukoscope.models import load_model  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
CONFIGS = [("gradcam", None), ("gradcam", "backbone.blocks.5"), ("gradcam", "backbone.blocks.4"),
           ("gradcam", "backbone.blocks.3"), ("gradcam", "backbone.blocks.2"), ("gradcam++", "backbone.blocks.4"),
           ("layercam", None), ("layercam", "backbone.bn2"), ("layercam", "backbone.blocks.3"),
           ("layercam", "backbone.blocks.2")]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="leukemia-cell")
    ap.add_argument("--n-cells", type=int, default=40)
    args = ap.parse_args()
    torch.set_num_threads(1)
    model = load_model(args.model, backend="torch")
    held = heldout_names(model.path)
    samples = [s for s in load_dataset("cnmc2019").samples if held is None or s.path.name in held]
    samples = samples[::max(1, len(samples) // args.n_cells)][:args.n_cells]
    size = model.input_size
    res: dict[str, list[float]] = {}
    for s in samples:
        rgb = read_image(s.path)
        mask = cell_mask(rgb)
        for g in (7, 14, 28):
            small = cv2.resize(mask.astype(np.float32), (g, g), interpolation=cv2.INTER_AREA)
            up = cv2.resize(cv2.resize(small, (size, size)), rgb.shape[1::-1])
            res.setdefault(f"ceiling {g}x{g} (a perfect map)", []).append(mass_in(np.clip(up, 0, 1), mask))
        for method, layer in CONFIGS:
            heat = gradcam_array(model, rgb, method=method, layer=layer)
            used = resolve_layer(model.module, get_method(method), layer, model.target_layer)
            name = f"{method} @ {used}" + (" (its default)" if layer is None else "")
            res.setdefault(name, []).append(mass_in(heat, mask))
    table = {k: float(np.nanmean(v)) for k, v in res.items()}
    print(f"{len(samples)} held-out C-NMC 2019 cells, model {model.name}; mean share of heatmap mass inside the cell\n")
    print("| map | mass in cell |\n|---|---|")
    for k, v in table.items():
        print(f"| {k} | {v:.3f} |")
    out = RESULTS / f"explain_layers_{model.name}.json"
    out.write_text(json.dumps({"model": model.name, "n_cells": len(samples), "mass_in_cell": table}, indent=1))
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main()
