"""write_explanations and `leukoscope explain`: files per image, a self-contained index.html, failures reported."""

from __future__ import annotations

import json
import re
import shutil

import numpy as np
import pytest

from leukoscope.cli import parse_args
from leukoscope.data.images import read_image
from leukoscope.explain import METHODS, write_explanations
from leukoscope.models.modeldir import save_model_dir


def test_write_explanations_files_and_index(cnn_model, cnmc_paths, tmp_path):
    a, b = cnmc_paths[0], cnmc_paths[40]
    twin = tmp_path / "other" / a.name  # same stem as `a` in another folder
    twin.parent.mkdir()
    shutil.copy(a, twin)
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    out = tmp_path / "out"
    recs = write_explanations(cnn_model, [a, b, twin, bad, tmp_path / "missing.png"], out)
    errors = {r["path"]: r["error"] for r in recs if "error" in r}
    assert set(errors) == {str(bad), str(tmp_path / "missing.png")}
    ok = [r for r in recs if "error" not in r]
    assert [r["stem"] for r in ok] == [a.stem, b.stem, a.stem + "-2"]
    for r in ok:
        heat = np.load(out / r["files"]["heatmap"])
        h, w = read_image(r["path"]).shape[:2]
        assert heat.shape == (h, w) and heat.dtype == np.float32 and 0 <= heat.min() and heat.max() <= 1
        saved = json.loads((out / r["files"]["json"]).read_text())
        assert saved["label"] in cnn_model.classes and saved["method"] == "gradcam"
        assert saved["target_layer"] == "backbone.bn2"
        assert sum(saved["probabilities"].values()) == pytest.approx(1.0, abs=1e-5)
        x0, y0, x1, y1 = saved["hottest_region"]["bbox"]
        assert 0 <= x0 < x1 <= w and 0 <= y0 < y1 <= h
        png = read_image(out / r["files"]["overlay"])
        assert png.shape[0] > h and png.shape[1] > w  # original resolution plus caption and colour bar
    page = (out / "index.html").read_text()
    assert page.count("<tr><td") == 3 and "broken.png" in page and "missing.png" in page
    assert len(re.findall(r'src="data:image/jpeg;base64,', page)) == 6  # thumbnails embedded: works offline
    assert not re.search(r'(src|href)="https?:', page)
    assert "sortBy(4,true)" in page  # sortable by confidence
    # a model without a faithfulness record says so, in every JSON and on the page
    assert all(r["faithfulness"]["verdict"] == "not measured" for r in ok)
    assert re.search(r'class="note warn" id=faithfulness>[^<]*not measured', page)
    # rows come sorted by confidence, highest first
    confs = [float(v) for v in re.findall(r'<td data-v="([0-9.]+)">', page)]
    assert confs == sorted(confs, reverse=True) and len(confs) == 3


def test_cli_explain_exit_status_and_outputs(cnn_model, cnmc_paths, tmp_path, capsys):
    model_dir = tmp_path / "model"
    save_model_dir(model_dir, cnn_model.module, {
        "name": "test-cnn", "spec": cnn_model.info["spec"], "classes": cnn_model.classes,
        "preprocess": cnn_model.preprocess.to_dict(), "temperature": 1.0, "target_layer": "backbone.bn2"})
    folder = tmp_path / "imgs"
    folder.mkdir()
    for p in cnmc_paths[:2]:
        shutil.copy(p, folder / p.name)
    (folder / "empty.png").write_bytes(b"")
    args = parse_args(["explain", str(folder), "--model", str(model_dir), "--method", "layercam", "--out",
                       str(tmp_path / "out"), "--no-progress", "--backend", "torch"])  # no ONNX export in a test
    code = args.func(args)
    err = capsys.readouterr().err
    assert code == 1
    assert "empty.png" in err and "explained 2 image(s)" in err
    for p in cnmc_paths[:2]:
        rec = json.loads((tmp_path / "out" / f"{p.stem}.json").read_text())
        assert rec["method"] == "layercam" and rec["target_layer"] == "backbone.blocks.4"
    args = parse_args(["explain", str(tmp_path / "nothing*.png"), "--model", str(model_dir), "--out",
                       str(tmp_path / "out2"), "--backend", "torch"])
    assert args.func(args) == 2


def test_cli_explain_tells_whether_the_method_is_faithful_on_the_shipped_model(cnmc_paths, tmp_path, capsys):
    # the shipped leukemia-cell carries its measured verdicts (faithfulness.json): Grad-CAM passes, cameras does not
    cell = str(cnmc_paths[0])
    for method, warned in (("gradcam", False), ("cameras", True)):
        args = parse_args(["explain", cell, "--method", method, "--out", str(tmp_path / method), "--no-progress"])
        assert args.func(args) == 0
        err = capsys.readouterr().err
        assert ("note: on 50 held-out C-NMC 2019 cells cut out onto black, cameras does not clearly beat a random map"
                in err) is warned, err
        rec = json.loads((tmp_path / method / f"{cnmc_paths[0].stem}.json").read_text())
        assert rec["faithfulness"]["verdict"] == ("inconclusive" if warned else "passes")
        page = (tmp_path / method / "index.html").read_text()
        assert ('class="note warn" id=faithfulness' in page) is warned


def test_the_verdict_follows_the_kind_of_image(cnmc_paths, data_root, tmp_path, capsys):
    # the shipped record: LayerCAM passes on cells cut out onto black (C-NMC) and is inconclusive on smear images (aria)
    crop = data_root / "all_idb" / "ALL_IDB2" / "img" / "Im022_1.tif"  # a held-out ALL-IDB2 test crop
    for path, kind, warned in ((cnmc_paths[0], "cutout", False), (crop, "smear", True)):
        out = tmp_path / kind
        args = parse_args(["explain", str(path), "--method", "layercam", "--out", str(out), "--no-progress"])
        assert args.func(args) == 0
        err = capsys.readouterr().err
        rec = json.loads((out / f"{path.stem}.json").read_text())["faithfulness"]
        assert rec["kind"] == kind
        assert rec["verdict"] == ("inconclusive" if warned else "passes")
        assert ("note: " in err and "aria test images" in err) is warned, err
        assert ('class="note warn" id=faithfulness' in (out / "index.html").read_text()) is warned


def test_cli_method_names_match_the_registry():
    from leukoscope.cli.explain import METHOD_NAMES

    assert sorted(METHOD_NAMES) == METHODS.names()
