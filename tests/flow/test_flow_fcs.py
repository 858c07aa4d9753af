"""FCS reading on every real kind of file here, channel matching, and clear errors on bad files."""

from __future__ import annotations

import numpy as np
import pytest

from leukoscope.flow.fcs import FCSReadError, count_data_sets, match_channels, read_fcs, read_fcs_text
from leukoscope.flow.features import TUBE4_CHANNELS

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")  # FlowIO warns about the Beckman offset


def test_raw_beckman_data_set_1(raw_dir):
    s = read_fcs(raw_dir / "0004.FCS")
    assert s.n_datasets == 2 == count_data_sets(raw_dir / "0004.FCS")
    assert s.version == "2.0"
    assert s.events.shape == (30000, 7)
    assert s.channels == list(TUBE4_CHANNELS)
    assert s.markers[2:] == ["CD15-FITC", "CD13-PE", "CD45-ECD", "CD16-PC5", "CD56-PC7"]
    assert s.log_decoded == [False] + [True] * 6
    fs, logs = s.events[:, 0], s.events[:, 1:]
    assert fs.min() >= 0 and fs.max() <= 1023 and np.all(fs == np.round(fs))  # linear 10-bit channel units
    assert logs.min() >= 1.0 and logs.max() <= 1e4  # 10 ** (4 x / 1024) for x in 0 ... 1023
    # every decoded value is one of the 1024 levels of the 4-decade scale
    np.testing.assert_allclose(np.log10(logs) * 256, np.round(np.log10(logs) * 256), atol=1e-9)
    assert any("offset" in n for n in s.notes)  # the off-by-one data offset was noticed, not hidden


def test_raw_beckman_data_set_2(raw_dir):
    s = read_fcs(raw_dir / "0004.FCS", dataset=1)
    assert s.version == "3.0"
    assert s.events.shape == (30000, 8)
    assert s.channels == ["FS", "SS", "FL1", "FL2", "FL3", "FL4", "FL5", "TIME"]
    assert s.markers == [""] * 8
    assert s.events[:, :7].max() <= 2**20 and not any(s.log_decoded)
    # its spillover keywords live in data set 1 and are found there
    assert s.spillover is not None and s.spillover.channels == ("FL1", "FL2", "FL3", "FL4", "FL5")


def test_decoding_matches_flowcore(raw_dir, cytodx_dir):
    """CytoDx sample12 is flowCore's decoding of 500 events of raw 0068.FCS (subject 9). Mapped back to channel
    numbers, every one of its events is an event of our raw read, so the decoding formula and the repaired data
    offset are both right."""
    channels = read_fcs(raw_dir / "0068.FCS", decode_log=False).events
    decoded = read_fcs(raw_dir / "0068.FCS").events
    np.testing.assert_allclose(decoded[:, 1:], 10 ** (4 * channels[:, 1:] / 1024), rtol=1e-12)
    theirs = read_fcs(cytodx_dir / "sample12.fcs").events
    assert theirs.shape == (500, 7)
    back = np.column_stack([theirs[:, 0], np.log10(theirs[:, 1:]) * 1024 / 4])
    assert np.abs(back - np.round(back)).max() < 1e-3  # integer channels: the same 10 ** (4 x / 1024) scale
    ours = {tuple(row) for row in channels.astype(int).tolist()}
    assert all(tuple(row) in ours for row in np.round(back).astype(int).tolist())


def test_scatter_agrees_across_data_sets(raw_dir):
    """Data set 2 stores SS linearly in 20 bits; scaled to 10^4 it equals data set 1's decoded SS within the
    1/256-decade step of the 10-bit log scale."""
    a = read_fcs(raw_dir / "0004.FCS").events[:, 1]
    b = read_fcs(raw_dir / "0004.FCS", dataset=1).events[:, 1] * 1e4 / 2**20
    diff = np.abs(np.log10(b) - np.log10(a))
    assert np.median(diff) < 1 / 256 and np.quantile(diff, 0.95) < 2 / 256


