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


def test_cli_explain_reports_the_shipped_verdict_of_the_image_kind(cnmc_paths, data_root, tmp_path, capsys):
    # the shipped leukemia-cell carries its measured verdicts per kind of image (faithfulness.json); explain reports
    # the one of the explained image's kind, and cautions (stderr, JSON, index.html) exactly when it is not "passes"
    from leukoscope.explain.record import method_faithfulness
    from leukoscope.models import resolve_model_dir

    d = resolve_model_dir("leukemia-cell")
    crop = data_root / "all_idb" / "ALL_IDB2" / "img" / "Im022_1.tif"  # a smear crop
    for path, kind in ((cnmc_paths[0], "cutout"), (crop, "smear")):
        for method in ("gradcam", "layercam", "cameras"):
            expected = method_faithfulness(d, method, kind)["verdict"]
            warned = expected != "passes"
            out = tmp_path / f"{kind}-{method}"
            args = parse_args(["explain", str(path), "--method", method, "--out", str(out), "--no-progress"])
            assert args.func(args) == 0
            err = capsys.readouterr().err
            rec = json.loads((out / f"{path.stem}.json").read_text())["faithfulness"]
            assert rec["kind"] == kind and rec["verdict"] == expected
            assert ("note: " in err and method in err) is warned, err
            assert ('class="note warn" id=faithfulness' in (out / "index.html").read_text()) is warned


def test_cli_method_names_match_the_registry():
    from leukoscope.cli.explain import METHOD_NAMES

    assert sorted(METHOD_NAMES) == METHODS.names()
