"""White-cell detection in whole smear fields: red-cell size, recall on real BCCD and ALL-IDB1 fields, red cells and
platelets not counted, touching cells split, smudge cells dropped.

Floors are a little under what was measured (benchmarks/wbc_detection.py has the full evaluation)."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage as ndi

from leukoscope.data.datasets import load_dataset
from leukoscope.data.images import read_image
from leukoscope.preprocess.cells import DetectConfig, detect_cells, estimate_rbc_diameter

# Centres of the ALL-IDB2 crops (257 x 257, each centred on the field's one white cell) cut from the healthy
# ALL-IDB1 fields, from the crop-to-field table of all_idb/DATA.md: top-left + 128.
HEALTHY_CELL_CENTRES = {"Im037_0": (869, 230), "Im071_0": (1351, 742), "Im073_0": (1324, 760),
                        "Im075_0": (1435, 895), "Im086_0": (1327, 703)}


@pytest.fixture(scope="module")
def bccd(data_root):
    return load_dataset("bccd", root=data_root / "bccd")


@pytest.fixture(scope="module")
def idb1(data_root):
    ds = load_dataset("all_idb1", root=data_root / "all_idb")
    return {s.path.stem: s for s in ds.samples}


def _wbc_boxes(sample) -> list[tuple[int, int, int, int]]:
    return [(b["xmin"], b["ymin"], b["xmax"], b["ymax"]) for b in sample.meta["boxes"] if b["name"] == "WBC"]


def _matched(cells, boxes) -> int:
    """One-to-one: a box is found when an unused detection's centroid lies inside it."""
    used, tp = set(), 0
    for x0, y0, x1, y1 in boxes:
        for i, c in enumerate(cells):
            if i not in used and x0 <= c.x <= x1 and y0 <= c.y <= y1:
                used.add(i)
                tp += 1
                break
    return tp


def test_rbc_diameter_matches_bccd_boxes_and_is_smaller_on_all_idb1(bccd, idb1) -> None:
    samples = [s for s in bccd.samples if s.meta["official_split"] == "test"][:6]
    ratios, bccd_d = [], []
    for s in samples:
        d = estimate_rbc_diameter(read_image(s.path))
        gt = np.median([(b["xmax"] - b["xmin"] + b["ymax"] - b["ymin"]) / 2 for b in s.meta["boxes"]
                        if b["name"] == "RBC"])
        ratios.append(d / gt)
        bccd_d.append(d)
    # Measured 0.88x the annotated red-cell boxes (median over 60 train/val fields); boxes are larger than cells.
    assert 0.7 <= np.median(ratios) <= 1.1, ratios
    idb_d = estimate_rbc_diameter(read_image(idb1["Im003_1"].path))
    # Isolated red cells of the 1712 x 1368 ALL-IDB1 fields measure ~71 px (equivalent diameter); BCCD is more
    # magnified (~100 px), whatever the image sizes (BCCD 640 x 480 is the smaller image).
    assert 60 <= idb_d <= 80
    assert np.median(bccd_d) > 1.1 * idb_d


def test_bccd_test_fields_recall_and_one_detection_per_white_cell(bccd) -> None:
    samples = [s for s in bccd.samples if s.meta["official_split"] == "test"][:12]
    n_gt = n_tp = n_det = 0
    for s in samples:
        cells = detect_cells(read_image(s.path)).cells
        boxes = _wbc_boxes(s)
        n_gt += len(boxes)
        n_det += len(cells)
        n_tp += _matched(cells, boxes)
    # Measured 13/13 found with 13 detections on these 12 fields (11 with one WBC box, one with two).
    assert n_gt == 13
    assert n_tp / n_gt >= 0.92
    # Red cells (dozens per field) and platelets are not counted: about one detection per white cell.
    assert n_det <= n_gt + 1


def test_all_idb1_masked_field_recall_and_centroids_inside_mask(idb1) -> None:
    s = idb1["Im003_1"]
    det = detect_cells(read_image(s.path))
    mask = read_image(s.meta["wbc_mask"])[..., 0] > 0
    lab, n = ndi.label(mask)
    hits = [int(lab[int(round(c.y)), int(round(c.x))]) for c in det.cells]
    found = {h for h in hits if h}
    # Measured: all 12 mask components found; 12 of 15 centroids inside the mask (the others are unmasked cells).
    assert n == 12
    assert len(found) / n >= 0.9
    assert sum(h > 0 for h in hits) / len(hits) >= 0.75
    # Every blast centroid of the field has a detected cell within half a cell diameter.
    blasts = s.meta["blasts"]
    near = [any(np.hypot(c.x - bx, c.y - by) <= np.sqrt(c.area / np.pi) for c in det.cells) for bx, by in blasts]
    assert sum(near) == len(blasts) == 11


