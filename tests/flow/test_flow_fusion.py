"""Fusion arithmetic against hand-computed values, stacking, and ``leukoscope fuse``."""

from __future__ import annotations

import csv
import json
import math

import numpy as np
import pytest

from leukoscope.cli import main
from leukoscope.flow.fusion import (
    FusionWeights,
    evaluate_fusion_cv,
    fit_stacking,
    fuse,
    load_fusion,
    logit,
    patient_image_evidence,
    save_fusion,
)


def test_logit_values():
    np.testing.assert_allclose(logit(np.array([0.5, 0.8, 0.2])), [0.0, math.log(4), -math.log(4)], rtol=1e-12)
    np.testing.assert_allclose(logit(1.0), math.log((1 - 1e-6) / 1e-6), rtol=1e-9)  # clipped, finite


def test_late_fusion_hand_computed():
    # logit(0.8) + logit(0.6) = ln 4 + ln 1.5 = ln 6  ->  6 / 7
    np.testing.assert_allclose(fuse([0.8], [0.6]), [6 / 7], rtol=1e-6)
    # prior 0.2: bias = -(1 + 1 - 1) * logit(0.2) = ln 4  ->  odds 24  ->  24 / 25
    np.testing.assert_allclose(fuse([0.8], [0.6], FusionWeights(prior=0.2)), [0.96], rtol=1e-6)
    # weights 2 and 0.5, bias -1: odds = 4^2 * 1.5^0.5 * e^-1
    odds = 16 * math.sqrt(1.5) / math.e
    np.testing.assert_allclose(fuse([0.8], [0.6], FusionWeights(w_image=2.0, w_flow=0.5, bias=-1.0)),
                               [odds / (1 + odds)], rtol=1e-6)
    # opposite evidence of equal strength cancels
    np.testing.assert_allclose(fuse([0.9, 0.3], [0.1, 0.7]), [0.5, 0.5], rtol=1e-6)
    # prior with weights 2 and 0.5: bias = -(2.5 - 1) * logit(0.2) = 1.5 ln 4 -> odds = 16 * sqrt(1.5) * 8
    np.testing.assert_allclose(fuse([0.8], [0.6], FusionWeights(w_image=2.0, w_flow=0.5, prior=0.2)),
                               [16 * math.sqrt(1.5) * 8 / (1 + 16 * math.sqrt(1.5) * 8)], rtol=1e-6)


def test_missing_modality():
    w = FusionWeights(prior=0.2)
    # only one modality: bias = -(1 - 1) * logit(prior) = 0, so its probability passes through
    np.testing.assert_allclose(fuse([0.8, np.nan], [np.nan, 0.3], w), [0.8, 0.3], rtol=1e-6)
    s = FusionWeights(w_image=0.7, w_flow=1.3, bias=-0.4, method="stacking")
    np.testing.assert_allclose(fuse([0.8, np.nan], [np.nan, 0.3], s), [0.8, 0.3], rtol=1e-12)
    z = -0.4 + 0.7 * math.log(4) + 1.3 * math.log(0.6 / 0.4)
    np.testing.assert_allclose(fuse([0.8], [0.6], s), [1 / (1 + math.exp(-z))], rtol=1e-6)
    assert np.isnan(fuse([np.nan], [np.nan])[0])


def test_invalid_inputs():
    with pytest.raises(ValueError, match=r"p_flow must be probabilities in \[0, 1\], got \[1.5\]"):
        fuse([0.5], [1.5])
    with pytest.raises(ValueError, match="same shape"):
        fuse([0.5, 0.5], [0.5])
    with pytest.raises(ValueError, match="prior must lie strictly between 0 and 1, got 1.0"):
        FusionWeights(prior=1.0)


def _paired(n: int = 400, seed: int = 0):
    """Synthetic paired patients whose true log-odds are 0.8 * logit(p_image) + 1.6 * logit(p_flow) - 0.5."""
    rng = np.random.default_rng(seed)
    zi, zf = rng.normal(0, 1.5, n), rng.normal(0, 1.5, n)
    pi, pf = 1 / (1 + np.exp(-zi)), 1 / (1 + np.exp(-zf))
    y = (rng.random(n) < 1 / (1 + np.exp(-(0.8 * zi + 1.6 * zf - 0.5)))).astype(int)
    return pi, pf, y


