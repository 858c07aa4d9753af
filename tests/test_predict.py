"""`leukoscope predict`: exact CSV columns, unreadable files reported with the rest still predicted, the same
probabilities as the Python API, ONNX within 1e-4 of PyTorch."""

from __future__ import annotations

import csv
import shutil

import numpy as np
import pytest

from leukoscope.cli import main
from leukoscope.data.datasets import load_dataset
from leukoscope.models import load_model
from leukoscope.predict import collect_paths, predict


@pytest.fixture(scope="module")
def cells(tmp_path_factory, data_root):
    d = tmp_path_factory.mktemp("cells")
    ds = load_dataset("all_idb2")
    for s in ds.samples[:4] + ds.samples[-4:]:
        shutil.copy(s.path, d / s.path.name)
    (d / "sub").mkdir()
    shutil.copy(ds.samples[5].path, d / "sub" / "nested.tif")
    (d / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    (d / "notes.txt").write_text("not an image")
    return d


def test_csv_columns_and_unreadable_files(cells, tiny_model_dir, tmp_path, capsys):
    out = tmp_path / "p.csv"
    rc = main(["predict", str(cells), str(tmp_path / "missing.png"), "--model", str(tiny_model_dir), "--output",
               str(out), "--no-progress"])
    assert rc == 1  # some inputs were unreadable
    err = capsys.readouterr().err
    assert "broken.png" in err and "missing.png: file does not exist" in err
    rows = list(csv.DictReader(out.open()))
    threshold = load_model(tiny_model_dir).ood.threshold
    assert list(rows[0]) == ["path", "label", "confidence", "p_healthy", "p_leukemic", "ood", "ood_score", "warnings"]
    assert len(rows) == 9  # 8 + the nested one; notes.txt is not an image file, broken.png unreadable
    assert any(r["path"].endswith("sub/nested.tif") for r in rows)
    for r in rows:
        p = np.array([float(r["p_healthy"]), float(r["p_leukemic"])])
        assert abs(p.sum() - 1) < 1e-5 and float(r["confidence"]) == pytest.approx(p.max(), abs=1e-6)
        assert r["label"] == ["healthy", "leukemic"][int(p.argmax())]
        assert r["ood"] in ("true", "false") and float(r["ood_score"]) >= 0  # training fitted a detector
        margin = float(r["ood_score"]) - threshold  # the score is written with 4 decimals
        assert margin > -1e-4 if r["ood"] == "true" else margin < 1e-4


def test_cli_matches_python_api_and_torch_backend(cells, tiny_model_dir, tmp_path):
    out = tmp_path / "p.csv"
    main(["predict", str(cells / "sub" / "nested.tif"), "--model", str(tiny_model_dir), "--output", str(out)])
    row = next(csv.DictReader(out.open()))
    api = predict(cells / "sub" / "nested.tif", str(tiny_model_dir))
    assert api.probabilities["leukemic"] == pytest.approx(float(row["p_leukemic"]), abs=1e-6)
    assert api.ood is (row["ood"] == "true") and api.ood_score == pytest.approx(float(row["ood_score"]), abs=1e-4)
    assert ";".join(c for c, _ in api.warnings) == row["warnings"]
    torch_model = load_model(tiny_model_dir, backend="torch")
    onnx_model = load_model(tiny_model_dir, backend="onnx")
    paths, _ = collect_paths([cells])
    from leukoscope.data.images import read_image

    imgs = [read_image(p) for p in paths if p.suffix != ".png"]
    np.testing.assert_allclose(onnx_model.predict_arrays(imgs), torch_model.predict_arrays(imgs), atol=1e-4)


def test_quality_checks_can_be_skipped_for_speed(cells, tiny_model_dir, tmp_path):
    checked, unchecked = tmp_path / "a.csv", tmp_path / "b.csv"
    for out, extra in ((checked, []), (unchecked, ["--no-quality-checks"])):
        main(["predict", str(cells), "--model", str(tiny_model_dir), "--output", str(out), "--no-progress", *extra])
    a, b = list(csv.DictReader(checked.open())), list(csv.DictReader(unchecked.open()))
    assert [r["path"] for r in a] == [r["path"] for r in b]
    assert all(r["warnings"] == "unchecked" for r in b) and all(r["warnings"] != "unchecked" for r in a)
    for ra, rb in zip(a, b, strict=True):  # the answer and the out-of-distribution flag do not change
        assert (ra["label"], ra["p_leukemic"], ra["ood"], ra["ood_score"]) == \
            (rb["label"], rb["p_leukemic"], rb["ood"], rb["ood_score"])


def test_globs_and_empty_folder(cells, tmp_path):
    paths, problems = collect_paths([str(cells / "*_1.tif"), str(tmp_path)])
    assert paths and all(p.name.endswith("_1.tif") for p in paths)
    assert problems == [(str(tmp_path), "folder holds no PNG, JPEG, TIFF or BMP files")]


def test_unknown_model_name(capsys):
    assert main(["predict", "x.png", "--model", "leukemia-cel"]) == 2
    assert "Unknown model 'leukemia-cel'" in capsys.readouterr().err


def test_export_cli_writes_onnx_close_to_torch(tiny_model_dir, tmp_path, capsys):
    out = tmp_path / "m.onnx"
    assert main(["export", "--model", str(tiny_model_dir), "--onnx", "--out", str(out)]) == 0
    diff = float(capsys.readouterr().out.rsplit(":", 1)[1])
    assert out.stat().st_size > 1_000_000 and diff < 1e-4
