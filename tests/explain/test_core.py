"""explain() / gradcam_array(): prediction unchanged, input untouched, map shape and range, overlay geometry."""

from __future__ import annotations

import json

import cv2
import numpy as np
import pytest

from leukoscope.data.images import read_image
from leukoscope.errors import ImageReadError
from leukoscope.explain import explain, gradcam_array, hottest_region
from leukoscope.explain.core import as_rgb


def test_explain_returns_prediction_heatmap_and_overlay(cnn_model, cnmc_paths):
    rgb = read_image(cnmc_paths[0])
    e = explain(cnmc_paths[0], cnn_model)
    p = cnn_model.predict_arrays([rgb])[0]
    np.testing.assert_allclose([e.probabilities[c] for c in cnn_model.classes], p, rtol=0, atol=1e-7)
    assert e.label == cnn_model.classes[int(p.argmax())] and e.confidence == pytest.approx(float(p.max()), abs=1e-7)
    assert e.explained_class == e.label and e.method == "gradcam" and e.target_layer == "backbone.bn2"
    assert e.heatmap.shape == rgb.shape[:2] == (450, 450) and e.heatmap.dtype == np.float32
    assert e.heatmap.min() >= 0 and e.heatmap.max() <= 1 and e.heatmap.max() > 0.9
    # the overlay keeps the image at its resolution (caption above, colour bar to the right) ...
    oh, ow = e.overlay.shape[:2]
    strip = oh - 450
    assert 0 < strip < 60 and ow > 450 and e.overlay.dtype == np.uint8
    body = e.overlay[strip:, :450].astype(int)
    # ... and where the map is cold the original pixels show through unchanged (bbox outline aside)
    x0, y0, x1, y1 = e.region["bbox"]
    cold = e.heatmap < 1e-3
    cold[max(y0 - 3, 0):y1 + 3, max(x0 - 3, 0):x1 + 3] = False
    assert cold.sum() > 1000
    np.testing.assert_array_equal(body[cold], rgb[cold].astype(int))
    d = e.to_dict()
    assert json.loads(json.dumps(d))["hottest_region"]["bbox"] == [x0, y0, x1, y1]
    assert d["image_size"] == [450, 450] and d["path"] == str(cnmc_paths[0])


@pytest.mark.parametrize("kind,method", [("cnn", "gradcam"), ("cnn", "occlusion"), ("hybrid", "gradcam++"),
                                         ("cnn", "cameras"), ("hybrid", "cameras")])
def test_prediction_unchanged_input_untouched(request, cnmc_paths, kind, method, no_hooks):
    model = request.getfixturevalue(f"{kind}_model")
    # already at the model's input size, so preprocessing hands back the very same array: it must still not change
    rgb = cv2.resize(read_image(cnmc_paths[5]), (64, 64), interpolation=cv2.INTER_AREA)
    copy = rgb.copy()
    before = model.predict_arrays([rgb])
    e = explain(rgb, model, method=method)
    after = model.predict_arrays([rgb])
    np.testing.assert_array_equal(before, after)
    np.testing.assert_allclose([e.probabilities[c] for c in model.classes], before[0], rtol=0, atol=1e-7)
    np.testing.assert_array_equal(rgb, copy)
    assert e.heatmap.shape == (64, 64) and 0 <= e.heatmap.min() and e.heatmap.max() <= 1
    assert no_hooks(model.module) == []
    assert all(p.grad is None for p in model.module.parameters())


def test_gradcam_array_non_square_and_target_class(cnn_model, data_root):
    path = data_root / "all_idb" / "ALL_IDB2" / "img" / "Im025_1.tif"  # 257 x 253: cut at the field border
    rgb = read_image(path)
    assert rgb.shape[:2] == (253, 257)
    by_name = gradcam_array(cnn_model, rgb, target_class="healthy")
    by_index = gradcam_array(cnn_model, rgb, target_class=0)
    assert by_name.shape == (253, 257) and by_name.dtype == np.float32
    np.testing.assert_allclose(by_name, by_index, atol=1e-6)
    other = gradcam_array(cnn_model, rgb, target_class=1)
    assert np.abs(other - by_name).mean() > 0.01  # the two classes are explained differently
    with pytest.raises(ValueError, match="Unknown class 'blast'.*healthy"):
        gradcam_array(cnn_model, rgb, target_class="blast")
    with pytest.raises(ValueError, match="out of range for 2 classes"):
        gradcam_array(cnn_model, rgb, target_class=2)


