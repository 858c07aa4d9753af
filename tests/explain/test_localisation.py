"""The shipped model's heatmaps sit on the cell: C-NMC 2019 cells held out from its training (its split.json), and
blasts in ALL-IDB1 fields with expert white-cell masks. Thresholds sit below the rates measured by
benchmarks/explain_localisation.py on the same images (see docs/EXPLAIN.md); images are chosen by position in the
held-out list, never by how well they explain."""

from __future__ import annotations

import json

import cv2
import numpy as np
import pytest
from PIL import Image
from scipy import ndimage

from leukoscope.data.datasets import load_dataset
from leukoscope.data.images import read_image
from leukoscope.explain import gradcam_array
from leukoscope.models import load_model


@pytest.fixture(scope="module")
def shipped():
    return load_model("leukemia-cell", backend="torch")


def _cell_mask(rgb: np.ndarray) -> np.ndarray:
    fg = rgb.max(axis=2) > 15  # the cell is the non-black region (holes filled)
    fg = cv2.morphologyEx(fg.astype(np.uint8), cv2.MORPH_OPEN, np.ones((3, 3), np.uint8)).astype(bool)
    return ndimage.binary_fill_holes(fg)


@pytest.fixture(scope="module")
def heldout_cells(shipped, data_root):
    names = {p.rsplit("/", 1)[-1] for p in json.loads((shipped.path / "split.json").read_text())["parts"]["test"]}
    ds = load_dataset("cnmc2019", root=data_root / "cnmc2019")
    paths = [s.path for s in ds.samples if s.path.name in names]
    assert len(paths) >= 20, f"expected held-out C-NMC images in {shipped.path / 'split.json'}, found {len(paths)}"
    return [read_image(p) for p in paths[::5][:8]]


def test_layercam_peak_lies_on_the_cell(shipped, heldout_cells):
    hits = []
    for rgb in heldout_cells:
        heat = gradcam_array(shipped, rgb, method="layercam")
        assert heat.shape == rgb.shape[:2]
        hits.append(_cell_mask(rgb)[np.unravel_index(int(heat.argmax()), heat.shape)])
    assert np.mean(hits) >= 7 / 8, hits  # measured: 47 of 50 held-out cells


def test_gradcam_heat_concentrates_on_the_cell(shipped, heldout_cells):
    # Grad-CAM at the 7 x 7 last stage is coarse: even a perfect 7 x 7 map puts only ~0.75 of its mass inside these
    # cells. It must still put far more heat on the cell than a uniform map (= the cell's area share, ~0.18).
    ratios = []
    for rgb in heldout_cells:
        heat = gradcam_array(shipped, rgb)
        mask = _cell_mask(rgb)
        ratios.append(float(heat[mask].sum() / heat.sum()) / float(mask.mean()))
    assert np.mean(ratios) > 1.8, ratios


def test_gradcam_heat_falls_on_white_cells_in_all_idb1_windows(shipped, data_root):
    # 257 x 257 windows centred on every third blast of Im005_1 (expert white-cell mask). Measured on these 8 windows:
    # Grad-CAM mass inside white cells 0.43 against 0.30 for a uniform map, peak inside a white cell 4 of 8. Whole
    # benchmark (63 windows): peak inside 0.51 against chance 0.34; see docs/EXPLAIN.md.
    ds = load_dataset("all_idb1", root=data_root / "all_idb")
    field = next(s for s in ds.samples if s.path.stem == "Im005_1")
    rgb = read_image(field.path)
    wbc = np.asarray(Image.open(field.meta["wbc_mask"]).convert("L")) > 0
    mass, hits, chance = [], [], []
    for x, y in field.meta["blasts"][::3]:
        x0, y0 = int(np.clip(x - 128, 0, rgb.shape[1] - 257)), int(np.clip(y - 128, 0, rgb.shape[0] - 257))
        crop, m = rgb[y0:y0 + 257, x0:x0 + 257], wbc[y0:y0 + 257, x0:x0 + 257]
        heat = gradcam_array(shipped, crop)
        mass.append(float(heat[m].sum() / heat.sum()))
        hits.append(m[np.unravel_index(int(heat.argmax()), heat.shape)])
        chance.append(float(m.mean()))
    assert np.mean(mass) > 1.2 * np.mean(chance), (mass, chance)
    assert np.mean(hits) >= np.mean(chance), (hits, chance)
