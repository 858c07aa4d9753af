"""Nucleus and cytoplasm segmentation of a single-cell image (one white cell near the centre).

Works without training on the looks of the public sets: a cell on slide glass with red cells around it (ALL-IDB2,
DeepAPL), a field crop with several white cells (Aria; the one nearest the centre is taken) and a segmented cell on a
black background (C-NMC 2019).

How: in Romanowsky-type stains (Wright, Giemsa, May-Grünwald) the nucleus is the dark purple/blue region, which
absorbs green far more than blue, so ``(B - G)`` plus saturation separates it from red cells (pink or grey, B ~ G),
cytoplasm (pale) and glass. A per-image Otsu threshold on that score gives the nuclei; the component nearest the
centre (after a closing that joins the lobes of a segmented nucleus) is the nucleus. The whole cell is the
watershed basin of that nucleus on the distance map of everything darker than the glass, so touching red cells get
their own basins instead of joining the white cell.
"""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np
from scipy import ndimage as ndi
from skimage.feature import peak_local_max
from skimage.filters import threshold_multiotsu, threshold_otsu
from skimage.segmentation import watershed

# Images are segmented with their longer side at most this many pixels (speed; cells are > 60 px across here).
WORK_SIZE = 256
# A pixel whose brightest channel is below this counts as the black background of a pre-segmented cell (C-NMC).
BLACK_LEVEL = 20
# The cell mask ends at most this many equivalent nucleus radii (plus 3 px) away from the nucleus.
CYTOPLASM_REACH = 1.0


@dataclass(frozen=True)
class Segmentation:
    """Boolean masks of one white cell, at the resolution of the image that was segmented.

    Attributes:
        nucleus: the nucleus of the cell nearest the image centre.
        cell: the whole cell (nucleus and cytoplasm); always contains ``nucleus``.
        foreground: everything that is not slide glass or black background (cells of all kinds).
        black_background: whether the image is a cell already cut out onto black.
    """

    nucleus: np.ndarray
    cell: np.ndarray
    foreground: np.ndarray
    black_background: bool

    @property
    def cytoplasm(self) -> np.ndarray:
        return self.cell & ~self.nucleus


def check_rgb(rgb: np.ndarray, what: str = "image") -> np.ndarray:
    """Validate an ``(H, W, 3)`` uint8 RGB array (the form :func:`leukoscope.data.images.read_image` returns)."""
    if not isinstance(rgb, np.ndarray):
        raise TypeError(f"{what} must be a numpy array, got {type(rgb).__name__}")
    if rgb.ndim != 3 or rgb.shape[2] != 3:
        raise ValueError(f"{what} must be an (H, W, 3) RGB array, got shape {rgb.shape}")
    if rgb.dtype != np.uint8:
        raise ValueError(f"{what} must be uint8 (0-255), got dtype {rgb.dtype}")
    if min(rgb.shape[:2]) < 16:
        raise ValueError(f"{what} is too small to segment a cell: {rgb.shape[1]}x{rgb.shape[0]} pixels")
    return rgb


def to_work_size(rgb: np.ndarray, size: int = WORK_SIZE) -> np.ndarray:
    """Shrink so the longer side is at most ``size`` (area interpolation); smaller images are left as they are."""
    h, w = rgb.shape[:2]
    scale = size / max(h, w)
    if scale >= 1:
        return rgb
    return cv2.resize(rgb, (max(1, round(w * scale)), max(1, round(h * scale))), interpolation=cv2.INTER_AREA)


def nucleus_score(rgb: np.ndarray) -> np.ndarray:
    """Per-pixel "nucleus-ness" in [0, 2]: blue-over-green excess plus saturation (smoothed)."""
    f = rgb.astype(np.float32) / 255.0
    r, g, b = f[..., 0], f[..., 1], f[..., 2]
    mx = f.max(axis=2)
    sat = np.where(mx > 0, (mx - f.min(axis=2)) / np.maximum(mx, 1e-6), 0.0)
    purple = np.clip(b - g, 0, None) + np.clip(r - g, 0, None) * 0.5 * (b > g)
    score = purple + sat
    return cv2.GaussianBlur(score.astype(np.float32), (0, 0), 1.0)


def _is_black_background(rgb: np.ndarray) -> bool:
    border = np.concatenate([rgb[0], rgb[-1], rgb[:, 0], rgb[:, -1]])
    return float((border.max(axis=1) < BLACK_LEVEL).mean()) > 0.5


def _fill_and_clean(mask: np.ndarray, min_area: int, open_radius: int = 1) -> np.ndarray:
    if open_radius > 0:
        k = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * open_radius + 1, 2 * open_radius + 1))
        mask = cv2.morphologyEx(mask.astype(np.uint8), cv2.MORPH_OPEN, k).astype(bool)
    mask = ndi.binary_fill_holes(mask)
    lab, n = ndi.label(mask)
    if n == 0:
        return mask
    sizes = np.bincount(lab.ravel())
    keep = sizes >= min_area
    keep[0] = False
    return keep[lab]


def _component_nearest_centre(mask: np.ndarray) -> np.ndarray:
    """The connected component of ``mask`` closest to the image centre (distance to its nearest pixel; among
    components containing the centre region, the largest)."""
    lab, n = ndi.label(mask)
    if n <= 1:
        return lab > 0
    h, w = mask.shape
    yy, xx = np.nonzero(lab)
    d = np.hypot(yy - (h - 1) / 2, xx - (w - 1) / 2)
    labels = lab[yy, xx]
    nearest = np.full(n + 1, np.inf)
    np.minimum.at(nearest, labels, d)
    sizes = np.bincount(labels, minlength=n + 1).astype(float)
    # Small specks (platelets, stain debris) lose to a real nucleus a few pixels further away.
    cost = nearest[1:] - 0.25 * np.sqrt(sizes[1:])
    return lab == (int(np.argmin(cost)) + 1)


