"""Stain normalisation fitted on a reference image: Reinhard (Lab statistics) and Macenko (H&E stain vectors).

A fitted normaliser is a small dict of numbers so that it can be saved in a model directory as JSON.
"""

from __future__ import annotations

import numpy as np
from skimage import color

_IO = 240.0  # transmitted light intensity for optical density
_BETA = 0.15  # OD threshold: below it a pixel is background
_ALPHA = 1.0  # percentile for the robust extreme angles


def _tissue_mask(rgb: np.ndarray) -> np.ndarray:
    od = -np.log((rgb.astype(np.float64) + 1) / _IO)
    return (od > _BETA).all(axis=-1)


def fit_reinhard(reference: np.ndarray) -> dict:
    lab = color.rgb2lab(reference)
    mask = _tissue_mask(reference)
    pix = lab[mask] if mask.sum() > 100 else lab.reshape(-1, 3)
    return {"method": "reinhard", "mean": pix.mean(0).tolist(), "std": (pix.std(0) + 1e-6).tolist()}


def apply_reinhard(rgb: np.ndarray, params: dict) -> np.ndarray:
    lab = color.rgb2lab(rgb)
    mask = _tissue_mask(rgb)
    pix = lab[mask] if mask.sum() > 100 else lab.reshape(-1, 3)
    mean, std = pix.mean(0), pix.std(0) + 1e-6
    out = (lab - mean) / std * np.asarray(params["std"]) + np.asarray(params["mean"])
    return np.clip(color.lab2rgb(out) * 255.0, 0, 255).astype(np.uint8)


def _macenko_stains(rgb: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Stain matrix (2 x 3, rows H then E) and the 99th-percentile concentrations of ``rgb``."""
    od = -np.log((rgb.reshape(-1, 3).astype(np.float64) + 1) / _IO)
    od_t = od[(od > _BETA).all(axis=1)]
    if len(od_t) < 50:
        raise ValueError("too few stained pixels to estimate stain vectors (is the image blank?)")
    _, vecs = np.linalg.eigh(np.cov(od_t.T))
    plane = vecs[:, 1:3]
    proj = od_t @ plane
    phi = np.arctan2(proj[:, 1], proj[:, 0])
    lo, hi = np.percentile(phi, _ALPHA), np.percentile(phi, 100 - _ALPHA)
    v1 = plane @ np.array([np.cos(lo), np.sin(lo)])
    v2 = plane @ np.array([np.cos(hi), np.sin(hi)])
    stains = np.array([v1, v2]) if v1[0] > v2[0] else np.array([v2, v1])
    stains = stains * np.sign(stains.sum(1, keepdims=True))  # OD vectors are positive
    stains /= np.linalg.norm(stains, axis=1, keepdims=True)
    conc = np.linalg.lstsq(stains.T, od.T, rcond=None)[0]
    return stains, np.percentile(conc, 99, axis=1)


def fit_macenko(reference: np.ndarray) -> dict:
    stains, max_c = _macenko_stains(reference)
    return {"method": "macenko", "stains": stains.tolist(), "max_conc": max_c.tolist()}


def apply_macenko(rgb: np.ndarray, params: dict) -> np.ndarray:
    try:
        stains, max_c = _macenko_stains(rgb)
    except ValueError:
        return rgb  # a blank image has no stain to normalise
    od = -np.log((rgb.reshape(-1, 3).astype(np.float64) + 1) / _IO)
    conc = np.linalg.lstsq(stains.T, od.T, rcond=None)[0]
    conc *= (np.asarray(params["max_conc"]) / np.maximum(max_c, 1e-6))[:, None]
    out = _IO * np.exp(-(np.asarray(params["stains"]).T @ conc))
    return np.clip(out.T.reshape(rgb.shape), 0, 255).astype(np.uint8)


def fit_stain(method: str, reference: np.ndarray) -> dict:
    if method == "reinhard":
        return fit_reinhard(reference)
    if method == "macenko":
        return fit_macenko(reference)
    raise ValueError(f"Unknown stain normalisation {method!r}. Available: ['macenko', 'reinhard']")


def apply_stain(rgb: np.ndarray, params: dict) -> np.ndarray:
    return apply_reinhard(rgb, params) if params["method"] == "reinhard" else apply_macenko(rgb, params)


def hed_jitter(rgb: np.ndarray, rng: np.random.Generator, sigma: float = 0.03) -> np.ndarray:
    """Stain augmentation: scale and shift each haematoxylin / eosin / DAB channel a little (Tellez et al. 2018)."""
    hed = color.rgb2hed(rgb)
    alpha = rng.uniform(1 - sigma, 1 + sigma, 3)
    beta = rng.uniform(-sigma, sigma, 3)
    out = color.hed2rgb(hed * alpha + beta * np.abs(hed).max(axis=(0, 1)).clip(min=1e-3))
    return np.clip(out * 255.0, 0, 255).astype(np.uint8)
