"""The learned white-cell detector: arrow marks, red-cell scale in dense fields, peak decoding, the training pieces
and the shipped detector on real ALL-IDB1 fields."""

from __future__ import annotations

import json

import numpy as np
import pytest

from leukoscope.data.datasets import load_dataset
from leukoscope.data.images import read_image
from leukoscope.preprocess.cells import estimate_rbc_diameter
from leukoscope.preprocess.wbc_detector import (
    DETECTOR_DIR,
    arrow_mask,
    find_peaks,
    load_detector,
    measure_rbc,
    remove_marks,
    to_work,
)


@pytest.fixture(scope="module")
def idb1(data_root):
    ds = load_dataset("all_idb1", root=data_root / "all_idb")
    return {s.path.stem: s for s in ds.samples}


def test_arrow_marks_are_found_and_painted_out(idb1) -> None:
    marked = read_image(idb1["Im002_1"].path)  # DATA.md: a yellow arrow burned in near (900, 930)
    mask = arrow_mask(marked)
    ys, xs = np.nonzero(mask)
    assert 1000 < mask.sum() < 20000
    assert 850 < xs.mean() < 960 and 870 < ys.mean() < 1000
    clean, n = remove_marks(marked)
    assert n == mask.sum() and not arrow_mask(clean).any()
    assert np.array_equal(clean[~mask], marked[~mask])  # only the arrow's pixels change
    assert not np.shares_memory(clean, marked)
    for name in ("Im001_1", "Im005_1", "Im041_0", "Im062_1"):  # no arrows (DATA.md), eosinophils or stain are kept
        rgb = read_image(idb1[name].path)
        same, n = remove_marks(rgb)
        assert n == 0 and same is rgb


def test_red_cells_measured_away_from_white_cells_in_dense_fields(idb1) -> None:
    # Im061_1 is a dense blast field: plain granulometry takes the blasts for red cells.
    healthy = [measure_rbc(read_image(idb1[n].path)) for n in ("Im041_0", "Im073_0", "Im101_0")]
    dense = read_image(idb1["Im061_1"].path)
    plain, margin = estimate_rbc_diameter(dense), measure_rbc(dense)
    ref = float(np.median(healthy))
    assert plain > 1.3 * ref  # the failure the margin removes
    assert abs(margin - ref) < 0.12 * ref
    # Fields without many white cells measure the same either way.
    rgb = read_image(idb1["Im041_0"].path)
    assert estimate_rbc_diameter(rgb) == pytest.approx(measure_rbc(rgb), rel=0.02)


def test_find_peaks_keeps_separate_cells_and_merges_close_maxima() -> None:
    prob = np.zeros((40, 50), np.float32)
    prob[10, 10] = 0.9
    prob[10, 11] = 0.45  # the same cell's shoulder: refines the centre to the right
    prob[30, 40] = 0.7
    prob[30, 43] = 0.6  # 24 work px from the peak at (40, 30): within min_distance 32, dropped
    prob[5, 45] = 0.2  # below the threshold
    peaks = find_peaks(prob, threshold=0.3, min_distance=32)
    assert len(peaks) == 2
    (x0, y0, p0), (x1, y1, p1) = peaks
    assert p0 == pytest.approx(0.9) and p1 == pytest.approx(0.7)
    assert 10 * 8 + 3.5 < x0 < 11 * 8 + 3.5 and y0 == pytest.approx(10 * 8 + 3.5)
    assert (x1, y1) == pytest.approx((40 * 8 + 3.5, 30 * 8 + 3.5))
    assert len(find_peaks(prob, threshold=0.3, min_distance=16)) == 3


def test_work_image_is_padded_to_16_and_normalised() -> None:
    rgb = np.full((50, 70, 3), 255, np.uint8)
    x = to_work(rgb, 0.5)
    assert x.shape == (1, 3, 32, 48) and x.dtype == np.float32
    assert x.max() == pytest.approx(1.0) and x.min() >= -1.0


def test_dihedral_views_move_points_with_the_pixels() -> None:
    from leukoscope.train.wbc_detector import _dihedral

    img = np.zeros((30, 50), np.uint8)
    pts = np.array([[7.0, 4.0], [40.0, 25.0]], np.float32)
    for x, y in pts.astype(int):
        img[y, x] = 255
    for k in range(8):
        out, (moved,) = _dihedral(img, k, pts)
        for x, y in moved.astype(int):
            assert out[y, x] == 255, k
        assert out.sum() == img.sum()


