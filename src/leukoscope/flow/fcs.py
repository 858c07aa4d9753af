"""Read FCS 2.0 / 3.0 / 3.1 files into decoded event matrices, with the quirks of real instruments handled.

FlowIO parses the bytes; this module decides what the numbers mean:

* files with several data sets (Beckman LMD) are read with ``flowio.read_multiple_data_sets`` and one data set is
  picked (the first by default);
* Beckman headers give a data offset that is off by one byte, so offsets are not trusted blindly
  (``ignore_offset_error=True``); the event count and parameter count are checked against ``$TOT`` / ``$PAR``;
* integer channels are masked to their range (``$PnR`` a power of two) as the FCS standard asks;
* log-amplified channels (``$PnE`` = ``f1,f2`` with ``f1 > 0``) are decoded to linear values as
  ``10 ** (f1 * x / $PnR)``. FCS 3.x multiplies by ``f2`` when it is positive; for FCS 2.0 ``f2`` is ignored, as
  flowCore does, because Beckman writes ``0.1024`` there (so 4-decade channels decode to 1 ... 10^4). FlowIO's
  own ``preprocess=True`` multiplies by ``f2`` and divides by the gain, which is not what other tools do.
* the amplifier gain ``$PnG`` is recorded but not divided out (channel units stay comparable to flowCore output).

Channels are matched by ``$PnN`` (the detector name), never by ``$PnS`` (free marker text; spelled differently from
file to file), or by position when asked.
"""

from __future__ import annotations

import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from leukoscope.errors import require
from leukoscope.flow.channels import FCSReadError, match_channels, normalize_channel_name
from leukoscope.flow.compensation import Spillover, spillover_from_keywords

__all__ = [
    "FCSReadError", "FlowSample", "read_fcs", "read_fcs_text", "count_data_sets", "match_channels",
    "normalize_channel_name", "panel_differences",
]

_FCS_MAGIC = re.compile(rb"^FCS[23]\.[0-9]")


@dataclass
class FlowSample:
    """One data set of one FCS file, decoded.

    Attributes:
        path: the file it came from.
        events: (n_events, n_channels) float64; log channels decoded to linear values.
        channels: ``$PnN`` of each column (detector names, e.g. ``FL1 Log``).
        markers: ``$PnS`` of each column (free text, e.g. ``CD15-FITC``); ``""`` when absent.
        keywords: TEXT segment, keys lower-case without the leading ``$``.
        version: FCS version of this data set, e.g. ``"2.0"``.
        dataset: index of the data set inside the file.
        n_datasets: how many data sets the file holds.
        log_decoded: for each column, whether it was decoded from a log scale.
        ranges: ``$PnR`` of each column (0.0 when absent).
        spillover: the spillover the file declares for this data set (``$SPILLOVER``/``SPILL``/``$DFCiTOj``), taken
            from another data set of the same file when this one has none (Beckman writes ``$DFCiTOj`` only into
            data set 1); None when the file declares none. It is *not* applied by the reader.
        notes: things worth knowing about how the file was read (offset repairs, ...).
    """

    path: Path
    events: np.ndarray
    channels: list[str]
    markers: list[str]
    keywords: dict[str, str]
    version: str
    dataset: int = 0
    n_datasets: int = 1
    log_decoded: list[bool] = field(default_factory=list)
    ranges: list[float] = field(default_factory=list)
    spillover: Spillover | None = None
    notes: list[str] = field(default_factory=list)

    @property
    def n_events(self) -> int:
        return int(self.events.shape[0])

    def column(self, name: str) -> np.ndarray:
        """Events of the channel whose ``$PnN`` is ``name`` (matched as :func:`normalize_channel_name` does)."""
        return self.events[:, match_channels(self.channels, [name], source=self.path)[0]]


def _check_header(path: Path) -> None:
    if not path.exists():
        raise FCSReadError(path, "file does not exist")
    if path.is_dir():
        raise FCSReadError(path, "is a directory, not an FCS file")
    size = path.stat().st_size
    if size == 0:
        raise FCSReadError(path, "file is empty (0 bytes)")
    with path.open("rb") as fh:
        head = fh.read(58)
    if not _FCS_MAGIC.match(head):
        raise FCSReadError(path, f"not an FCS file (it starts with {head[:10]!r}, expected b'FCS2.0', b'FCS3.0' or "
                                 "b'FCS3.1')")
    if len(head) < 58:
        raise FCSReadError(path, f"file is truncated: {size} bytes is shorter than the 58-byte FCS header")


def read_fcs_text(path: str | Path, dataset: int = 0) -> tuple[list[str], list[str], dict[str, str]]:
    """``($PnN list, $PnS list, keywords)`` of one data set, without decoding events."""
    path = Path(path)
    data_sets = _read_data_sets(path, only_text=True)
    if not -len(data_sets) <= dataset < len(data_sets):
        raise FCSReadError(path, f"asked for data set {dataset}, the file holds {len(data_sets)}")
    text = {k.lower().lstrip("$"): str(v) for k, v in data_sets[dataset].text.items()}
    n_par = int(text.get("par", "0").strip() or 0)
    names = [text.get(f"p{i}n", f"P{i}").strip() for i in range(1, n_par + 1)]
    markers = [text.get(f"p{i}s", "").strip() for i in range(1, n_par + 1)]
    return names, markers, text


