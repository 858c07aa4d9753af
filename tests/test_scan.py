"""The field pipeline (detect -> crop -> classify -> JSON / overlay / GeoJSON) and the ``scan`` CLI, on real ALL-IDB1
fields, with the shipped learned detector (the default) and the classical one. The classifier here is a small
stand-in with the model interface (``classes``, ``input_size``, ``predict_arrays``) so these tests stay fast;
benchmarks/field_detection.py runs the shipped model."""

from __future__ import annotations

import json

import cv2
import numpy as np
import pytest

from leukoscope.cli import main as cli_main
from leukoscope.data.datasets import load_dataset
from leukoscope.data.images import read_image
from leukoscope.scan import (
    ABNORMAL_COLOUR,
    ScanConfig,
    abnormal_class_names,
    crop_cell,
    is_partial,
    scan_field,
    to_geojson,
    write_outputs,
)


class NucleusFraction:
    """Stand-in classifier: p(leukemic) = share of purple (blue - green > 45) pixels in the crop's central third."""

    classes = ["healthy", "leukemic"]
    input_size = 96

    def __init__(self) -> None:
        self.seen: list[np.ndarray] = []

    def predict_arrays(self, images: list[np.ndarray]) -> np.ndarray:
        out = []
        for im in images:
            self.seen.append(im)
            h, w = im.shape[:2]
            c = im[h // 3: 2 * h // 3, w // 3: 2 * w // 3].astype(np.int16)
            p = float(((c[..., 2] - c[..., 1]) > 45).mean())
            out.append([1 - p, p])
        return np.asarray(out, np.float32)


@pytest.fixture(scope="module")
def idb1(data_root):
    ds = load_dataset("all_idb1", root=data_root / "all_idb")
    return {s.path.stem: s for s in ds.samples}


@pytest.fixture(scope="module")
def field(idb1):
    return read_image(idb1["Im003_1"].path)


@pytest.fixture(scope="module")
def scanned(field):
    model = NucleusFraction()
    heat = np.zeros((96, 96), np.float32)
    heat[40:56, 40:56] = 1.0
    # The classical detector: these tests pin its measured counts; the learned one has tests of its own below.
    result = scan_field(field, model, ScanConfig(detector="classical"),
                        explainer=lambda crops, ks: [heat for _ in crops])
    return model, result


def test_crops_are_centred_on_cells_and_scaled_by_red_cell_size(field, scanned) -> None:
    model, result = scanned
    assert len(result.cells) == len(model.seen) == 15  # measured: 15 white cells in Im003_1, 1 cut by the edge
    assert result.n_white_cells == 14 and result.n_partial == 1
    side = 3.6 * result.rbc_diameter
    assert 215 <= side <= 290  # ~257 px, the ALL-IDB2 crop size on these fields
    for sc, crop in zip(result.cells, model.seen, strict=True):
        assert crop.shape == (96, 96, 3)
        x0, y0, x1, y1 = sc.crop_box
        if x0 > 0 and y0 > 0 and x1 < field.shape[1] and y1 < field.shape[0]:
            assert abs((x0 + x1) / 2 - sc.cell.x) <= 1 and abs((y0 + y1) / 2 - sc.cell.y) <= 1
            assert abs((x1 - x0) - side) <= 1
    # The centre of most crops is a stained nucleus (the detected cell), not a red cell or glass.
    centres = np.array([c[44:52, 44:52].astype(int) for c in model.seen])
    purple = (centres[..., 2] - centres[..., 1] > 45).mean(axis=(1, 2)) > 0.5
    assert purple.mean() >= 0.8


def test_probabilities_flags_and_totals(scanned) -> None:
    _, result = scanned
    for sc in result.cells:
        assert sum(sc.proba.values()) == pytest.approx(1.0, abs=1e-5)
        assert sc.label == max(sc.proba, key=sc.proba.get)
        assert sc.abnormal == (sc.proba["leukemic"] >= 0.5 and not sc.partial)
        assert (sc.heatmap is not None) == sc.abnormal
    assert result.abnormal_classes == ["leukemic"]
    assert result.n_abnormal == sum(sc.abnormal for sc in result.cells) > 0
    assert result.abnormal_share == pytest.approx(result.n_abnormal / result.n_white_cells)


def test_written_json_geojson_and_overlay(field, scanned, tmp_path) -> None:
    _, result = scanned
    before = field.copy()
    paths = write_outputs(result, field, tmp_path, "Im003_1", source="Im003_1.jpg")
    np.testing.assert_array_equal(field, before)
    doc = json.loads(paths["json"].read_text())
    assert doc["white_cells"] == len(doc["cells"]) - doc["partial_cells"] == result.n_white_cells
    assert doc["abnormal_cells"] == sum(c["abnormal"] for c in doc["cells"])
    assert doc["abnormal_share"] == pytest.approx(doc["abnormal_cells"] / doc["white_cells"], abs=1e-4)
    assert doc["image_width"] == 1712 and doc["image_height"] == 1368
    for c in doc["cells"]:
        for key in ("x", "y", "bbox", "area", "label", "confidence", "p_healthy", "p_leukemic"):
            assert key in c
        x0, y0, x1, y1 = c["bbox"]
        assert x0 <= c["x"] <= x1 and y0 <= c["y"] <= y1
        assert c["area"] > 0.5 * np.pi * (doc["rbc_diameter_px"] / 2) ** 2

    gj = json.loads(paths["geojson"].read_text())
    assert gj["type"] == "FeatureCollection" and len(gj["features"]) == len(result.cells)
    for feat, c in zip(gj["features"], doc["cells"], strict=True):
        assert feat["geometry"]["type"] == "Polygon"
        ring = np.asarray(feat["geometry"]["coordinates"][0], np.float32)
        assert len(ring) >= 4 and np.array_equal(ring[0], ring[-1])
        assert cv2.pointPolygonTest(ring.reshape(-1, 1, 2), (c["x"], c["y"]), False) > 0  # centroid inside outline
        props = feat["properties"]
        assert props["objectType"] == "detection"
        assert props["classification"]["name"] == ("Partial (field edge)" if c["partial"] else c["label"])
        assert props["measurements"]["p_leukemic"] == pytest.approx(c["p_leukemic"])

    overlay = cv2.cvtColor(cv2.imread(str(paths["overlay"])), cv2.COLOR_BGR2RGB)
    assert overlay.shape == field.shape
    # The most confident abnormal cell is boxed in red; Grad-CAM heat is blended into its crop.
    top = max((sc for sc in result.cells if sc.abnormal), key=lambda sc: sc.confidence)
    x0, y0, x1, y1 = top.cell.bbox
    edge = overlay[y0 + 1, x0 + (x1 - x0) // 4: x0 + (x1 - x0) // 2].astype(int)
    red = np.abs(edge - np.asarray(ABNORMAL_COLOUR)).sum(axis=1) < 120
    assert red.mean() > 0.5
    cx, cy = int(top.cell.x), int(top.cell.y)
    assert np.abs(overlay[cy - 3:cy + 3, cx - 3:cx + 3].astype(int) - field[cy - 3:cy + 3, cx - 3:cx + 3]).mean() > 20


def test_field_without_white_cells(idb1, tmp_path) -> None:
    rgb = read_image(idb1["Im071_0"].path)[:600, :900]  # red cells and glass only (its white cell is at 1351, 732)
    result = scan_field(rgb, NucleusFraction())
    assert result.n_white_cells == 0 and result.n_abnormal == 0 and result.abnormal_share is None
    assert to_geojson(result) == {"type": "FeatureCollection", "features": []}
    doc = json.loads(write_outputs(result, rgb, tmp_path, "empty")["json"].read_text())
    assert doc["cells"] == [] and doc["abnormal_share"] is None


def test_crops_at_the_field_border() -> None:
    rgb = np.zeros((100, 200, 3), np.uint8)
    rgb[5, 10] = 255  # the "cell", 10 px from the left edge and 5 px from the top
    crop, box = crop_cell(rgb, 10, 5, 41)  # clip: cut at the edge, like ALL-IDB2's border crops
    assert crop.shape == (26, 31, 3) and box == (0, 0, 31, 26)
    assert tuple(crop[5, 10]) == (255, 255, 255)
    crop, box = crop_cell(rgb, 10, 5, 41, "shift")  # a full square inside the field, cell off-centre
    assert crop.shape == (41, 41, 3) and box == (0, 0, 41, 41)
    assert tuple(crop[5, 10]) == (255, 255, 255)
    crop, box = crop_cell(rgb, 10, 5, 41, "reflect")  # a full square, cell centred, outside mirrored
    assert crop.shape == (41, 41, 3) and box == (0, 0, 31, 26)
    assert tuple(crop[20, 20]) == (255, 255, 255)
    crop, box = crop_cell(rgb, 100, 50, 41)  # inside: all modes give the same centred square
    assert crop.shape == (41, 41, 3) and box == (80, 30, 121, 71)
    with pytest.raises(ValueError, match=r"Unknown border mode 'wrap'"):
        crop_cell(rgb, 10, 5, 41, "wrap")


def test_class_roles_are_validated() -> None:
    assert abnormal_class_names(["healthy", "leukemic"]) == ["leukemic"]
    assert abnormal_class_names(["Benign", "Early", "Pre", "Pro"]) == ["Early", "Pre", "Pro"]
    with pytest.raises(ValueError, match=r"none of the model's classes \['AML', 'APL'\]"):
        abnormal_class_names(["AML", "APL"])
    with pytest.raises(ValueError, match=r"\['helthy'\] are not classes"):
        abnormal_class_names(["healthy", "leukemic"], ["helthy"])
    with pytest.raises(ValueError, match="abnormal_threshold"):
        ScanConfig(abnormal_threshold=1.5)


def test_scan_cli_end_to_end(idb1, tmp_path, monkeypatch, capsys) -> None:
    import leukoscope.models

    monkeypatch.setattr(leukoscope.models, "load_model", lambda name=None, backend="auto", **_: NucleusFraction())
    missing = tmp_path / "nope.jpg"
    out = tmp_path / "out"
    rc = cli_main(["scan", str(idb1["Im086_0"].path), str(missing), "--out", str(out), "--no-gradcam"])
    assert rc == 1  # one input could not be read
    captured = capsys.readouterr()
    assert "Im086_0.jpg: 1 white cells" in captured.out
    assert "nope.jpg" in captured.err
    blank = tmp_path / "blank.png"  # no red cells to measure: reported, the other fields still scanned
    cv2.imwrite(str(blank), np.full((200, 300, 3), 230, np.uint8))
    assert cli_main(["scan", str(blank), str(idb1["Im086_0"].path), "--out", str(tmp_path / "o2"),
                     "--no-gradcam"]) == 1
    captured2 = capsys.readouterr()
    assert "cannot scan" in captured2.err and "blank" in captured2.err and "Im086_0.jpg:" in captured2.out
    assert (tmp_path / "o2" / "Im086_0.json").exists() and not (tmp_path / "o2" / "blank.json").exists()
    doc = json.loads((out / "Im086_0.json").read_text())
    assert doc["white_cells"] == 1 and doc["gradcam"] == "off"
    assert (out / "Im086_0.overlay.png").stat().st_size > 0
    assert json.loads((out / "Im086_0.geojson").read_text())["type"] == "FeatureCollection"


@pytest.mark.slow
def test_scan_cli_with_a_trained_model_and_gradcam(tiny_model_dir, idb1, tmp_path) -> None:
    """A real (briefly trained) EfficientNet-Lite0 model directory on a healthy 2592 x 1944 field: probabilities as
    the model gives them for the same crop, and Grad-CAM drawn on the flagged cell (threshold 0 flags every cell)."""
    from leukoscope.models import load_model
    from leukoscope.scan import scan_field

    field = idb1["Im086_0"].path
    out = tmp_path / "out"
    # The classical detector finds exactly the one lymphocyte here (the learned one also takes a giant platelet).
    assert cli_main(["scan", str(field), "--model", str(tiny_model_dir), "--out", str(out), "--threshold", "0",
                     "--detector", "classical"]) == 0
    doc = json.loads((out / "Im086_0.json").read_text())
    assert doc["white_cells"] == doc["abnormal_cells"] == 1
    assert doc["gradcam"] == "gradcam on abnormal cells" and doc["cells"][0]["gradcam"] is True
    rgb = read_image(field)
    model = load_model(tiny_model_dir)
    again = scan_field(rgb, model, ScanConfig(detector="classical", gradcam=False))
    got = [doc["cells"][0][f"p_{k}"] for k in model.classes]
    np.testing.assert_allclose(got, [again.cells[0].proba[k] for k in model.classes], atol=1e-3)
    # each cell carries the model's out-of-distribution flag; the field counts the flagged ones
    assert doc["cells"][0]["ood"] is again.cells[0].ood is bool(again.cells[0].ood_score > model.ood.threshold)
    assert doc["ood_cells"] == again.n_ood == sum(bool(c.ood) for c in again.counted)
    assert isinstance(doc["warnings"], list)
    overlay = cv2.cvtColor(cv2.imread(str(out / "Im086_0.overlay.png")), cv2.COLOR_BGR2RGB)
    assert overlay.shape == rgb.shape
    x0, y0, x1, y1 = doc["cells"][0]["crop_box"]
    # Grad-CAM heat is blended into the cell's crop and nowhere else.
    assert np.abs(overlay[y0:y1, x0:x1].astype(int) - rgb[y0:y1, x0:x1]).mean() > 5
    np.testing.assert_array_equal(overlay[y1 + 50:, :x0], rgb[y1 + 50:, :x0])


def test_partial_cells_cut_by_the_edge_are_shown_not_counted(field, scanned, tmp_path) -> None:
    from leukoscope.preprocess.cells import Cell

    def cell(x: float, y: float, bbox: tuple[int, int, int, int]) -> Cell:
        return Cell(x, y, bbox, 100, 50, 60.0, 0.9, 0.5, [])

    # touching the left edge, centroid 10 px in: partial at 20 px, not at 5 px; touching nothing: never partial
    assert is_partial(cell(10, 50, (0, 40, 22, 60)), 200, 100, 20)
    assert not is_partial(cell(10, 50, (0, 40, 22, 60)), 200, 100, 5)
    assert not is_partial(cell(10, 50, (2, 40, 22, 60)), 200, 100, 20)
    assert is_partial(cell(190, 95, (178, 88, 200, 100)), 200, 100, 20)  # right / bottom edges (exclusive)
    _, result = scanned
    part = [sc for sc in result.cells if sc.partial]
    assert part, "Im003_1 has a cell cut by the field edge"
    for sc in part:
        x0, y0, x1, y1 = sc.cell.bbox
        assert x0 <= 0 or y0 <= 0 or x1 >= field.shape[1] or y1 >= field.shape[0]
        assert not sc.abnormal and sc.heatmap is None  # classified, never flagged
    d = result.to_dict()
    assert d["partial_cells"] == len(part) and d["white_cells"] == len(d["cells"]) - len(part)
    assert sum(d["label_counts"].values()) == d["white_cells"]
    assert sum(c["partial"] for c in d["cells"]) == len(part)
    names = [f["properties"]["classification"]["name"] for f in to_geojson(result)["features"]]
    assert names.count("Partial (field edge)") == len(part)
    # 0 counts every cell
    every = scan_field(field, NucleusFraction(), ScanConfig(detector="classical", partial_rbc_diameters=0,
                                                            gradcam=False))
    assert every.n_partial == 0 and every.n_white_cells == len(result.cells)
    with pytest.raises(ValueError, match="partial_rbc_diameters"):
        ScanConfig(partial_rbc_diameters=-1)


def test_learned_detector_finds_the_masked_white_cells_and_reports_its_scale(idb1, field, tmp_path) -> None:
    """Default scan (learned detector) of Im003_1, a field with an expert mask of every white cell."""
    from scipy import ndimage as ndi

    result = scan_field(field, NucleusFraction(), ScanConfig(gradcam=False))
    mask = read_image(idb1["Im003_1"].meta["wbc_mask"])[..., 0] > 0
    lab, n = ndi.label(mask)
    hits = [int(lab[int(sc.cell.y), int(sc.cell.x)]) for sc in result.cells]
    assert len({h for h in hits if h}) >= 0.9 * n  # components of the mask with a detected cell
    # detections on a masked white cell; the others here are smudge cells, which the mask leaves out and the learned
    # detector counts (docs/SCAN.md, Limits)
    assert sum(h > 0 for h in hits) >= 0.7 * len(hits)
    doc = json.loads(write_outputs(result, field, tmp_path, "Im003_1")["json"].read_text())
    det = doc["detection"]
    assert det["detector"] == "learned"
    assert det["work_scale"] == pytest.approx(32 / doc["rbc_diameter_px"], rel=1e-3)
    lo, hi = doc["abnormal_cells_ci95"]
    assert lo <= doc["abnormal_cells"] <= hi or doc["abnormal_cells"] == 0
    slo, shi = doc["abnormal_share_ci95"]
    assert slo <= doc["abnormal_share"] <= shi
    with pytest.raises(ValueError, match="detector must be one of"):
        ScanConfig(detector="yolo")


def test_default_threshold_is_the_models_operating_point(field) -> None:
    """Without --threshold a two-class model is read at its stored operating point, as predict does; 0.5 otherwise."""
    from leukoscope.scan import abnormal_threshold

    class WithOperatingPoint(NucleusFraction):
        threshold = 0.9

    strict = scan_field(field, WithOperatingPoint(), ScanConfig(detector="classical", gradcam=False))
    plain = scan_field(field, NucleusFraction(), ScanConfig(detector="classical", gradcam=False))
    assert strict.threshold == 0.9 and plain.threshold == 0.5
    assert strict.to_dict()["abnormal_threshold"] == 0.9
    assert all(c.abnormal == (c.p_abnormal >= 0.9 and not c.partial) for c in strict.cells)
    assert strict.n_abnormal < plain.n_abnormal
    given = scan_field(field, WithOperatingPoint(), ScanConfig(detector="classical", gradcam=False,
                                                               abnormal_threshold=0.5))
    assert given.n_abnormal == plain.n_abnormal  # an explicit threshold wins
    # the stored point is for the second class; a model whose abnormal class is another gets 0.5
    assert abnormal_threshold(WithOperatingPoint(), ["leukemic", "healthy"], ["leukemic"]) == 0.5
