"""Per-subject features: names, shape, values on hand-made events, cluster proportions, FlowCAP-II cases."""

from __future__ import annotations

import numpy as np
import pytest

from leukoscope.flow.data import FlowCase, flowcap_fcs_cases, load_feature_table
from leukoscope.flow.features import FeatureSpec, Featurizer, case_events
from leukoscope.flow.transforms import arcsinh

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


def test_feature_values_on_hand_made_events():
    spec = FeatureSpec(channels=("FS", "FL1"), linear_channels=("FS",), quantiles=(0.0, 0.5, 1.0), thresholds=(10.0,),
                       n_clusters=0)
    x = np.column_stack([[0.1, 0.2, 0.3, 0.4], arcsinh(np.array([1.0, 5.0, 20.0, 200.0]), 5.0)])
    f = Featurizer(spec)
    assert f.feature_names == ["t4:FS:q00", "t4:FS:q50", "t4:FS:q100", "t4:FS:mean", "t4:FS:sd",
                               "t4:FL1:q00", "t4:FL1:q50", "t4:FL1:q100", "t4:FL1:mean", "t4:FL1:sd", "t4:FL1:gt10"]
    row = f.transform([{4: x}])[0]
    np.testing.assert_allclose(row[:5], [0.1, 0.25, 0.4, 0.25, np.std([0.1, 0.2, 0.3, 0.4])], rtol=1e-12)
    fl = x[:, 1]
    np.testing.assert_allclose(row[5:10], [fl[0], (fl[1] + fl[2]) / 2, fl[3], fl.mean(), fl.std()], rtol=1e-12)
    assert row[10] == 0.5  # 20 and 200 lie above 10


def test_real_cases_and_feature_shape(flow_root):
    cases = flowcap_fcs_cases()
    assert len(cases) == 32 and sum(c.label == "aml" for c in cases) == 12  # distinct tube-4 subjects
    by_source = {s: [c for c in cases if c.source == s] for s in ("raw", "cytodx")}
    assert len(by_source["raw"]) == 13 and len(by_source["cytodx"]) == 19  # subject 9's CytoDx copy dropped
    assert {c.subject for c in by_source["raw"]} == {f"{i:04d}" for i in range(1, 14)}
    assert [c.subject for c in cases if c.label == "aml" and c.source == "raw"] == ["0005", "0007", "0009"]
    spec = FeatureSpec(n_clusters=4, cluster_events=500)
    picked = [cases[0], cases[4], cases[20]]  # raw normal, raw AML, a CytoDx file
    events = [case_events(c, spec) for c in picked]
    assert [ev[4].shape for ev in events] == [(30000, 7), (30000, 7), (500, 7)]
    f = Featurizer(spec).fit(events)
    X = f.transform(events)
    n_expected = 7 * (5 + 2) + 6 * 2 + 4  # quantiles+moments per channel, 2 thresholds on 6 log channels, clusters
    assert X.shape == (3, n_expected) == (3, len(f.feature_names))
    assert np.isfinite(X).all()
    np.testing.assert_allclose(X[:, -4:].sum(1), 1.0, rtol=1e-12)  # cluster proportions
    g = Featurizer.from_arrays(spec, {k: v.copy() for k, v in f.arrays().items()})
    np.testing.assert_array_equal(g.transform(events), X)


def test_clusters_are_fitted_on_training_subjects_only():
    rng = np.random.default_rng(0)
    spec = FeatureSpec(channels=("a", "b"), linear_channels=(), n_clusters=2, cluster_events=200, quantiles=())
    train = [{4: rng.normal(0, 1, (300, 2))}, {4: rng.normal(0, 1, (300, 2)) + [6, 0]}]
    f = Featurizer(spec).fit(train)
    centers_before = f.cluster_centers[4].copy()
    f.transform([{4: rng.normal(50, 1, (300, 2))}])  # transforming new subjects never refits
    np.testing.assert_array_equal(f.cluster_centers[4], centers_before)
    props = f.transform(train)[:, -2:]
    np.testing.assert_allclose(np.sort(props, axis=1), [[0.0, 1.0], [0.0, 1.0]], atol=0.01)
    with pytest.raises(RuntimeError, match="fit must run"):
        Featurizer(spec).transform(train)


def test_case_without_the_tube_is_an_error(raw_dir):
    spec = FeatureSpec(tubes=(2, 4), n_clusters=0)
    case = FlowCase(subject="0005", label="aml", files={4: raw_dir / "0036.FCS"})
    with pytest.raises(ValueError, match=r"subject '0005' has no file for tube 2 \(it has tubes \[4\]\)"):
        case_events(case, spec)


def test_feature_table(flow_root):
    t = load_feature_table()
    assert t.X.shape == (359, 80) and int(t.y.sum()) == 43
    assert t.feature_names[:2] == ["IgG1-FITC_mean", "IgG1-FITC_std"] and len(set(t.subjects)) == 359


def test_unknown_feature_option_is_rejected():
    with pytest.raises(ValueError, match=r"unknown feature option\(s\) \['cofacter'\]"):
        FeatureSpec.from_dict({"cofacter": 5})
