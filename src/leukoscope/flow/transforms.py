"""Scale transforms for linear flow values: arcsinh (CyTOF / flow convention) and logicle (Parks et al.)."""

from __future__ import annotations

import numpy as np

from leukoscope.errors import require

__all__ = ["arcsinh", "arcsinh_inverse", "logicle", "logicle_inverse", "TRANSFORMS"]


def arcsinh(x: np.ndarray, cofactor: float = 5.0) -> np.ndarray:
    """``asinh(x / cofactor)``: linear near zero, logarithmic for large values (``~ ln(2 x / cofactor)``)."""
    if cofactor <= 0:
        raise ValueError(f"arcsinh cofactor must be > 0, got {cofactor}")
    return np.arcsinh(np.asarray(x, dtype=np.float64) / cofactor)


def arcsinh_inverse(y: np.ndarray, cofactor: float = 5.0) -> np.ndarray:
    """Inverse of :func:`arcsinh`."""
    if cofactor <= 0:
        raise ValueError(f"arcsinh cofactor must be > 0, got {cofactor}")
    return np.sinh(np.asarray(y, dtype=np.float64)) * cofactor


def _check_logicle(t: float, m: float, w: float, a: float) -> None:
    if t <= 0 or m <= 0 or w < 0 or w > m / 2 or a < -w or a > m - 2 * w:
        raise ValueError(f"invalid logicle parameters T={t}, M={m}, W={w}, A={a} "
                         "(need T > 0, M > 0, 0 <= W <= M/2, -W <= A <= M - 2W)")


def logicle(x: np.ndarray, t: float = 262144.0, m: float = 4.5, w: float = 0.5, a: float = 0.0) -> np.ndarray:
    """Logicle transform (Moore & Parks 2012, Gating-ML 2.0) to the 0 ... 1 display scale; ``x = t`` maps to 1.

    Uses FlowUtils' C implementation (installed with the ``flow`` extra).
    """
    _check_logicle(t, m, w, a)
    fu = require("flowutils", extra="flow", purpose="the logicle transform")
    arr = np.asarray(x, dtype=np.float64)
    flat = np.ascontiguousarray(arr.reshape(-1))
    out = fu.transforms.logicle(flat, None, t=t, m=m, w=w, a=a)
    return np.asarray(out, dtype=np.float64).reshape(arr.shape)


def logicle_inverse(y: np.ndarray, t: float = 262144.0, m: float = 4.5, w: float = 0.5, a: float = 0.0) -> np.ndarray:
    """Inverse of :func:`logicle` (the biexponential)."""
    _check_logicle(t, m, w, a)
    fu = require("flowutils", extra="flow", purpose="the logicle transform")
    arr = np.asarray(y, dtype=np.float64)
    flat = np.ascontiguousarray(arr.reshape(-1))
    out = fu.transforms.logicle_inverse(flat, None, t=t, m=m, w=w, a=a)
    return np.asarray(out, dtype=np.float64).reshape(arr.shape)


TRANSFORMS = {"arcsinh": arcsinh, "logicle": logicle}