def _marker_key(marker: str) -> str:
    return re.sub(r"[^0-9a-z]", "", marker.casefold())


def panel_differences(markers: list[str], expected: list[str]) -> list[tuple[int, str, str]]:
    """Positions where a file's ``$PnS`` marker text differs from the expected panel (case, spaces and punctuation
    ignored; blanks never count). Used only to *warn*: channels are matched by ``$PnN``."""
    out = []
    for i, (got, want) in enumerate(zip(markers, expected, strict=False)):
        if got.strip() and want.strip() and _marker_key(got) != _marker_key(want):
            out.append((i, got, want))
    return out


def count_data_sets(path: str | Path) -> int:
    """How many data sets an FCS file holds (reads the TEXT segments only)."""
    return len(_read_data_sets(Path(path), only_text=True))


def _read_data_sets(path: Path, only_text: bool = False) -> list:
    flowio = require("flowio", extra="flow", purpose="reading FCS files")
    _check_header(path)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            data_sets = flowio.read_multiple_data_sets(str(path), ignore_offset_error=True, only_text=only_text)
    except Exception as exc:
        # FlowIO raises plain ValueError/KeyError/struct errors on malformed files as well as its own errors.
        raise FCSReadError(path, f"{type(exc).__name__}: {exc}") from exc
    for ds in data_sets:
        ds._leukoscope_warnings = [str(w.message) for w in caught]
    return data_sets


def read_fcs(path: str | Path, dataset: int = 0, decode_log: bool = True) -> FlowSample:
    """Read one data set of an FCS file.

    Args:
        path: an FCS 2.0, 3.0 or 3.1 file, possibly holding several data sets.
        dataset: which data set to return (0 = the first; Beckman LMD files hold the 10-bit log data set first and a
            20-bit linear one second).
        decode_log: decode log-amplified channels to linear values (see the module docstring).

    Raises:
        FCSReadError: naming the file, when it is missing, empty, not FCS, truncated or inconsistent.
    """
    path = Path(path)
    data_sets = _read_data_sets(path)
    if not -len(data_sets) <= dataset < len(data_sets):
        raise FCSReadError(path, f"asked for data set {dataset}, the file holds {len(data_sets)}")
    fd = data_sets[dataset]
    notes = [w for w in getattr(fd, "_leukoscope_warnings", []) if "offset" in w.lower()]
    text = {k.lower().lstrip("$"): str(v) for k, v in fd.text.items()}
    n_par = fd.channel_count
    try:
        raw = fd.as_array(preprocess=False)
    except Exception as exc:  # FlowIO raises assorted errors on bad DATA segments
        raise FCSReadError(path, f"cannot decode the DATA segment: {type(exc).__name__}: {exc}") from exc
    raw = np.asarray(raw, dtype=np.float64).reshape(-1, n_par)
    expected = text.get("tot", "").strip()
    if expected.isdigit() and int(expected) != raw.shape[0]:
        raise FCSReadError(path, f"$TOT says {expected} events but the DATA segment holds {raw.shape[0]}")
    if raw.shape[0] == 0:
        raise FCSReadError(path, f"data set {dataset} holds no events")
    if not np.isfinite(raw).all():
        raise FCSReadError(path, "the DATA segment holds NaN or infinite values")

    channels, markers, decoded, ranges = [], [], [], []
    events = raw.copy()
    datatype = text.get("datatype", "").strip().upper()
    version = str(fd.version)
    for num in range(1, n_par + 1):
        info = fd.channels[num]
        channels.append(str(info.get("pnn", f"P{num}")).strip())
        markers.append(str(info.get("pns", "") or "").strip())
        rng = float(info.get("pnr") or 0.0)
        ranges.append(rng)
        col = events[:, num - 1]
        if datatype == "I" and rng >= 2 and float(rng).is_integer() and (int(rng) & (int(rng) - 1)) == 0:
            col[:] = np.bitwise_and(col.astype(np.int64), int(rng) - 1)
        decades, offset = info.get("pne", (0.0, 0.0))
        is_log = decode_log and float(decades) > 0 and rng > 0
        if is_log:
            scale = float(offset) if (version.startswith("3") and float(offset) > 0) else 1.0
            col[:] = scale * 10.0 ** (float(decades) * col / rng)
        decoded.append(bool(is_log))
    spill = None
    try:
        spill = spillover_from_keywords(text, channels)
        if spill is None:
            for k, other in enumerate(data_sets):
                if k != dataset % len(data_sets):
                    spill = spillover_from_keywords({kk.lower().lstrip("$"): str(v) for kk, v in other.text.items()},
                                                    channels)
                    if spill is not None:
                        notes.append(f"spillover keywords taken from data set {k} of the file")
                        break
    except ValueError as exc:
        notes.append(f"spillover keywords ignored: {exc}")
        spill = None
    return FlowSample(
        path=path, events=events, channels=channels, markers=markers, keywords=text, version=version,
        dataset=dataset % len(data_sets), n_datasets=len(data_sets), log_decoded=decoded, ranges=ranges,
        spillover=spill, notes=notes,
    )