def _foreground(rgb: np.ndarray, black: bool) -> np.ndarray:
    """Everything darker or more coloured than the slide glass (or not black, for cut-out cells)."""
    if black:
        return rgb.max(axis=2) >= BLACK_LEVEL
    f = rgb.astype(np.float32)
    bright = f.sum(axis=2)
    glass = np.median(f[bright >= np.quantile(bright, 0.7)], axis=0)
    dist = cv2.GaussianBlur(np.linalg.norm(f - glass, axis=2), (0, 0), 1.0)
    try:
        # Three classes (glass, red cells / cytoplasm, nuclei): the lower threshold keeps pale cytoplasm.
        t = threshold_multiotsu(dist, classes=3)[0]
    except ValueError:
        return np.zeros(rgb.shape[:2], bool)
    return dist > max(t, 12.0)


def segment_cell(rgb: np.ndarray) -> Segmentation:
    """Segment the white cell nearest the centre of ``rgb`` into nucleus and cytoplasm.

    Args:
        rgb: ``(H, W, 3)`` uint8 RGB image of one cell (any of the supported looks). Segmented as given: callers
            that want speed shrink it first with :func:`to_work_size`.

    Returns:
        The masks. When no nucleus can be found (a blank image) the nucleus is a small disk at the centre, so
        features stay defined; such an image is an outlier anyway.
    """
    rgb = check_rgb(rgb)
    h, w = rgb.shape[:2]
    black = _is_black_background(rgb)
    fg = _foreground(rgb, black)
    fg = _fill_and_clean(fg, min_area=max(16, h * w // 2000))
    score = nucleus_score(rgb)
    min_nuc = max(12, h * w // 1500)

    region = fg if fg.sum() > min_nuc else np.ones_like(fg)
    vals = score[region]
    nucleus = np.zeros_like(fg)
    if vals.size and float(vals.max() - vals.min()) > 1e-3:
        t = threshold_otsu(vals)
        cand = (score > t) & region
        # Joins the lobes of a segmented neutrophil nucleus before choosing a component.
        k = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (7, 7))
        joined = cv2.morphologyEx(cand.astype(np.uint8), cv2.MORPH_CLOSE, k).astype(bool)
        joined = _fill_and_clean(joined, min_area=min_nuc)
        if joined.any():
            chosen = _component_nearest_centre(joined)
            nucleus = ndi.binary_fill_holes(chosen & cand) if (chosen & cand).sum() >= min_nuc else chosen
            nucleus = _largest(nucleus) if nucleus.any() else chosen
    if not nucleus.any():
        yy, xx = np.ogrid[:h, :w]
        nucleus = np.hypot(yy - h / 2, xx - w / 2) <= max(3, min(h, w) // 10)

    cell = _cell_from_nucleus(fg | nucleus, nucleus)
    return Segmentation(nucleus=nucleus, cell=cell, foreground=fg, black_background=black)


def _largest(mask: np.ndarray) -> np.ndarray:
    lab, n = ndi.label(mask)
    if n <= 1:
        return mask
    return lab == (int(np.argmax(np.bincount(lab.ravel())[1:])) + 1)


def _cell_from_nucleus(fg: np.ndarray, nucleus: np.ndarray) -> np.ndarray:
    """The watershed basin of ``nucleus`` among the blobs of ``fg`` (touching red cells get basins of their own)."""
    lab, _ = ndi.label(fg)
    ids = np.unique(lab[nucleus])
    ids = ids[ids > 0]
    blob = np.isin(lab, ids) if ids.size else nucleus.copy()
    dist = ndi.distance_transform_edt(blob)
    nuc_r = np.sqrt(nucleus.sum() / np.pi)
    markers = np.zeros(fg.shape, np.int32)
    # Other objects in the blob: distance peaks well away from the nucleus (red cells, neighbouring white cells).
    min_sep = max(3, int(round(nuc_r * 0.5)))
    peaks = peak_local_max(dist, min_distance=min_sep, threshold_abs=max(2.0, 0.25 * nuc_r), labels=blob.astype(int),
                           exclude_border=False)
    grown = ndi.binary_dilation(nucleus, iterations=max(2, int(round(nuc_r * 0.35))))
    for i, (y, x) in enumerate(peaks, start=2):
        if not grown[y, x]:
            markers[y, x] = i
    markers[nucleus] = 1
    basins = watershed(-dist, markers, mask=blob)
    # A white cell's cytoplasm reaches about one nucleus radius beyond the nucleus; farther is a neighbour.
    near = ndi.distance_transform_edt(~nucleus) <= nuc_r * CYTOPLASM_REACH + 3
    cell = ndi.binary_fill_holes(((basins == 1) & near) | nucleus)
    k = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (5, 5))
    cell = cv2.morphologyEx(cell.astype(np.uint8), cv2.MORPH_OPEN, k).astype(bool) | nucleus
    lab, n = ndi.label(cell)
    if n > 1:
        keep = np.unique(lab[nucleus])
        cell = np.isin(lab, keep[keep > 0])
    return cell