def test_focal_loss_ignores_ignored_cells_and_rewards_the_centre() -> None:
    import torch

    from leukoscope.train.wbc_detector import focal_loss

    target = torch.zeros(1, 8, 8)
    target[0, 4, 4] = 1.0
    ignore = torch.zeros(1, 8, 8, dtype=torch.bool)
    good = torch.full((1, 8, 8), -6.0)
    good[0, 4, 4] = 6.0
    bad = torch.full((1, 8, 8), -6.0)
    bad[0, 1, 1] = 6.0  # confident at an unlabelled object
    assert focal_loss(good, target, ignore) < 0.01 < focal_loss(bad, target, ignore)
    ignore[0, 1, 1] = True  # ... which the labels could not explain: not punished
    assert focal_loss(bad, target, ignore) < focal_loss(bad, target, torch.zeros_like(ignore))


def test_poisson_binomial_and_wilson_intervals() -> None:
    from leukoscope.scan import poisson_binomial_interval, wilson_interval

    assert poisson_binomial_interval([0.0] * 5) == (0, 0)
    assert poisson_binomial_interval([1.0] * 5) == (5, 5)
    assert poisson_binomial_interval([0.5, 0.5]) == (0, 2)
    assert poisson_binomial_interval([]) == (0, 0)
    lo, hi = wilson_interval(5, 10)
    assert (lo, hi) == pytest.approx((0.2366, 0.7634), abs=1e-4)
    assert wilson_interval(0, 20)[0] == 0.0 and 0.15 < wilson_interval(0, 20)[1] < 0.17


# ---- the shipped detector -------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def detector():
    return load_detector()


def test_shipped_detector_is_described(detector) -> None:
    info = json.loads((DETECTOR_DIR / "model.json").read_text())
    assert info["kind"] == "detector" and info["rebuild"] == "leukoscope detector train"
    assert 0.05 <= detector.threshold <= 0.95 and detector.work_rbc_px == 32


def test_shipped_detector_separates_touching_blasts_and_skips_platelets(detector, idb1) -> None:
    from leukoscope.train.wbc_detector import match

    s = idb1["Im062_1"]  # a dense 2592 x 1944 field, blasts touching
    rgb = read_image(s.path)
    found = detector.detect(rgb)
    cells = [(c.x, c.y) for c in found.cells]
    blasts = [(float(x), float(y)) for x, y in s.meta["blasts"]]
    assert len(match(cells, blasts, 0.6 * found.rbc_diameter)) >= 0.9 * len(blasts)
    # Healthy field: its platelets (other/*.xyc points without nuclear stain) are not white cells.
    h = idb1["Im041_0"]
    hd = detector.detect(read_image(h.path))
    platelets_hit = len(match([(c.x, c.y) for c in hd.cells], [(float(x), float(y)) for x, y in h.meta["other"]],
                              0.3 * hd.rbc_diameter))
    assert platelets_hit <= 2 and 1 <= len(hd.cells) <= 6


def test_onnx_and_torch_backends_agree(idb1) -> None:
    pytest.importorskip("onnxruntime")
    rgb = read_image(idb1["Im005_1"].path)
    a = load_detector(backend="onnx").heatmap(rgb)[0]
    b = load_detector(backend="torch").heatmap(rgb)[0]
    assert a.shape == b.shape
    assert np.abs(a - b).max() < 0.02


def test_detector_directory_errors(tmp_path) -> None:
    with pytest.raises(FileNotFoundError, match="no model.json"):
        load_detector(tmp_path)
    (tmp_path / "model.json").write_text(json.dumps({"kind": "image"}))
    with pytest.raises(ValueError, match="not a white-cell detector"):
        load_detector(tmp_path)


def test_shipped_card_reports_the_committed_cross_validation() -> None:
    """The card's recall table is generated from the k-fold results that `leukoscope detector train` wrote."""
    from pathlib import Path

    from leukoscope.train.wbc_detector import cv_recall

    doc = json.loads((Path(__file__).resolve().parents[2] / "benchmarks/results/wbc_detector_cv.json").read_text())
    card = (DETECTOR_DIR / "MODEL_CARD.md").read_text()
    info = json.loads((DETECTOR_DIR / "model.json").read_text())
    assert info["threshold"] == doc["threshold"] and info["fold_thresholds"] == [f["threshold"] for f in
                                                                                 doc["cv"]["folds"]]
    for size, r in cv_recall(doc).items():
        assert f"| {size} | {r['fields']} | {r['cells']} | {r['recall']:.3f} |" in card
    assert cv_recall(doc)["all"]["recall"] >= 0.95
