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


def test_gradcam_peak_and_heat_lie_on_the_cell(shipped, heldout_cells):
    # The shipped model crops a cut-out cell to its square (crop: cutout) and was trained to keep the leukemic map on
    # the cell (cam_mask). Measured on these 8 cells with the weights shipped on 2026-12-04 (every source): mass
    # inside 0.67 (one map all zero, counted as 0), peak inside 6 of 8. The weights before (aria, ALL-IDB2, C-NMC
    # only) gave 0.94 and 8 of 8: learning other laboratories' cells cost heatmap localisation on cells on black.
    # A uniform map holds ~0.20.
    masses, hits = [], []
    for rgb in heldout_cells:
        heat = gradcam_array(shipped, rgb)
        assert heat.shape == rgb.shape[:2] and heat.min() >= 0
        mask = _cell_mask(rgb)
        masses.append(float(heat[mask].sum() / heat.sum()) if heat.sum() > 0 else 0.0)
        hits.append(heat.sum() > 0 and mask[np.unravel_index(int(heat.argmax()), heat.shape)])
    assert np.mean(masses) >= 0.5, masses
    assert np.mean(hits) >= 5 / 8, hits


def test_other_cams_put_most_heat_on_the_cell(shipped, heldout_cells):
    # Most of the heat of the other CAMs lies on the cell too (a uniform map holds ~0.20).
    for method in ("layercam", "gradcam++"):
        masses = []
        for rgb in heldout_cells:
            heat = gradcam_array(shipped, rgb, method=method)
            masses.append(float(heat[_cell_mask(rgb)].sum() / heat.sum()))
        assert np.mean(masses) >= 0.75, (method, masses)


def test_gradcam_heat_falls_on_white_cells_in_all_idb1_windows(shipped, data_root):
    # 257 x 257 windows centred on every third blast of Im005_1 (expert white-cell mask), the mass inside white cells
    # against a uniform map's (chance), and the share of peaks inside a white cell.
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
    assert np.mean(mass) > 1.5 * np.mean(chance), (mass, chance)
    # these weights (2026-12-04): peak inside a white cell in 5 of 8 (the weights before: 7 of 8)
    assert np.mean(hits) >= 0.5, (hits, chance)
