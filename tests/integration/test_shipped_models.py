"""The shipped models: present, small, described by their cards, and `leukoscope predict FILE` works with no other
argument, offline, reproducing the numbers the card states."""

from __future__ import annotations

import csv
import json
import re

import pytest

from leukoscope.cli import main
from leukoscope.data.datasets import load_dataset
from leukoscope.evaluate.run import evaluate_model
from leukoscope.models import load_model, shipped_models
from leukoscope.models.modeldir import SHIPPED_DIR, file_sha256

IMAGE_MODELS = ["leukemia-cell", "all-subtype"]


@pytest.mark.parametrize("name", IMAGE_MODELS)
def test_shipped_model_is_complete_small_and_matches_its_card(name):
    assert name in shipped_models()
    d = SHIPPED_DIR / name
    assert sum(p.stat().st_size for p in d.iterdir()) <= 25 * 2**20
    info = json.loads((d / "model.json").read_text())
    assert info["weights_sha256"] == file_sha256(d / "model.safetensors")
    model = load_model(name, backend="torch")
    n = sum(p.numel() for p in model.module.parameters())
    assert n == info["n_parameters"]
    card = (d / "MODEL_CARD.md").read_text()
    assert f"{n} parameters" in card and "## Intended use" in card and "## Limits" in card


def test_predict_with_no_model_argument_uses_the_default(tmp_path, data_root):
    cell = load_dataset("aria").samples[0].path  # a Benign image
    out = tmp_path / "p.csv"
    assert main(["predict", str(cell), "--output", str(out)]) == 0
    row = next(csv.DictReader(out.open()))
    assert list(row) == ["path", "label", "confidence", "p_healthy", "p_leukemic", "ood", "ood_score", "warnings"]
    assert row["ood"] in ("true", "false")  # the shipped model carries its detector
    assert row["path"] == str(cell)


def test_card_numbers_reproduce_from_the_shipped_weights(data_root):
    card = (SHIPPED_DIR / "leukemia-cell" / "MODEL_CARD.md").read_text()
    m = re.search(r"\| images from aria \| (\d+) \| ([0-9.]+) \|", card)
    n, stated = int(m.group(1)), float(m.group(2))
    res = evaluate_model("leukemia-cell", "aria", "test")
    assert res["per_image"]["n"] == n
    # another CPU's arithmetic may move a borderline image across the threshold: one label of n, no more
    assert abs(res["per_image"]["accuracy"] - stated) <= 1 / n + 5e-4
    assert res["per_image"]["auc"] > 0.98  # measured 0.996 on held-out aria groups
