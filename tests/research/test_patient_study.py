"""The patient-level study's folds (:mod:`leukoscope.research.patient_study`): every DeepAPL patient in exactly one
test fold, no patient on both sides, inner validation patients from the training side; the operating point."""

from __future__ import annotations

import numpy as np

from leukoscope.data.datasets import load_dataset
from leukoscope.research.patient_study import fold_indices, inner_validation, operating_point, patient_folds


def test_patient_folds_have_no_patient_on_both_sides(data_root):
    root = data_root / "aml_multiclass"
    assert (root / "Data" / "All").is_dir(), f"DeepAPL data not found: looked for {root / 'Data' / 'All'}"
    dx = load_dataset("deepapl", root=root, target="diagnosis")
    labels = {s.group: int(s.label == "APL") for s in dx.samples}
    assert len(labels) == 82 and sum(labels.values()) == 22
    patients = np.array(dx.groups)
    for seed in (0, 1):
        folds = patient_folds(labels, 5, seed=seed)
        assert sorted(folds) == sorted(labels)
        seen_test = []
        for k in range(5):
            tr, te = fold_indices(patients, folds, k)
            assert len(tr) + len(te) == len(patients)
            assert not set(patients[tr]) & set(patients[te])
            test_patients = sorted(set(patients[te]))
            seen_test += test_patients
            n_apl = sum(labels[p] for p in test_patients)
            assert 4 <= n_apl <= 5 and 16 <= len(test_patients) <= 17  # 22 / 5 APL, 82 / 5 patients per fold
            val = inner_validation(labels, sorted(set(patients[tr])), seed=k)
            assert set(val) <= set(patients[tr]) and not set(val) & set(test_patients)
            assert {labels[p] for p in val} == {0, 1}
        assert sorted(seen_test) == sorted(labels)  # every patient tested exactly once


def test_operating_point_keeps_validation_sensitivity():
    p = np.array([0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.05, 0.15])
    y = np.array([1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0])
    t = operating_point(p, y, 0.9)  # 10 positives: one may be missed -> threshold at the 2nd lowest, 0.2
    np.testing.assert_allclose(t, 0.2)
    assert (p[y == 1] >= t).mean() >= 0.9
