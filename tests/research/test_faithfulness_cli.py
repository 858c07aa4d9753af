"""``leukoscope faithfulness``: measures any model on held-out images as the benchmark does, refuses images the model
trained on, and writes the record that ``leukoscope explain`` then reports."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from leukoscope.cli import parse_args
from leukoscope.models import resolve_model_dir


@pytest.fixture(scope="module")
def shipped_copy(tmp_path_factory) -> Path:
    """The shipped leukemia-cell in a writable folder, without its faithfulness record."""
    out = tmp_path_factory.mktemp("model") / "leukemia-cell"
    shutil.copytree(resolve_model_dir("leukemia-cell"), out, ignore=shutil.ignore_patterns("faithfulness.json"))
    return out


def _heldout_cells(model_dir: Path, data_root: Path, n: int) -> list[Path]:
    """The benchmark's first ``n`` C-NMC cells: the split's test part in dataset order, every k-th of 50."""
    from leukoscope.data.datasets import load_dataset

    test = {Path(p).name for p in json.loads((model_dir / "split.json").read_text())["parts"]["test"]}
    cells = [s.path for s in load_dataset("cnmc2019").samples if s.path.name in test]
    return cells[::max(1, len(cells) // 50)][:n]


def test_faithfulness_matches_the_benchmark_and_records_for_explain(shipped_copy, data_root, tmp_path, capsys):
    cells = _heldout_cells(shipped_copy, data_root, 6)
    out = tmp_path / "f.json"
    args = parse_args(["faithfulness", *map(str, cells), "--model", str(shipped_copy), "--methods", "gradcam",
                       "occlusion", "--no-road", "--no-progress", "--out", str(out), "--record"])
    assert args.func(args) == 0
    printed = capsys.readouterr().out
    assert "gradcam" in printed and "insertion - deletion" in printed
    got = json.loads(out.read_text())["cells"]["methods"]
    # the CLI measures exactly what the library's measure() gives on these cells, computed here in the same run
    from leukoscope.data.images import read_image
    from leukoscope.models import load_model
    from leukoscope.research.faithfulness import measure

    ref = measure(load_model(str(shipped_copy)), [read_image(c) for c in cells], ["gradcam", "occlusion"],
                  road_percentiles=None)["methods"]
    for m in ("gradcam", "occlusion", "random"):
        assert got[m]["n"] == 6
        for key in ("deletion_auc", "insertion_auc"):
            assert got[m][key] == pytest.approx(ref[m][key], rel=1e-6)

    rec = json.loads((shipped_copy / "faithfulness.json").read_text())
    assert set(rec["methods"]) == {"gradcam", "occlusion"} and rec["methods"]["gradcam"]["n_cells"] == 6
    from leukoscope.explain import explain

    e = explain(cells[0], model=str(shipped_copy), method="gradcam")
    assert e.faithfulness["verdict"] == rec["methods"]["gradcam"]["insertion_minus_deletion"]["verdict"]
    assert e.faithfulness["n_cells"] == 6
    assert explain(cells[0], model=str(shipped_copy), method="layercam").faithfulness["verdict"] == "not measured"


def test_faithfulness_refuses_images_the_model_trained_on(shipped_copy, data_root, capsys):
    train = json.loads((shipped_copy / "split.json").read_text())["parts"]["train"]
    seen = data_root / next(p for p in train if "cnmc2019" in p)
    before = (shipped_copy / "faithfulness.json").read_text() if (shipped_copy / "faithfulness.json").exists() else None
    args = parse_args(["faithfulness", str(seen), "--model", str(shipped_copy), "--record", "--no-progress"])
    assert args.func(args) == 2
    assert "training or validation split" in capsys.readouterr().err
    after = (shipped_copy / "faithfulness.json").read_text() if (shipped_copy / "faithfulness.json").exists() else None
    assert after == before  # nothing measured, nothing recorded


def test_an_earlier_run_is_recorded_as_an_image_set_of_its_own_kind(data_root, tmp_path, capsys, monkeypatch):
    model = tmp_path / "leukemia-cell"
    shutil.copytree(resolve_model_dir("leukemia-cell"), model)  # with the shipped record (main set: C-NMC cells)
    before = json.loads((model / "faithfulness.json").read_text())
    test = json.loads((model / "split.json").read_text())["parts"]["test"]
    crops = [data_root / p for p in test if "ALL_IDB2" in p][:3]
    out = tmp_path / "crops.json"
    args = parse_args(["faithfulness", *map(str, crops), "--model", str(model), "--methods", "gradcam", "--no-road",
                       "--no-progress", "--out", str(out)])
    assert args.func(args) == 0
    assert json.loads(out.read_text())["kind"] == "smear"
    assert json.loads((model / "faithfulness.json").read_text()) == before  # no --record: nothing written
    capsys.readouterr()

    # smear crops are not merged into the main set of cells on black: refused before measuring
    args = parse_args(["faithfulness", *map(str, crops), "--model", str(model), "--methods", "gradcam", "--no-road",
                       "--no-progress", "--record"])
    from leukoscope.research import faithfulness

    monkeypatch.setattr(faithfulness, "measure", _no_measuring)
    assert args.func(args) == 2
    assert "nothing measured" in capsys.readouterr().err
    assert json.loads((model / "faithfulness.json").read_text()) == before

    args = parse_args(["faithfulness", "--from", str(out), "--model", str(model), "--record", "--image-set",
                       "my-crops", "--title", "ALL-IDB2 test crops"])
    assert args.func(args) == 0  # measure() would raise: the earlier run is taken as it was
    assert "gradcam" in capsys.readouterr().out
    rec = json.loads((model / "faithfulness.json").read_text())
    assert rec["methods"] == before["methods"]  # the main set is untouched
    mine = rec["image_sets"]["my-crops"]
    assert mine["kind"] == "smear" and mine["title"] == "ALL-IDB2 test crops"
    assert set(mine["methods"]) == {"gradcam"} and mine["methods"]["gradcam"]["n_cells"] == 3

    from leukoscope.explain import explain

    f = explain(crops[0], model=str(model), method="gradcam").faithfulness
    assert f["kind"] == "smear" and "on 3 held-out ALL-IDB2 test crops, gradcam" in f["note"]
    # --from takes a run as it was: measuring options and images are refused with it, as are other files
    for extra in (["--methods", "layercam"], [str(crops[0])], ["--no-road"]):
        args = parse_args(["faithfulness", "--from", str(out), "--model", str(model), *extra])
        assert args.func(args) == 2
        assert "--from takes an earlier run as it was" in capsys.readouterr().err
    bench = tmp_path / "bench.json"
    bench.write_text(json.dumps({"weights_sha256": "x", "cnmc": {}}))
    args = parse_args(["faithfulness", "--from", str(bench), "--model", str(model)])
    assert args.func(args) == 2
    assert "not the --out file" in capsys.readouterr().err
    args = parse_args(["faithfulness", "--from", str(out), "--model", str(model), "--image-set", "x"])
    assert args.func(args) == 2 and "add --record" in capsys.readouterr().err
    # the results of other weights are refused
    (model / "model.safetensors").write_bytes((model / "model.safetensors").read_bytes()[:-4] + b"\0\0\0\0")
    args = parse_args(["faithfulness", "--from", str(out), "--model", str(model), "--record"])
    assert args.func(args) == 2
    assert "other weights" in capsys.readouterr().err


def _no_measuring(*args, **kwargs):
    raise AssertionError("measured although it should not have")