def test_stacking_fit_equals_logistic_regression_and_recovers_weights():
    from sklearn.linear_model import LogisticRegression

    pi, pf, y = _paired(4000)
    w = fit_stacking(pi, pf, y, C=1e6)
    assert w.method == "stacking" and w.meta["n_pairs"] == 4000
    assert abs(w.w_image - 0.8) < 0.12 and abs(w.w_flow - 1.6) < 0.15 and abs(w.bias + 0.5) < 0.12
    lr = LogisticRegression(C=1e6, max_iter=10000).fit(np.column_stack([logit(pi), logit(pf)]), y)
    np.testing.assert_allclose(fuse(pi, pf, w), lr.predict_proba(np.column_stack([logit(pi), logit(pf)]))[:, 1],
                               rtol=1e-6)
    with pytest.raises(ValueError, match="paired cases only"):
        fit_stacking([0.5, np.nan, 0.2, 0.9], [0.1, 0.2, 0.3, 0.4], [0, 1, 0, 1])


def test_fusion_cv_report_and_json_round_trip(tmp_path):
    pi, pf, y = _paired(300, seed=1)
    rep = evaluate_fusion_cv(pi, pf, y, folds=5, n_boot=0)
    assert set(rep) == {"image", "flow", "late", "stacking_cv"}
    assert rep["stacking_cv"]["auc"] > rep["image"]["auc"] and rep["late"]["auc"] > rep["image"]["auc"]
    w = fit_stacking(pi, pf, y)
    assert load_fusion(save_fusion(w, tmp_path / "f.json")) == w


def test_patient_image_evidence_is_the_mean_cell_probability():
    names, p = patient_image_evidence(["B", "A", "B", "A", "A"], [0.2, 0.9, 0.4, 0.6, 0.9])
    assert names == ["A", "B"]
    np.testing.assert_allclose(p, [0.8, 0.3], rtol=1e-12)


def test_fuse_apply_cli(tmp_path, capsys):
    cells = tmp_path / "cells.csv"
    cells.write_text("path,patient,label,confidence,p_all,p_hem\n"
                     "a1.png,A,all,0.7,0.7,0.3\na2.png,A,all,0.9,0.9,0.1\nb1.png,B,hem,0.8,0.2,0.8\n")
    flow = tmp_path / "flow.csv"
    flow.write_text("path,label,confidence,p_normal,p_aml\nA.fcs,aml,0.6,0.4,0.6\nC.fcs,normal,0.7,0.7,0.3\n")
    out = tmp_path / "fused.csv"
    rc = main(["fuse", "apply", "--image", str(cells), "--flow", str(flow), "--flow-patient-col", "stem",
               "--output", str(out)])
    assert rc == 0
    rows = {r["patient"]: r for r in csv.DictReader(out.read_text().splitlines())}
    assert list(rows) == ["A", "B", "C"]
    np.testing.assert_allclose(float(rows["A"]["p_image"]), 0.8, rtol=1e-6)  # mean of 0.7 and 0.9
    np.testing.assert_allclose(float(rows["A"]["p_fused"]), 6 / 7, rtol=1e-6)
    assert rows["A"]["label"] == "leukemia" and rows["A"]["n_cells"] == "2"
    np.testing.assert_allclose(float(rows["B"]["p_fused"]), 0.2, rtol=1e-6)  # image only
    np.testing.assert_allclose(float(rows["C"]["p_fused"]), 0.3, rtol=1e-6)  # flow only
    assert rows["C"]["p_image"] == "" and rows["C"]["label"] == "normal"
    assert "1 patient(s) without flow, 1 without image" in capsys.readouterr().err


def test_fuse_fit_cli_writes_weights(tmp_path, capsys):
    pi, pf, y = _paired(120, seed=2)
    paired = tmp_path / "paired.csv"
    paired.write_text("patient,p_image,p_flow,label\n" + "".join(
        f"P{i},{a:.8f},{b:.8f},{'aml' if t else 'normal'}\n"
        for i, (a, b, t) in enumerate(zip(pi, pf, y, strict=True))))
    out = tmp_path / "fusion.json"
    rc = main(["fuse", "fit", "--paired", str(paired), "--output", str(out), "--folds", "4",
               "--n-boot", "0"])
    assert rc == 0
    w = load_fusion(out)
    ref = fit_stacking(np.round(pi, 8), np.round(pf, 8), y)
    np.testing.assert_allclose([w.w_image, w.w_flow, w.bias], [ref.w_image, ref.w_flow, ref.bias], rtol=1e-6)
    printed = capsys.readouterr().out
    assert "stacking_cv" in printed and "CV on these paired cases" in printed
    assert json.loads(out.read_text())["format"] == "leukoscope-fusion"
    bad = tmp_path / "bad.csv"
    bad.write_text("patient,p_image,p_flow,label\nP1,0.2,0.3,aml\nP2,0.2,0.3,normal\nP3,0.1,0.1,nromal\n")
    assert main(["fuse", "fit", "--paired", str(bad), "--output", str(tmp_path / "x.json"), "--n-boot", "0"]) == 2
    assert "must hold two values" in capsys.readouterr().err
