"""Spillover from Beckman $DFCiTOj and $SPILLOVER, applied as observed @ inv(S)."""

from __future__ import annotations

import numpy as np
import pytest

from leukoscope.flow.compensation import (
    Spillover,
    compensate,
    parse_spillover_string,
    spillover_from_dfc,
    spillover_from_keywords,
)
from leukoscope.flow.fcs import read_fcs

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


def test_dfc_hand_made_example():
    """FL1 spills 20% into FL2, FL2 10% into FL1. True (100, 50) is observed as (100 + 5, 20 + 50) = (105, 70);
    compensation gives back (100, 50): inv(S) = [[1, -0.2], [-0.1, 1]] / 0.98."""
    kw = {"$DFC1TO2": "20.00", "$DFC2TO1": "10.00", "$PAR": "4"}
    channels = ["FS Lin", "SS Log", "FL1 Log", "FL2 Log"]
    spill = spillover_from_keywords(kw, channels)
    assert spill.channels == ("FL1 Log", "FL2 Log") and spill.source == "$DFCiTOj"
    np.testing.assert_allclose(spill.matrix, [[1.0, 0.2], [0.1, 1.0]], rtol=1e-12)
    observed = np.array([[300.0, 40.0, 105.0, 70.0], [10.0, 20.0, 0.0, 0.0]])
    out = compensate(observed, channels, spill)
    np.testing.assert_allclose(out[0], [300.0, 40.0, 100.0, 50.0], rtol=1e-9)
    np.testing.assert_allclose(out[1], [10.0, 20.0, 0.0, 0.0], atol=1e-12)
    np.testing.assert_allclose(observed[0], [300.0, 40.0, 105.0, 70.0])  # input untouched


def test_dfc_from_real_file(raw_dir):
    s = read_fcs(raw_dir / "0004.FCS")
    assert s.spillover.channels == ("FL1 Log", "FL2 Log", "FL3 Log", "FL4 Log", "FL5 Log")
    m = s.spillover.matrix
    np.testing.assert_allclose(np.diag(m), 1.0)
    np.testing.assert_allclose([m[0, 1], m[1, 2], m[3, 4], m[4, 0]], [0.222, 0.611, 0.123, 0.008], rtol=1e-12)


def test_compensating_data_set_2_reproduces_data_set_1(raw_dir):
    """Beckman stores uncompensated linear 20-bit values in data set 2 and compensated 10-bit log values in data
    set 1. Applying the $DFCiTOj matrix to data set 2 reproduces data set 1 (to a few thousandths of a decade):
    this pins down the direction of the matrix and shows data set 1 needs no further compensation."""
    a = read_fcs(raw_dir / "0004.FCS")
    b = read_fcs(raw_dir / "0004.FCS", dataset=1)
    comp = compensate(b.events * 1e4 / 2**20, b.channels, b.spillover)
    for j in range(2, 7):
        ok = (a.events[:, j] > 3) & (comp[:, j] > 0)
        assert ok.sum() > 5000
        err = np.log10(comp[ok, j]) - np.log10(a.events[ok, j])
        assert abs(np.median(err)) < 0.03, a.channels[j]
        raw_err = np.log10(b.events[ok, j] * 1e4 / 2**20) - np.log10(a.events[ok, j])
        assert np.median(np.abs(err)) <= np.median(np.abs(raw_err)) + 1e-3  # compensation moves it closer


def test_spillover_string():
    s = parse_spillover_string("2,FL1-A,FL2-A,1,0.05,0.3,1")
    assert s.channels == ("FL1-A", "FL2-A")
    np.testing.assert_allclose(s.matrix, [[1.0, 0.05], [0.3, 1.0]])
    with pytest.raises(ValueError, match="needs 7 fields, got 6"):
        parse_spillover_string("2,FL1-A,FL2-A,1,0.05,0.3")


def test_bad_spillover_is_rejected():
    with pytest.raises(ValueError, match="singular"):
        Spillover(np.array([[1.0, 1.0], [1.0, 1.0]]), ("a", "b"))
    with pytest.raises(ValueError, match=r"name FL6 but the data set has only 2 fluorescence channels"):
        spillover_from_dfc({"dfc6to1": "1.0"}, ["FS", "SS", "FL1", "FL2"])
    assert spillover_from_keywords({"$TOT": "10"}, ["FL1"]) is None
