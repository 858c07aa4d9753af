"""Spillover matrices from FCS keywords (``$SPILLOVER``, ``SPILL``, Beckman ``$DFCiTOj``) and compensation.

Convention (FlowJo, flowCore, Gating-ML): ``S[i, j]`` is the fraction of dye ``i``'s signal seen in detector ``j``,
with ones on the diagonal. Observed = true @ S, so compensated = observed @ inv(S), applied to linear values.
Beckman CXP writes ``$DFCiTOj`` = percentage of FL\\ ``i`` spilling into FL\\ ``j``; ``S[i, j] = DFCiTOj / 100``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np

from leukoscope.flow.channels import match_channels

__all__ = ["Spillover", "spillover_from_keywords", "spillover_from_dfc", "parse_spillover_string", "compensate"]

_DFC = re.compile(r"^dfc(\d+)to(\d+)$")


@dataclass(frozen=True)
class Spillover:
    """A spillover matrix and the ``$PnN`` of the detectors it covers (row/column order)."""

    matrix: np.ndarray
    channels: tuple[str, ...]
    source: str = ""

    def __post_init__(self) -> None:
        m = np.asarray(self.matrix, dtype=float)
        n = len(self.channels)
        if m.shape != (n, n):
            raise ValueError(f"spillover matrix must be {n}x{n} for channels {list(self.channels)}, got {m.shape}")
        if not np.isfinite(m).all():
            raise ValueError(f"spillover matrix from {self.source or 'input'} holds NaN or infinite values")
        if abs(np.linalg.det(m)) < 1e-12:
            raise ValueError(f"spillover matrix from {self.source or 'input'} is singular and cannot be inverted")


def _fluorescence_channels(channels: list[str]) -> list[str]:
    """Detectors other than scatter and time, in file order (Beckman's FL1 ... FLn)."""
    out = []
    for name in channels:
        key = name.strip().upper()
        if key in ("FS", "SS", "FSC", "SSC") or key.startswith(("FS ", "SS ", "FSC", "SSC", "TIME")):
            continue
        out.append(name)
    return out


def spillover_from_dfc(keywords: dict[str, str], channels: list[str]) -> Spillover | None:
    """Spillover from Beckman ``$DFCiTOj`` percentages; ``i``/``j`` count fluorescence detectors (FL1 = 1).

    Args:
        keywords: TEXT keywords, keys lower-case without ``$`` (as :class:`~leukoscope.flow.fcs.FlowSample` holds).
        channels: ``$PnN`` of the data set, used to name FL1 ... FLn.
    """
    pairs = {}
    for key, value in keywords.items():
        m = _DFC.match(key.lower().lstrip("$"))
        if m and str(value).strip():
            pairs[(int(m.group(1)), int(m.group(2)))] = float(value)
    if not pairs:
        return None
    fl = _fluorescence_channels(channels)
    n = max(max(i, j) for i, j in pairs)
    if n > len(fl):
        raise ValueError(f"$DFC keywords name FL{n} but the data set has only {len(fl)} fluorescence channels {fl}")
    mat = np.eye(n)
    for (i, j), pct in pairs.items():
        if i != j:
            mat[i - 1, j - 1] = pct / 100.0
    return Spillover(mat, tuple(fl[:n]), source="$DFCiTOj")


def parse_spillover_string(value: str) -> Spillover:
    """Parse ``$SPILLOVER`` / ``SPILL``: ``n,name1,...,namen,v11,v12,...,vnn``."""
    parts = [p.strip() for p in str(value).split(",")]
    try:
        n = int(float(parts[0]))
    except (ValueError, IndexError) as exc:
        raise ValueError(f"$SPILLOVER must start with the channel count, got {value[:40]!r}") from exc
    if len(parts) != 1 + n + n * n:
        raise ValueError(f"$SPILLOVER for {n} channels needs {1 + n + n * n} fields, got {len(parts)}")
    names = tuple(parts[1:1 + n])
    mat = np.array([float(v) for v in parts[1 + n:]], dtype=float).reshape(n, n)
    return Spillover(mat, names, source="$SPILLOVER")


def spillover_from_keywords(keywords: dict[str, str], channels: list[str]) -> Spillover | None:
    """The spillover a file declares: ``$SPILLOVER``, ``SPILL`` or ``$SPILL``, else Beckman ``$DFCiTOj``, else None."""
    low = {k.lower().lstrip("$"): v for k, v in keywords.items()}
    for key in ("spillover", "spill"):
        if str(low.get(key, "")).strip():
            return parse_spillover_string(low[key])
    return spillover_from_dfc(low, channels)


def compensate(events: np.ndarray, channels: list[str], spill: Spillover) -> np.ndarray:
    """Return a copy of ``events`` with the spillover channels replaced by ``observed @ inv(S)``.

    ``events`` must hold linear values (log channels decoded), columns named by ``channels`` ($PnN).
    """
    idx = match_channels(list(channels), list(spill.channels), source="compensation")
    out = np.array(events, dtype=np.float64, copy=True)
    out[:, idx] = out[:, idx] @ np.linalg.inv(np.asarray(spill.matrix, dtype=float))
    return out
