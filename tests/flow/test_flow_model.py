"""The flow model directory: the shipped model, save/load round trip, training from a manifest, outer CV."""

from __future__ import annotations

import csv
import json
import re

import numpy as np
import pytest

from leukoscope.flow.config import FlowConfig, load_flow_config
from leukoscope.flow.data import read_manifest
from leukoscope.flow.model import (
    cross_validate,
    default_flow_model_dir,
    load_flow_model,
    predict_files,
    save_flow_model,
    train_flow_model,
)

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

# CytoDx files (500 events): 4 AML, 4 normal subjects
SMALL = {"sample1.fcs": "aml", "sample2.fcs": "aml", "sample3.fcs": "aml", "sample4.fcs": "aml",
         "sample6.fcs": "normal", "sample7.fcs": "normal", "sample8.fcs": "normal", "sample9.fcs": "normal"}


@pytest.fixture()
def small_manifest(tmp_path, cytodx_dir):
    path = tmp_path / "manifest.csv"
    with path.open("w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["path", "subject", "label"])
        for name, label in SMALL.items():
            w.writerow([str(cytodx_dir / name), name.split(".")[0], label])
    return path


def _small_config(manifest) -> FlowConfig:
    return FlowConfig().with_overrides(
        data={"dataset": "manifest", "manifest": str(manifest)},
        features={"n_clusters": 2, "cluster_events": 200},
        model={"C": [1.0], "gamma": [1.0], "inner_folds": 2},
        cv={"folds": 2, "repeats": 2, "n_boot": 0},
    )


def test_shipped_model_directory(shipped_model):
    root = default_flow_model_dir()
    assert root.parts[-3:] == ("leukoscope", "weights", "flow-aml")
    files = {p.name for p in root.iterdir()}
    assert {"config.yaml", "classes.json", "model.safetensors", "model.json", "metrics.json", "MODEL_CARD.md"} <= files
    assert sum(p.stat().st_size for p in root.iterdir()) < 2_000_000
    assert not any(p.suffix in (".pkl", ".pickle", ".joblib", ".pt") for p in root.iterdir())
    assert json.loads((root / "classes.json").read_text()) == ["normal", "aml"]
    card = (root / "MODEL_CARD.md").read_text()
    n = len(shipped_model.feature_names)
    assert shipped_model.classifier.n_features == n
    assert re.search(rf"\b{n} features per subject", card)
    assert "32 subjects" in card and "FR-FCM-ZZYA" in card and "exact 95% CI" in card
    metrics = json.loads((root / "metrics.json").read_text())
    assert metrics["n_subjects"] == 32 and metrics["n_aml"] == 12
    assert metrics["cv"]["pooled"]["auc"] >= 0.95  # what the CV measured when it was trained
    # the shipped config is the one in configs/ (reproducible)
    repo_cfg = root.parents[3] / "configs" / "flow-aml.yaml"
    if repo_cfg.is_file():  # absent in an installed wheel
        assert load_flow_config(repo_cfg) == shipped_model.config


def test_shipped_model_consistent_across_event_counts(shipped_model, raw_dir, cytodx_dir):
    """Subject 9 as the full raw file (30,000 events) and as CytoDx's 500-event subset: same call, close
    probabilities. A consistency check (subject 9 was a training subject), not an evaluation."""
    rows, errors = predict_files(shipped_model, [raw_dir / "0068.FCS", cytodx_dir / "sample12.fcs"])
    assert errors == []
    assert [r["label"] for r in rows] == ["aml", "aml"]
    assert abs(rows[0]["p_aml"] - rows[1]["p_aml"]) < 0.05


def test_train_save_load_round_trip(tmp_path, small_manifest, cytodx_dir):
    cfg = _small_config(small_manifest)
    model, metrics = train_flow_model(cfg, evaluate=True)
    assert metrics["n_subjects"] == 8 and metrics["cv"]["repeats"] == 2
    assert {h["subject"] for h in metrics["heldout"]} == {n.split(".")[0] for n in SMALL}
    out = save_flow_model(model, tmp_path / "m", metrics=metrics, card="# card\n")
    loaded = load_flow_model(out)
    assert loaded.config == cfg and loaded.feature_names == model.feature_names
    paths = [cytodx_dir / "sample5.fcs", cytodx_dir / "sample10.fcs"]  # not in training
    a, _ = predict_files(model, paths)
    b, _ = predict_files(loaded, paths)
    assert [r["p_aml"] for r in a] == [r["p_aml"] for r in b]
    info = (out / "model.json").read_text()
    (out / "model.json").write_text(info.replace('"format_version": 1', '"format_version": 9'))
    with pytest.raises(ValueError, match="flow model format 9"):
        load_flow_model(out)


def test_outer_cv_is_by_subject(small_manifest):
    from leukoscope.flow.features import case_events

    cfg = _small_config(small_manifest)
    cases = read_manifest(small_manifest)
    events = [case_events(c, cfg.features) for c in cases]
    y = np.array([c.y for c in cases])
    groups = np.array([c.subject for c in cases])
    out = cross_validate(cfg, events, y, groups)
    assert out["p"].shape == (2, 8) and np.isfinite(out["p"]).all()
    for r in range(2):
        assert set(out["folds"][r]) == {0, 1}
        for k in (0, 1):
            assert y[out["folds"][r] == k].sum() == 2  # stratified: 2 AML per fold


def test_exact_binomial_ci_known_values():
    from leukoscope.flow.model import exact_binomial_ci

    lo, hi = exact_binomial_ci(12, 12)
    np.testing.assert_allclose([lo, hi], [0.025 ** (1 / 12), 1.0], rtol=1e-9)  # no error in 12: (alpha/2)^(1/n)
    lo, hi = exact_binomial_ci(0, 10)
    np.testing.assert_allclose([lo, hi], [0.0, 1 - 0.025 ** (1 / 10)], rtol=1e-9)
    lo, hi = exact_binomial_ci(5, 10)
    np.testing.assert_allclose([lo, hi], [0.18708, 0.81292], atol=1e-5)  # textbook Clopper-Pearson


def test_config_errors(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("model:\n  kernel: rbf\n")
    with pytest.raises(ValueError, match=r"bad.yaml: unknown model option\(s\) \['kernel'\]"):
        load_flow_config(bad)
    bad.write_text("modle: {}\n")
    with pytest.raises(ValueError, match=r"unknown flow config key\(s\) \['modle'\]"):
        load_flow_config(bad)