def test_bad_inputs_name_what_was_received(cnn_model, tmp_path):
    with pytest.raises(ValueError, match="uint8.*float64"):
        as_rgb(np.zeros((8, 8, 3)))
    with pytest.raises(ValueError, match=r"\(8, 8, 4\)"):
        as_rgb(np.zeros((8, 8, 4), np.uint8))
    gray = np.full((20, 30), 128, np.uint8)
    assert as_rgb(gray).shape == (20, 30, 3)
    assert gradcam_array(cnn_model, gray).shape == (20, 30)
    bad = tmp_path / "cell.png"
    bad.write_bytes(b"not a png")
    with pytest.raises(ImageReadError, match="cell.png"):
        explain(bad, cnn_model)
    with pytest.raises(ValueError, match="Did you mean 'gradcam'"):
        explain(gray, cnn_model, method="grad-cam")


def test_hottest_region_box_and_share():
    heat = np.zeros((100, 200), np.float32)
    heat[10:30, 20:60] = 1.0   # the peak region
    heat[60:90, 120:190] = 0.8  # a second, cooler region: not connected to the peak
    heat[0, 0] = 0.4            # below half the peak: outside any region
    r = hottest_region(heat)
    assert r["bbox"] == [20, 10, 60, 30]
    assert r["peak"] == [20, 10]
    np.testing.assert_allclose(r["area_fraction"], 20 * 40 / 20000, rtol=1e-6)
    np.testing.assert_allclose(r["heat_share"], 800 / (800 + 0.8 * 2100 + 0.4), rtol=1e-5)
    assert hottest_region(np.zeros((4, 5), np.float32))["bbox"] == [0, 0, 5, 4]


@pytest.mark.parametrize("kind,method", [("cnn", "gradcam"), ("cnn", "gradcam++"), ("hybrid", "gradcam")])
def test_onnx_stem_path_gives_the_pytorch_heatmap(request, cnmc_paths, kind, method, no_hooks, onnx_twin):
    model = request.getfixturevalue(f"{kind}_model")
    twin = onnx_twin(model)
    rgb = read_image(cnmc_paths[7])
    ref = explain(rgb, model, method=method)
    fast = explain(rgb, twin, method=method)
    # the network below the cut really ran in ONNX Runtime: under the head convolution for a CNN, the stem for the
    # hybrid (its target layer is in the Transformer)
    cut = "stem" if kind == "hybrid" else "features"
    assert list(twin._part_sessions) == [cut] and twin._part_sessions[cut] is not None
    assert model._part_sessions == {}
    assert fast.label == ref.label and fast.target_layer == ref.target_layer
    assert ref.heatmap.max() > 0
    # the stem's features differ from PyTorch's by float rounding only: so do the maps
    np.testing.assert_allclose(fast.heatmap, ref.heatmap, rtol=0, atol=0.02)
    assert no_hooks(model.module) == []
    assert all(p.grad is None for p in model.module.parameters())
    assert all(p.requires_grad for p in model.module.parameters())  # flags restored


def test_layer_inside_the_stem_takes_the_full_path(cnn_model, cnmc_paths, onnx_twin):
    twin = onnx_twin(cnn_model)
    rgb = read_image(cnmc_paths[7])
    ref = gradcam_array(cnn_model, rgb, layer="backbone.blocks.4")  # a stride-16 stage: part of the frozen stem
    fast = gradcam_array(twin, rgb, layer="backbone.blocks.4")
    assert twin._part_sessions == {}
    np.testing.assert_allclose(fast, ref, rtol=0, atol=1e-5)


def test_cameras_on_an_onnx_model_runs_in_pytorch(cnn_model, cnmc_paths, onnx_twin):
    # the exported part below the cut is not made for other input sizes: the multi-scale method takes no cut
    twin = onnx_twin(cnn_model)
    rgb = read_image(cnmc_paths[7])
    ref = gradcam_array(cnn_model, rgb, method="cameras")
    fast = gradcam_array(twin, rgb, method="cameras")
    assert twin._part_sessions == {}
    assert ref.shape == rgb.shape[:2] and ref.max() > 0.9
    np.testing.assert_allclose(fast, ref, rtol=0, atol=1e-5)
