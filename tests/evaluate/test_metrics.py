"""Metrics against hand-computed values; single-class input gives NaN plus a warning, not a crash."""

from __future__ import annotations

import numpy as np
import pytest

from leukoscope.evaluate.metrics import (
    aggregate_by_group,
    balanced_threshold,
    binary_metrics,
    bootstrap_auc_ci,
    expected_calibration_error,
    multiclass_metrics,
)


def test_binary_metrics_by_hand():
    y = [0, 0, 1, 1, 1, 0, 1, 0]
    p = [0.1, 0.6, 0.7, 0.4, 0.9, 0.2, 0.8, 0.3]
    m = binary_metrics(y, p, n_boot=0)
    # tp=3 (0.7, 0.9, 0.8), fn=1 (0.4), fp=1 (0.6), tn=3
    np.testing.assert_allclose([m["accuracy"], m["precision"], m["recall"], m["specificity"], m["f1"]],
                               [0.75, 0.75, 0.75, 0.75, 0.75], rtol=1e-6)
    # AUC: of 16 positive-negative pairs only (0.4, 0.6) is ranked wrong: 15 / 16
    np.testing.assert_allclose(m["auc"], 0.9375, rtol=1e-6)


def test_single_class_gives_nan_and_warning():
    with pytest.warns(UserWarning, match="single class"):
        m = binary_metrics([1, 1, 1], [0.2, 0.7, 0.9], n_boot=10)
    assert np.isnan(m["auc"]) and np.isnan(m["specificity"]) and m["recall"] == pytest.approx(2 / 3)


def test_bootstrap_ci_brackets_the_auc_and_group_resampling():
    rng = np.random.default_rng(1)
    y = rng.integers(0, 2, 300)
    s = y + rng.normal(0, 0.8, 300)
    auc = binary_metrics(y, s, n_boot=0)["auc"]
    lo, hi = bootstrap_auc_ci(y, s, n_boot=300, seed=0)
    assert lo < auc < hi and hi - lo < 0.2
    groups = np.repeat(np.arange(30), 10)
    glo, ghi = bootstrap_auc_ci(y, s, n_boot=300, seed=0, groups=groups)
    assert glo < auc < ghi


def test_multiclass_by_hand():
    y = np.array([0, 0, 1, 1, 2, 2])
    pred = np.array([0, 1, 1, 1, 2, 0])
    proba = np.eye(3)[pred] * 0.8 + 0.2 / 3
    m = multiclass_metrics(y, proba, ["a", "b", "c"], n_boot=0)
    assert m["accuracy"] == pytest.approx(4 / 6)
    pc = m["per_class"]
    np.testing.assert_allclose([pc["a"]["precision"], pc["a"]["recall"], pc["a"]["specificity"]], [0.5, 0.5, 0.75])
    np.testing.assert_allclose([pc["b"]["precision"], pc["b"]["recall"], pc["b"]["f1"]], [2 / 3, 1.0, 0.8])
    np.testing.assert_allclose(m["macro"]["f1"], (0.5 + 0.8 + 2 / 3) / 3, rtol=1e-6)


def test_aggregate_by_group_means():
    names, p = aggregate_by_group(["b", "a", "b"], np.array([[0.2, 0.8], [0.9, 0.1], [0.4, 0.6]]))
    assert names == ["a", "b"]
    np.testing.assert_allclose(p, [[0.9, 0.1], [0.3, 0.7]], rtol=1e-6)


def test_ece_perfect_and_overconfident():
    y = np.array([0, 1, 0, 1])
    assert expected_calibration_error(y, np.eye(2)[y]) == pytest.approx(0.0)
    # always 0.9 confident, right half the time: ECE = |0.5 - 0.9| = 0.4
    proba = np.array([[0.9, 0.1], [0.9, 0.1], [0.1, 0.9], [0.1, 0.9]])
    assert expected_calibration_error(np.array([0, 1, 0, 1]), proba) == pytest.approx(0.4)


def test_balanced_threshold_equalises_sensitivity_and_specificity():
    y = np.array([0, 0, 0, 0, 1, 1, 1, 1])
    p = np.array([0.1, 0.2, 0.3, 0.7, 0.4, 0.8, 0.9, 0.95])
    # between 0.4 and 0.7 (t = 0.55): sensitivity 3/4, specificity 3/4; at every other cut they differ
    np.testing.assert_allclose(balanced_threshold(y, p), 0.55, rtol=1e-6)
    # separable scores: the cut in the gap between the classes balances both at 1
    np.testing.assert_allclose(balanced_threshold([0, 0, 1, 1], [0.01, 0.02, 0.03, 0.04]), 0.025, rtol=1e-6)
    # the cut is midway between the neighbouring scores 0.3 and 0.6
    np.testing.assert_allclose(balanced_threshold([0, 0, 0, 1, 1, 1], [0.1, 0.2, 0.3, 0.6, 0.8, 0.9]), 0.45)
    with pytest.raises(ValueError, match="both classes"):
        balanced_threshold([1, 1], [0.2, 0.3])
