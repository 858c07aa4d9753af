"""Int8 export: calibrated on the model's training images, checked against float32 on its held-out ones."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from leukoscope.cli import main as cli_main
from leukoscope.evaluate.run import select
from leukoscope.models import load_model


@pytest.fixture(scope="module")
def int8_dir(tiny_model_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("int8") / "tiny"
    shutil.copytree(tiny_model_dir, out)
    assert cli_main(["export", "--model", str(out), "--int8", "--n-calibration", "48"]) == 0
    return out


def test_int8_export_writes_network_and_its_check(int8_dir):
    report = json.loads((int8_dir / "model.int8.json").read_text())
    model = load_model(int8_dir, backend="torch")
    held = len(select(model, "all_idb2", "val").samples) + len(select(model, "all_idb2", "test").samples)
    assert report["calibration_images"] == 48
    assert report["checked_on"].startswith("validation and test")
    assert report["n_images"] == min(held, 512)
    assert report["weights_sha256"] == model.info["weights_sha256"]
    assert report["temperature_float32"] == model.temperature and 0.05 <= report["temperature"] <= 20
    assert load_model(int8_dir, backend="int8").temperature == report["temperature"]  # the int8 network's own
    assert 0 <= report["mean_abs_prob_diff"] <= report["max_abs_prob_diff"] <= 1
    noise = report["float32_under_1_grey_level_noise"]  # the scale the int8 difference is read against
    assert 0 < noise["mean_abs_prob_diff"] <= noise["max_abs_prob_diff"] <= 1 and 0 <= noise["label_agreement"] <= 1


def test_int8_backend_predicts_close_to_float32(int8_dir):
    fp32, int8 = load_model(int8_dir, backend="onnx"), load_model(int8_dir, backend="int8")
    assert (int8.backend, int8.precision, fp32.precision) == ("onnx", "int8", "fp32")
    paths = [s.path for s in select(fp32, "all_idb2", "test").samples]
    _, p32, _ = fp32.predict_paths(paths)
    _, p8, _ = int8.predict_paths(paths)
    assert not np.allclose(p8, p32, atol=1e-6)  # really another network
    assert np.abs(p8 - p32).mean() < 0.05
    assert (p8.argmax(1) == p32.argmax(1)).mean() >= 0.9
    np.testing.assert_allclose(p8.sum(1), 1, atol=1e-5)


def test_int8_backend_without_export_says_how(tiny_model_dir):
    with pytest.raises(FileNotFoundError, match="leukoscope export --model .* --int8"):
        load_model(tiny_model_dir, backend="int8")


def test_int8_network_of_other_weights_is_refused(int8_dir, tmp_path):
    other = tmp_path / "other"
    shutil.copytree(int8_dir, other)
    rep = json.loads((other / "model.int8.json").read_text())
    rep["weights_sha256"] = "0" * 64
    (other / "model.int8.json").write_text(json.dumps(rep))
    with pytest.raises(ValueError, match="other weights"):
        load_model(other, backend="int8")


def test_int8_calibrated_on_given_images_skips_unreadable_ones(tiny_model_dir, tmp_path, caplog):
    from leukoscope.data.datasets import load_dataset

    model_dir = tmp_path / "m"
    shutil.copytree(tiny_model_dir, model_dir)
    cal = tmp_path / "cal"
    cal.mkdir()
    for s in load_dataset("all_idb2").samples[::40]:
        shutil.copy(s.path, cal / s.path.name)
    n_good = len(list(cal.iterdir()))
    (cal / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    out = tmp_path / "net.int8.onnx"
    assert cli_main(["export", "--model", str(model_dir), "--int8", "--calibration", str(cal), "--out", str(out)]) == 0
    report = json.loads((tmp_path / "net.int8.json").read_text())
    assert report["calibration_images"] == n_good
    assert "broken.png" in caplog.text
    assert out.exists() and not list(tmp_path.glob(".*.tmp"))