@pytest.mark.parametrize("field", sorted(HEALTHY_CELL_CENTRES))
def test_healthy_field_has_its_one_white_cell_and_no_platelets(idb1, field: str) -> None:
    """Each healthy field holds one white cell among hundreds of red cells (and platelets in Im071_0/Im086_0)."""
    det = detect_cells(read_image(idb1[field].path))
    assert len(det.cells) == 1
    c = det.cells[0]
    cx, cy = HEALTHY_CELL_CENTRES[field]
    assert np.hypot(c.x - cx, c.y - cy) < 0.3 * det.rbc_diameter  # measured <= 12.3 px, red cell ~80 px
    x0, y0, x1, y1 = c.bbox
    assert x0 <= c.x <= x1 and y0 <= c.y <= y1


def test_touching_blasts_are_split_and_smudges_dropped(idb1) -> None:
    """Im005_1 has a cluster of five touching blasts and several smudge cells (neither is in the WBC mask)."""
    s = idb1["Im005_1"]
    det = detect_cells(read_image(s.path))
    mask = read_image(s.meta["wbc_mask"])[..., 0] > 0
    lab, n = ndi.label(mask)
    found = {int(lab[int(round(c.y)), int(round(c.x))]) for c in det.cells} - {0}
    # Measured 30 of 32 components (one is a 314 px sliver at the border, one blast shares a segment).
    assert len(found) >= 28
    assert len(det.smudges) >= 1
    for sm in det.smudges:
        assert not mask[int(round(sm.y)), int(round(sm.x))]


def _synthetic_field(seed: int = 0) -> tuple[np.ndarray, list[tuple[float, float]]]:
    """Glass, 40 pink red cells (diameter 40 px), 2 platelets, one lone nucleus and two touching nuclei."""
    rng = np.random.default_rng(seed)
    h, w = 400, 600
    img = np.full((h, w, 3), (232, 228, 222), np.float32)
    yy, xx = np.mgrid[:h, :w]
    for _ in range(40):
        cy, cx = rng.uniform(20, h - 20), rng.uniform(20, w - 20)
        img[np.hypot(yy - cy, xx - cx) <= 20] = (210, 150, 160)
    for cy, cx in ((60, 80), (330, 520)):  # platelets: purple but small
        img[np.hypot(yy - cy, xx - cx) <= 4] = (140, 80, 170)
    nuclei = [(200.0, 150.0), (200.0, 400.0), (200.0, 450.0)]
    for cy, cx in nuclei:
        img[np.hypot(yy - cy, xx - cx) <= 40] = (200, 185, 225)  # pale cytoplasm
    for cy, cx in nuclei:
        img[np.hypot(yy - cy, xx - cx) <= 26] = (100, 40, 150)
    img += rng.normal(0, 3, img.shape)
    return np.clip(img, 0, 255).astype(np.uint8), [(x, y) for y, x in nuclei]


def test_synthetic_field_counts_split_and_config() -> None:
    rgb, centres = _synthetic_field()
    before = rgb.copy()
    det = detect_cells(rgb, DetectConfig(rbc_diameter=40.0))
    np.testing.assert_array_equal(rgb, before)  # input not modified
    assert len(det.cells) == 3
    got = sorted((c.x, c.y) for c in det.cells)
    for (gx, gy), (ex, ey) in zip(got, sorted(centres), strict=True):
        assert abs(gx - ex) < 6 and abs(gy - ey) < 6  # touching pair: the cut is not exactly midway
    # Nucleus r=26 px: 2124 px drawn; measured 2531 (the threshold sits below the middle of the nucleus-cytoplasm
    # step, so smoothing moves the edge outwards by ~2 px). The cell adds a 0.3 red-cell margin (12 px).
    lone = min(det.cells, key=lambda c: c.x)
    assert lone.nucleus_area == pytest.approx(np.pi * 26**2, rel=0.25)
    assert lone.area == pytest.approx(np.pi * (np.sqrt(lone.nucleus_area / np.pi) + 12) ** 2, rel=0.1)
    assert det.labels.max() == 3
    measured = estimate_rbc_diameter(rgb)
    assert 32 <= measured <= 48


def test_bad_inputs_are_rejected_with_what_was_received() -> None:
    with pytest.raises(ValueError, match=r"unknown detection setting\(s\) \['min_aera'\]"):
        DetectConfig.from_dict({"min_aera": 0.3})
    with pytest.raises(ValueError, match="shape"):
        detect_cells(np.zeros((100, 100), np.uint8))
    with pytest.raises(ValueError, match="blank"):
        estimate_rbc_diameter(np.full((200, 300, 3), 230, np.uint8))
    with pytest.raises(ValueError, match="positive"):
        detect_cells(np.full((200, 300, 3), 230, np.uint8), DetectConfig(rbc_diameter=0.0))