def test_cytodx_float_file(cytodx_dir):
    s = read_fcs(cytodx_dir / "sample1.fcs")
    assert s.version == "3.0" and s.n_datasets == 1
    assert s.events.shape == (500, 7)
    assert s.keywords["datatype"] == "F" and not any(s.log_decoded)  # already linear: nothing to decode
    assert s.channels == list(TUBE4_CHANNELS)
    assert 0 <= s.events[:, 0].min() and s.events[:, 0].max() <= 1023
    assert s.events[:, 1:].min() >= 1.0 and s.events[:, 1:].max() <= 1e4 + 1e-3


def test_channels_matched_by_pnn_not_marker(raw_dir):
    """0034.FCS (tube 2) spells its markers 'sKappa-FITC', 'sLambda-PE'; $PnN still finds every channel."""
    names, markers, _ = read_fcs_text(raw_dir / "0034.FCS")
    assert markers[2:4] == ["sKappa-FITC", "sLambda-PE"]
    assert match_channels(names, ["FL2 Log", "FL1 Log", "fl3  log"]) == [3, 2, 4]
    assert match_channels(names, list(TUBE4_CHANNELS)) == list(range(7))
    with pytest.raises(FCSReadError, match="Kappa-FITC"):
        match_channels(names, ["Kappa-FITC"], source=raw_dir / "0034.FCS")  # marker text is not a channel name


def test_channels_by_position_when_names_differ(raw_dir):
    s = read_fcs(raw_dir / "0004.FCS", dataset=1)
    with pytest.raises(FCSReadError, match=r"0004\.FCS.*no channel with \$PnN 'FL1 Log'"):
        match_channels(s.channels, ["FL1 Log"], source=s.path)
    assert match_channels(s.channels, ["FL1 Log", "FL3 Log"], positions=[3, 5]) == [2, 4]


def test_fcs31_with_spill_keyword(tmp_path):
    import flowio  # the flow extra; these tests need it installed
    path = tmp_path / "tiny31.fcs"
    events = np.array([[100.0, 105.0, 70.0], [200.0, 10.0, 20.0]])
    with path.open("wb") as fh:
        flowio.create_fcs(fh, events.flatten().tolist(), ["FSC-A", "FL1-A", "FL2-A"],
                          opt_channel_names=["FSC", "CD3 FITC", "CD19 PE"],
                          metadata_dict={"spill": "2,FL1-A,FL2-A,1,0.2,0.1,1"})
    s = read_fcs(path)
    assert s.version == "3.1"
    np.testing.assert_array_equal(s.events, events)
    assert s.spillover.channels == ("FL1-A", "FL2-A")
    np.testing.assert_allclose(s.spillover.matrix, [[1.0, 0.2], [0.1, 1.0]], rtol=1e-12)


@pytest.mark.parametrize("kind", ["empty", "text", "truncated", "missing", "directory", "bad_dataset"])
def test_bad_files_raise_naming_the_file(tmp_path, raw_dir, kind):
    path = tmp_path / f"{kind}.fcs"
    expect = {"empty": "empty", "text": "not an FCS file", "truncated": "greater than file size",
              "missing": "does not exist", "directory": "directory", "bad_dataset": "holds 2"}[kind]
    dataset = 0
    if kind == "empty":
        path.write_bytes(b"")
    elif kind == "text":
        path.write_text("patient,cd45\n1,2\n")
    elif kind == "truncated":
        path.write_bytes((raw_dir / "0004.FCS").read_bytes()[:5000])
    elif kind == "directory":
        path.mkdir()
    elif kind == "bad_dataset":
        path = raw_dir / "0004.FCS"
        dataset = 5
    with pytest.raises(FCSReadError, match=expect) as info:
        read_fcs(path, dataset=dataset)
    assert str(path) in str(info.value) and info.value.path == str(path)
    assert isinstance(info.value, ValueError)  # the CLI maps ValueError to a clean message


def test_missing_flow_extra_is_named(monkeypatch, raw_dir):
    import sys

    from leukoscope.errors import MissingExtraError

    monkeypatch.setitem(sys.modules, "flowio", None)  # as if `pip install leukoscope` without [flow]
    with pytest.raises(MissingExtraError, match=r"pip install 'leukoscope\[flow\]'"):
        read_fcs(raw_dir / "0004.FCS")
