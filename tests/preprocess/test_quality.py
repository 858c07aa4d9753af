"""Image-quality checks on real images: each warning is raised by a real image that the test alters itself, and the
unaltered images raise none. The reference is fitted here on 200 real images (40 per training source) that are not
among the images checked. benchmarks/quality_checks.py measures the rates on held-out images."""

from __future__ import annotations

import json
import math

import cv2
import numpy as np
import pytest

from leukoscope.data.datasets import load_dataset
from leukoscope.data.images import read_image
from leukoscope.preprocess.cells import detect_cells
from leukoscope.preprocess.quality import (
    MEASURES,
    QUALITY_CODES,
    QualityReference,
    QualityWarning,
    check_field,
    image_stats,
)
from leukoscope.preprocess.shifts import blur, gain, hue, zoom_in

SOURCES = ("aria", "all_idb2", "cnmc2019", "pbc", "deepapl")
FIT_PER_SOURCE = 40


@pytest.fixture(scope="module")
def datasets(data_root):
    return {s: load_dataset(s) for s in SOURCES}


def _step(ds) -> int:
    return len(ds) // FIT_PER_SOURCE


@pytest.fixture(scope="module")
def bases(datasets) -> dict[str, list[np.ndarray]]:
    """Two real images per source that the reference is not fitted on: half-way between two fitted ones."""
    return {s: [read_image(ds.samples[_step(ds) * k + _step(ds) // 2].path) for k in (3, 11)]
            for s, ds in datasets.items()}


@pytest.fixture(scope="module")
def reference(datasets) -> QualityReference:
    """Fitted on every ``_step``-th image of each source (all cell types and classes of the sorted listing)."""
    images = [read_image(x.path) for ds in datasets.values() for x in ds.samples[:: _step(ds)][:FIT_PER_SOURCE]]
    assert len(images) == FIT_PER_SOURCE * len(SOURCES)
    return QualityReference.fit(images)


@pytest.fixture(scope="module")
def idb1_field(data_root) -> np.ndarray:
    ds = load_dataset("all_idb1")
    return read_image(next(x.path for x in ds.samples if x.path.stem == "Im001_1"))


@pytest.fixture(scope="module")
def bccd_field(data_root) -> np.ndarray:
    ds = load_dataset("bccd")
    return read_image(next(x.path for x in ds.samples if x.meta.get("official_split") == "test"))


def codes(warnings: list[QualityWarning]) -> list[str]:
    return [w.code for w in warnings]


# ---------------------------------------------------------------------------------------------------------------
# The measures
# ---------------------------------------------------------------------------------------------------------------
def test_image_stats_has_every_measure_in_range(bases) -> None:
    for source, images in bases.items():
        st = image_stats(images[0])
        assert list(st) == list(MEASURES)
        assert 0 <= st["brightness"] <= 255 and 0 <= st["median"] <= st["brightness"]
        for share in ("clipped", "black", "cutout", "nucleus", "cell"):
            assert 0 <= st[share] <= 1, (source, share, st[share])
        assert st["nucleus"] <= st["cell"] + 1e-9, source
        assert (st["cutout"] > 0.5) == (source == "cnmc2019"), (source, st["cutout"])


def test_sharpness_falls_with_blur_but_not_with_dimming(bases) -> None:
    img = bases["pbc"][0]
    sharp = [image_stats(blur(img, s))["sharpness"] if s else image_stats(img)["sharpness"] for s in (0, 1, 2, 4)]
    assert all(a > b for a, b in zip(sharp, sharp[1:], strict=False)), sharp
    # Normalised by the grey range: halving the light moves it far less than the mildest blur does.
    dimmed = image_stats(gain(img, 0.5))
    assert abs(dimmed["sharpness"] - sharp[0]) < 0.5 * (sharp[0] - sharp[1])
    assert dimmed["brightness"] < 0.6 * image_stats(img)["brightness"]


def test_zoom_in_enlarges_the_cell_and_shrinks_the_span(bases) -> None:
    img = bases["pbc"][0]
    a, b = image_stats(img), image_stats(zoom_in(img, 2))
    assert b["cell"] > 1.3 * a["cell"]
    assert b["span"] < 0.75 * a["span"]


# ---------------------------------------------------------------------------------------------------------------
# The single-cell model's check
# ---------------------------------------------------------------------------------------------------------------
def test_unaltered_real_images_give_no_warning(reference, bases) -> None:
    found = {f"{s}[{i}]": codes(reference.check(img)) for s, images in bases.items() for i, img in enumerate(images)}
    assert all(not c for c in found.values()), found


ALTERATIONS = [
    ("all_idb2", "blurred", lambda im: blur(im, 3), "out_of_focus"),
    ("pbc", "blurred", lambda im: blur(im, 3), "out_of_focus"),
    ("cnmc2019", "blurred", lambda im: blur(im, 3), "out_of_focus"),
    ("pbc", "darkened", lambda im: gain(im, 0.4), "underexposed"),
    ("all_idb2", "darkened", lambda im: gain(im, 0.4), "underexposed"),
    ("aria", "darkened", lambda im: gain(im, 0.4), "underexposed"),
    ("pbc", "brightened", lambda im: gain(im, 1.6), "overexposed"),
    ("deepapl", "brightened", lambda im: gain(im, 1.6), "overexposed"),
    ("pbc", "channels swapped", lambda im: np.ascontiguousarray(im[..., [1, 2, 0]]), "stain"),
    ("cnmc2019", "channels swapped", lambda im: np.ascontiguousarray(im[..., [1, 2, 0]]), "stain"),
    ("deepapl", "hue rotated", lambda im: hue(im, 90), "stain"),
    ("all_idb2", "hue rotated", lambda im: hue(im, 90), "stain"),
    ("pbc", "zoomed in", lambda im: zoom_in(im, 3), "cell_size"),
    ("deepapl", "zoomed in", lambda im: zoom_in(im, 3), "cell_size"),
    ("cnmc2019", "zoomed in", lambda im: zoom_in(im, 2), "cell_size"),
]


@pytest.mark.parametrize(("source", "what", "alter", "code"), ALTERATIONS,
                         ids=[f"{s}-{w}" for s, w, _, _ in ALTERATIONS])
def test_altered_real_image_warns(reference, bases, source, what, alter, code) -> None:
    img = bases[source][0]
    assert reference.check(img) == [], "the unaltered image must be clean for this test to mean anything"
    warnings = reference.check(alter(img))
    assert code in codes(warnings), (source, what, [w.message for w in warnings])
    message = next(w.message for w in warnings if w.code == code)
    assert any(ch.isdigit() for ch in message) and message.endswith("."), message


def test_whole_fields_given_to_the_cell_check_warn(reference, idb1_field, bccd_field) -> None:
    for name, img in (("ALL-IDB1", idb1_field), ("BCCD", bccd_field)):
        warnings = reference.check(img)
        assert "whole_field" in codes(warnings), (name, [w.message for w in warnings])
        assert "cell_size" not in codes(warnings), "a field's small cells are explained by the field warning"
    # A square crop of the low-magnification ALL-IDB1 field still spans far more red cells than any crop.
    h = idb1_field.shape[0]
    assert "whole_field" in codes(reference.check(idb1_field[:, :h]))


def test_warnings_come_once_per_code_in_code_order(reference, bases) -> None:
    img = gain(blur(bases["pbc"][0], 4), 0.4)
    found = codes(reference.check(img))
    assert {"out_of_focus", "underexposed"} <= set(found)
    assert len(found) == len(set(found))
    assert found == sorted(found, key=QUALITY_CODES.index)


# ---------------------------------------------------------------------------------------------------------------
# Saving and loading
# ---------------------------------------------------------------------------------------------------------------
def test_saved_reference_gives_the_same_warnings(reference, bases, tmp_path) -> None:
    path = tmp_path / "model" / "quality.json"
    reference.save(path)
    json.loads(path.read_text(), parse_constant=lambda c: pytest.fail(f"{c} in quality.json"))
    loaded = QualityReference.load(path)
    assert loaded.margins.keys() == reference.margins.keys()
    for k, v in reference.margins.items():
        assert math.isclose(loaded.margins[k], v, rel_tol=1e-3, abs_tol=1e-4)
    for img in (bases["pbc"][0], gain(bases["pbc"][0], 0.4), blur(bases["all_idb2"][0], 3)):
        assert codes(loaded.check(img)) == codes(reference.check(img))


def test_foreign_or_bad_input_is_refused_with_a_message(reference, tmp_path) -> None:
    with pytest.raises(ValueError, match="not a leukoscope quality reference"):
        QualityReference.from_dict({"format": "something-else", "stats": []})
    bad = reference.to_dict() | {"version": 99}
    with pytest.raises(ValueError, match="version 99"):
        QualityReference.from_dict(bad)
    broken = tmp_path / "quality.json"
    broken.write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        QualityReference.load(broken)
    with pytest.raises(ValueError, match="at least 10"):
        QualityReference.from_stats([image_stats(np.full((64, 64, 3), 200, np.uint8))] * 3)
    with pytest.raises(ValueError, match="unknown quality code"):
        QualityWarning("blurry", "The image is blurry.")
    with pytest.raises(ValueError, match="uint8"):
        reference.check(np.zeros((64, 64, 3), np.float32))
    with pytest.raises(ValueError, match=r"\(H, W, 3\)"):
        check_field(np.zeros((64, 64), np.uint8))


# ---------------------------------------------------------------------------------------------------------------
# The field scanner's check
# ---------------------------------------------------------------------------------------------------------------
def test_cell_crops_given_to_the_field_scanner_warn_single_cell(bases) -> None:
    for source in ("pbc", "cnmc2019", "all_idb2"):
        warnings = check_field(bases[source][0])
        assert "single_cell" in codes(warnings), (source, [w.message for w in warnings])


def test_real_fields_give_no_field_warning(idb1_field, bccd_field) -> None:
    for name, img in (("ALL-IDB1", idb1_field), ("BCCD", bccd_field)):
        assert check_field(img) == [], name


def test_blurred_and_darkened_fields_warn(idb1_field, bccd_field) -> None:
    for name, img in (("ALL-IDB1", idb1_field), ("BCCD", bccd_field)):
        det = detect_cells(img)
        blurred = cv2.GaussianBlur(img, (0, 0), 0.1 * det.rbc_diameter)
        assert "out_of_focus" in codes(check_field(blurred)), name
        assert "underexposed" in codes(check_field(gain(img, 0.45))), name
        # The scanner's own detection may be passed in; it gives the same answer.
        assert codes(check_field(blurred, detect_cells(blurred))) == codes(check_field(blurred))


def test_calibration_on_other_images_sets_margins_that_keep_real_images_quiet(datasets, bases) -> None:
    fit = [read_image(x.path) for ds in datasets.values() for x in ds.samples[:: _step(ds)][:FIT_PER_SOURCE]]
    # Images half-way between the fitted ones, other than the bases (k = 3 and 11).
    calib = [read_image(ds.samples[_step(ds) * k + _step(ds) // 2].path) for ds in datasets.values()
             for k in (0, 1, 2, 4, 5, 6, 7, 8, 9, 10)]
    ref = QualityReference.fit(fit, calibration=calib)
    assert set(ref.margins) == {"blur", "dark", "bright", "large", "small"}
    assert all(v >= ref.min_margin for v in ref.margins.values())
    found = {f"{s}[{i}]": codes(ref.check(img)) for s, images in bases.items() for i, img in enumerate(images)}
    assert all(not c for c in found.values()), found
    assert "underexposed" in codes(ref.check(gain(bases["pbc"][0], 0.4)))
    with pytest.raises(ValueError, match="at least 50"):
        QualityReference.fit(fit[:20], calibration=calib[:5])
