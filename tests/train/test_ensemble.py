"""Seed ensembles: one model directory that answers with the mean of its members' logits."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from leukoscope.config import make_config
from leukoscope.data.datasets import load_dataset
from leukoscope.data.images import read_image
from leukoscope.models import load_model
from leukoscope.models.modeldir import softmax
from leukoscope.train.ensemble import make_ensemble


@pytest.fixture(scope="module")
def second_seed(tmp_path_factory, tiny_model_dir):
    from leukoscope.train.trainer import train

    out = tmp_path_factory.mktemp("seed1") / "tiny_s1"
    cfg = make_config({"name": "tiny", "datasets": ("all_idb2",), "epochs": 2, "aug_views": 1, "batch_size": 32,
                       "seed": 1, "split": str(tiny_model_dir / "split.json")})
    train(cfg, out, progress=False)
    return out


def test_ensemble_answers_with_the_mean_of_its_members(tmp_path, tiny_model_dir, second_seed):
    ens = make_ensemble([tiny_model_dir, second_seed], tmp_path / "ens")
    assert len(ens.members) == 1 and "x2 members" in ens.engine
    images = [read_image(s.path) for s in load_dataset("all_idb2").samples[:6]]
    a, b = load_model(tiny_model_dir), load_model(second_seed)
    x = a.prepare_batch(images)
    mean = (a.logits(x) + b.logits(x)) / 2
    assert not np.allclose(a.logits(x), b.logits(x))  # two seeds: two different networks
    np.testing.assert_allclose(ens.logits(x), mean, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(ens.predict_arrays(images), softmax(mean / ens.temperature), rtol=1e-5, atol=1e-6)
    # calibrated on validation, scored once on test, with its own out-of-distribution detector and a card
    info = json.loads((tmp_path / "ens" / "model.json").read_text())
    assert info["members"] == ["members/1"] and info["temperature"] != a.temperature
    metrics = json.loads((tmp_path / "ens" / "metrics.json").read_text())
    assert metrics["training"]["ensemble_members"] == 2 and metrics["training"]["n_test"] > 0
    assert (tmp_path / "ens" / "ood.npz").exists() and ens.ood is not None
    assert "An ensemble of 2 such networks" in (tmp_path / "ens" / "MODEL_CARD.md").read_text()
    # the members' files are copies: the ensemble does not depend on where they were trained
    assert (tmp_path / "ens" / "members" / "1" / "model.safetensors").exists()


def test_ensemble_refuses_members_that_do_not_share_a_split(tmp_path, tiny_model_dir, second_seed):
    other = tmp_path / "other"
    shutil.copytree(second_seed, other)
    split = json.loads((other / "split.json").read_text())
    split["parts"]["val"], split["parts"]["test"] = split["parts"]["test"], split["parts"]["val"]
    (other / "split.json").write_text(json.dumps(split))
    with pytest.raises(ValueError, match="another split"):
        make_ensemble([tiny_model_dir, other], tmp_path / "ens")
    with pytest.raises(ValueError, match="at least two"):
        make_ensemble([tiny_model_dir], tmp_path / "ens1")
    assert not (tmp_path / "ens").exists()
