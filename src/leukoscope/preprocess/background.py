"""Cells on a black background (C-NMC 2019): the cell's mask, and a random smear-like background in place of black.

A model trained on such images can learn from the black surround (how much of it there is, its edge against the
cell) instead of the cell; ``Augment(background=p)`` replaces the black surround of a training view with a random
light, smooth background with probability ``p``, so that the surround stops carrying the class.
"""

from __future__ import annotations

import cv2
import numpy as np

DARK = 30  # grey level: pixels whose brightest channel is below this are background


def dark_border_share(rgb: np.ndarray, dark: int = DARK) -> float:
    """The share of the image's border pixels whose brightest channel is below ``dark``."""
    edge = np.concatenate([rgb[0], rgb[-1], rgb[:, 0], rgb[:, -1]])
    return float((edge.max(axis=1) < dark).mean())


def foreground_mask(rgb: np.ndarray, dark: int = DARK, border_share: float = 0.95) -> np.ndarray | None:
    """The cell of an image showing one segmented cell on a black background, as a bool mask (holes filled, the
    largest bright component); None when the image is not one (its border is not almost all black)."""
    # The border first: most images are not cut-out cells, and this check is all they cost (prediction calls it on
    # every image when a model crops cut-outs; a whole-image max over channels would cost 4x the rest of prepare).
    if dark_border_share(rgb, dark) < border_share:
        return None
    c = np.ascontiguousarray(rgb)
    bright = cv2.max(cv2.max(c[..., 0], c[..., 1]), c[..., 2]) >= dark
    if not bright.any():
        return None
    n, lab, stats, _ = cv2.connectedComponentsWithStats(bright.astype(np.uint8), connectivity=8)
    if n < 2:
        return None
    keep = (lab == 1 + int(np.argmax(stats[1:, cv2.CC_STAT_AREA]))).astype(np.uint8)
    # fill holes: flood the background from a corner (black there: the border is black), the rest is the cell
    flood = keep.copy()
    cv2.floodFill(flood, np.zeros((flood.shape[0] + 2, flood.shape[1] + 2), np.uint8), (0, 0), 1)
    return (keep | (1 - flood)).astype(bool)


CUTOUT_MARGIN = 0.02  # share of the cell's size left around it on each side by cutout_frame


def cutout_frame(rgb: np.ndarray) -> tuple[int, int, int] | None:
    """The square ``(y0, x0, side)`` around the cell of an image of one cell cut out onto black (its bounding box's
    longer side plus ``CUTOUT_MARGIN`` on each side, centred on the box; it may reach past the image); None for any
    other image."""
    mask = foreground_mask(rgb)
    if mask is None:
        return None
    ys, xs = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
    side = int(round(max(ys[-1] - ys[0] + 1, xs[-1] - xs[0] + 1) * (1 + 2 * CUTOUT_MARGIN)))
    return (int(round((ys[0] + ys[-1] + 1 - side) / 2)), int(round((xs[0] + xs[-1] + 1 - side) / 2)), side)


def is_cutout_view(rgb: np.ndarray, dark: int = DARK, share: float = 0.5) -> bool:
    """Whether a (prepared, maybe cropped) image shows a cell on black: at least ``share`` of its border is black.
    A crop by :func:`cutout_frame` keeps black corners; a smear image has next to none."""
    return dark_border_share(rgb, dark) >= share


def smear_background(shape: tuple[int, int], rng: np.random.Generator) -> np.ndarray:
    """A light, smooth random background (uint8 RGB): a pink-to-lavender base colour (like the plasma-free glass of a
    stained smear), slow variation across the field and a little pixel noise."""
    h, w = shape
    base = rng.uniform((195, 165, 185), (245, 225, 240))
    slow = cv2.resize(rng.normal(0, 8, (4, 4, 3)).astype(np.float32), (w, h), interpolation=cv2.INTER_CUBIC)
    img = base[None, None, :] + slow + rng.normal(0, 3, (h, w, 3))
    return np.clip(img, 0, 255).astype(np.uint8)


def replace_background(rgb: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """``rgb`` with its black surround replaced by :func:`smear_background`; unchanged when it has none."""
    mask = foreground_mask(rgb)
    if mask is None:
        return rgb
    bg = smear_background(rgb.shape[:2], rng)
    # a soft edge of 1-2 px, so that the cell's outline is not a hard cut-out edge
    alpha = cv2.GaussianBlur(mask.astype(np.float32), (5, 5), 1.0)[..., None]
    return (alpha * rgb + (1 - alpha) * bg).round().astype(np.uint8)
