"""`leukoscope evaluate` on real held-out groups: JSON, markdown, HTML and plots."""

from __future__ import annotations

import json

from leukoscope.cli import main


def test_evaluate_cli_writes_reports(tiny_model_dir, tmp_path, capsys):
    out = tmp_path / "ev"
    assert main(["evaluate", "--model", str(tiny_model_dir), "--dataset", "all_idb2", "--out", str(out),
                 "--json"]) == 0
    res = json.loads(capsys.readouterr().out)
    split = json.loads((tiny_model_dir / "split.json").read_text())
    assert res["per_image"]["n"] == len(split["parts"]["test"])
    assert res["per_group"]["n_groups"] < res["per_image"]["n"]  # fields aggregate several crops
    for f in ("evaluation.json", "evaluation.md", "evaluation.html", "roc.png", "confusion.png", "reliability.png"):
        assert (out / f).stat().st_size > 0
    html = (out / "evaluation.html").read_text()
    assert "data:image/png;base64," in html and "http" not in html.split("<body>")[1]  # self-contained
    # the same numbers the training run wrote for its test part
    trained = json.loads((tiny_model_dir / "metrics.json").read_text())
    assert abs(trained["per_image"]["accuracy"] - res["per_image"]["accuracy"]) < 1e-6


def test_evaluate_on_a_dataset_the_split_does_not_cover(tiny_model_dir, capsys):
    assert main(["evaluate", "--model", str(tiny_model_dir), "--dataset", "cnmc2019", "--split", "all"]) == 0
    assert "Per image" in capsys.readouterr().out
