"""Finding the white cells in a whole smear field: red-cell size, nucleus segmentation, watershed splitting.

Fields come at very different magnifications (BCCD: a red cell is ~100 px across; ALL-IDB1: ~70-90 px), so
everything is measured in red-cell diameters, never in image pixels or image sizes:

1. :func:`estimate_rbc_diameter` measures the typical red-cell diameter of the field by granulometry: the
   foreground (everything darker than the glass) is opened with discs of growing radius, and the radius at which
   half of the foreground area is gone is the typical half-width of the objects, which red cells dominate.
2. The field is resampled so that a red cell is :attr:`DetectConfig.work_rbc_px` pixels across.
3. Nuclei are the pixels whose blue channel exceeds the green one by :attr:`DetectConfig.nucleus_threshold`
   (Romanowsky stains: nuclei are purple and absorb green; red cells, platelets' pale halo and glass do not).
   A small closing joins the lobes of a segmented neutrophil nucleus.
4. Objects smaller than :attr:`DetectConfig.min_area` red-cell areas (platelets, debris) are dropped; touching
   nuclei are split by a watershed on the distance map of their dark core, and segments that are too close or too
   thin to be separate nuclei (lobes of one granulocyte) are merged back.
5. Smudge cells (frayed outline and chromatin paler than the field's intact nuclei) are set aside, not counted.
6. Each nucleus is grown by :attr:`DetectConfig.cell_margin` red-cell diameters (without overlapping a neighbour)
   to cover its cytoplasm; that region gives the reported outline, box, area and centroid.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields, replace
from typing import Any

import cv2
import numpy as np
from scipy import ndimage as ndi
from skimage.filters import threshold_otsu
from skimage.morphology import convex_hull_image, remove_small_holes
from skimage.segmentation import expand_labels, watershed

from leukoscope.preprocess.segment import check_rgb

# The red-cell size is measured on a copy whose longer side is this many pixels: enough for a red cell of a
# 2592 px field (~85 px) to stay ~17 px across, cheap enough for the granulometry's repeated distance transforms.
_MEASURE_SIZE = 512


@dataclass(frozen=True)
class DetectConfig:
    """Parameters of :func:`detect_cells`. Lengths are in red-cell diameters, areas in red-cell areas.

    Attributes:
        work_rbc_px: red-cell diameter, in pixels, of the resampled field the segmentation runs on.
        nucleus_threshold: a pixel is nucleus when its (smoothed) blue minus green value exceeds this (0-255 scale).
        smooth: Gaussian smoothing of the nucleus score, in red-cell diameters (removes JPEG blocks and noise).
        merge_radius: radius of the closing that joins nuclear lobes and fragments of one cell.
        min_area: nuclei smaller than this (in red-cell areas) are platelets or debris.
        max_area: a nucleus (after splitting) larger than this is stain precipitate or an unsplit clump; dropped.
        split_min_distance: watershed seeds (distance-map peaks) closer than this are one cell.
        split_min_radius: a seed's dark core must be at least this thick (half-width); the lobes of a segmented
            neutrophil are thinner and so never become seeds of their own.
        split_min_area: a component is only split when it is larger than this (one nucleus rarely is).
        merge_centroid_distance: watershed segments whose centroids are closer than this are one cell.
        merge_min_radius: a watershed segment thinner than this (half-width) is a lobe and joins its neighbour.
        cell_margin: how far each nucleus is grown to cover its cytoplasm.
        smudge_max_solidity: an object whose nucleus solidity is below this *and* whose chromatin is paler than
            ``smudge_darkness`` times the field's solid nuclei is a smudge cell, not counted; 0 turns this off.
        smudge_darkness: see ``smudge_max_solidity``.
        rbc_diameter: red-cell diameter in original pixels; ``None`` measures it in each field.
    """

    work_rbc_px: float = 32.0
    nucleus_threshold: float = 45.0
    smooth: float = 0.04
    merge_radius: float = 0.12
    min_area: float = 0.45
    max_area: float = 12.0
    split_min_distance: float = 0.8
    split_min_radius: float = 0.28
    split_min_area: float = 1.2
    merge_centroid_distance: float = 1.1
    merge_min_radius: float = 0.5
    cell_margin: float = 0.3
    smudge_max_solidity: float = 0.72
    smudge_darkness: float = 0.92
    rbc_diameter: float | None = None

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> DetectConfig:
        """Build from a mapping; an unknown key is an error that lists the known ones."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"unknown detection setting(s) {unknown}; known: {sorted(known)}")
        return replace(cls(), **values)


@dataclass(frozen=True)
class Cell:
    """One white cell found in a field. Coordinates are pixels of the original image.

    Attributes:
        x: centroid column.
        y: centroid row.
        bbox: ``(x0, y0, x1, y1)``, ``x1``/``y1`` exclusive.
        area: area of the cell (nucleus plus margin) in pixels.
        nucleus_area: area of the nucleus in pixels.
        score: mean nucleus score (blue minus green) inside the nucleus.
        solidity: area of the raw (unsmoothed) nucleus pixels over their convex hull's; frayed smudge cells score low.
        darkness: ``1 - median green of the nucleus / green of the glass``; condensed chromatin is darker.
        contour: polygon outline ``[(x, y), ...]`` of the cell.
    """

    x: float
    y: float
    bbox: tuple[int, int, int, int]
    area: float
    nucleus_area: float
    score: float
    solidity: float = 1.0
    darkness: float = 0.0
    contour: list[tuple[float, float]] = field(default_factory=list, repr=False)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["bbox"] = list(self.bbox)
        d["contour"] = [list(p) for p in self.contour]
        return d


@dataclass(frozen=True)
class Detection:
    """What :func:`detect_cells` found in one field.

    Attributes:
        cells: the white cells, sorted top to bottom, left to right.
        rbc_diameter: the red-cell diameter used, in original pixels.
        scale: working-image pixels per original pixel.
        labels: the cell label image at the working scale (0 = no cell, ``i + 1`` = ``cells[i]``).
        smudges: objects taken for smudge (basket) cells, not counted as white cells.
    """

    cells: list[Cell]
    rbc_diameter: float
    scale: float
    labels: np.ndarray = field(repr=False)
    smudges: list[Cell] = field(default_factory=list)


def _resize(img: np.ndarray, scale: float) -> np.ndarray:
    h, w = img.shape[:2]
    size = (max(1, round(w * scale)), max(1, round(h * scale)))
    interp = cv2.INTER_AREA if scale < 1 else cv2.INTER_LINEAR
    return cv2.resize(img, size, interpolation=interp)


def _disc(radius: float) -> np.ndarray:
    r = max(1, int(round(radius)))
    return cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * r + 1, 2 * r + 1))


def nucleus_score(rgb: np.ndarray) -> np.ndarray:
    """Blue minus green, 0-255 float32: high on Romanowsky-stained nuclei, near 0 on red cells and glass."""
    f = rgb.astype(np.float32)
    return np.clip(f[..., 2] - f[..., 1], 0, None)


def estimate_rbc_diameter(rgb: np.ndarray, nucleus_threshold: float = 50.0, white_cell_margin: float = 0.0) -> float:
    """Typical red-cell diameter of a smear field, in pixels, by granulometry of the foreground.

    The foreground is everything darker than the glass (Otsu on darkness, nuclei excluded from the fit, holes such
    as the red cells' central pallor filled). Opening it with a disc of radius ``r`` keeps only the parts at least
    ``2r`` wide; the radius at which half the foreground area is gone is the area-weighted median half-width, and
    red cells are most of the foreground in any smear. On 60 BCCD train/val fields this estimate is 0.88x the median
    annotated red-cell box side (10th-90th percentile 0.80-1.06; boxes are a little larger than the cells); on the 10
    ALL-IDB1 fields it is 0.88-1.04x the equivalent diameter of isolated red cells (9 of 10 within 7%).

    Args:
        rgb: the field, ``(H, W, 3)`` uint8.
        nucleus_threshold: blue-minus-green level above which a pixel is nucleus (excluded from the threshold fit).
        white_cell_margin: when > 0, the half-area point is measured only on foreground farther than this share of
            the measuring copy's longer side (512 px) from any nucleus, so white cells do not count as red cells:
            in dense blast fields they are a large part of the foreground and push the estimate up (the learned
            detector measures with 0.012, ~6 px, a white cell's cytoplasm rim).

    Returns:
        The diameter in pixels of ``rgb``.
    """
    check_rgb(rgb, "field")
    h, w = rgb.shape[:2]
    f = min(1.0, _MEASURE_SIZE / max(h, w))
    small = _resize(rgb, f) if f < 1 else rgb
    fl = cv2.GaussianBlur(small.astype(np.float32), (0, 0), 1.0)
    dark = 255.0 - fl.mean(axis=2)
    nuc = (fl[..., 2] - fl[..., 1]) > nucleus_threshold
    values = dark[~nuc] if (~nuc).any() else dark.ravel()
    if np.ptp(values) < 1e-3:
        raise ValueError(f"field is blank (no contrast) at {w}x{h}; cannot measure the red-cell size")
    fg = ndi.binary_fill_holes((dark > threshold_otsu(values)) | nuc).astype(np.uint8)
    total = int(fg.sum())
    if total == 0:
        raise ValueError(f"no cells found in the {w}x{h} field; cannot measure the red-cell size")
    counted = fg > 0
    if white_cell_margin > 0 and nuc.any():
        far = cv2.distanceTransform((~nuc).astype(np.uint8), cv2.DIST_L2, 5) > white_cell_margin * max(small.shape)
        if (counted & far).sum() > 0.2 * total:  # keep the plain estimate when almost everything is near a nucleus
            counted &= far
    total = int(counted.sum())
    dt = cv2.distanceTransform(fg, cv2.DIST_L2, 5)
    prev_r, prev_frac = 0.0, 1.0
    for r in np.arange(1.0, dt.max() + 1.0):
        core = (dt > r).astype(np.uint8)
        if core.any():
            opened = cv2.distanceTransform(1 - core, cv2.DIST_L2, 5) <= r
            frac = float((opened & counted).sum()) / total
        else:
            frac = 0.0
        if frac < 0.5:
            # Linear interpolation between the two radii that bracket the half-area point.
            r50 = prev_r + (prev_frac - 0.5) / max(prev_frac - frac, 1e-9) * (r - prev_r)
            return float(2.0 * r50 / f)
        prev_r, prev_frac = float(r), frac
    return float(2.0 * dt.max() / f)


def _split_touching(mask: np.ndarray, dark: np.ndarray, cfg: DetectConfig) -> np.ndarray:
    """Label ``mask``; components larger than ``split_min_area`` are cut by a watershed.

    The seeds come from the distance map of the *dark core* of the mask (darker than an Otsu threshold of the
    darkness inside the mask): touching blasts share a pale rim of cytoplasm that the nucleus score keeps but the
    core drops, so each nucleus gets its own distance peak.
    """
    d = cfg.work_rbc_px
    rbc_area = np.pi * d * d / 4.0
    lab, n = ndi.label(mask)
    if n == 0:
        return lab
    sizes = np.bincount(lab.ravel())
    big = np.flatnonzero(sizes > cfg.split_min_area * rbc_area)
    big = big[big > 0]
    if len(big) == 0:
        return lab
    is_big = np.zeros(n + 1, bool)
    is_big[big] = True
    region = is_big[lab]
    inside = dark[mask]
    core = region & (dark > threshold_otsu(inside)) if np.ptp(inside) > 1e-3 else region
    core = cv2.morphologyEx(core.astype(np.uint8), cv2.MORPH_OPEN, _disc(0.05 * d)).astype(bool)
    dt = cv2.distanceTransform(core.astype(np.uint8), cv2.DIST_L2, 5)
    dt = cv2.GaussianBlur(dt, (0, 0), 1.0)
    min_dist = max(1, int(round(cfg.split_min_distance * d)))
    peaks = (dt == ndi.maximum_filter(dt, size=2 * min_dist + 1)) & (dt > cfg.split_min_radius * d) & core
    markers, _ = ndi.label(ndi.binary_dilation(peaks, iterations=1))
    ws = watershed(-dt, markers, mask=region)
    ws = _merge_lobes(ws, cfg)
    out = lab.copy()
    # Components without a seed keep their own label.
    out[ws > 0] = ws[ws > 0] + n
    return _relabel(out)


def _relabel(lab: np.ndarray) -> np.ndarray:
    """Renumber the labels present in ``lab`` as 1..k (0 stays background), keeping their order."""
    present = np.bincount(lab.ravel()) > 0
    present[0] = False
    lut = np.zeros(len(present), np.int32)
    lut[present] = np.arange(1, int(present.sum()) + 1)
    return lut[lab]


def _merge_lobes(ws: np.ndarray, cfg: DetectConfig) -> np.ndarray:
    """Undo watershed cuts through one cell: two touching segments are one cell when their centroids are closer
    than ``merge_centroid_distance`` or either is thinner than ``merge_min_radius`` (a lobe or a granular patch
    of cytoplasm, not a nucleus). Touching blasts measured 1.1-2.2 red-cell diameters apart with half-widths of
    0.53-0.88 on ALL-IDB1; the lobes of one BCCD granulocyte 0.76-1.37 apart, half-widths 0.36-0.62."""
    n = int(ws.max())
    if n < 2:
        return ws
    d = cfg.work_rbc_px
    idx = np.arange(1, n + 1)
    half_width = np.zeros(n + 1)
    for i, sl in enumerate(ndi.find_objects(ws), start=1):
        if sl is not None:
            sub = np.pad(ws[sl] == i, 1).astype(np.uint8)
            half_width[i] = cv2.distanceTransform(sub, cv2.DIST_L2, 5).max()
    com = np.zeros((n + 1, 2))
    com[1:] = np.asarray(ndi.center_of_mass(np.ones_like(ws, dtype=np.float32), ws, idx)).reshape(n, 2)
    pairs = set()
    for a, b in ((ws[:, :-1], ws[:, 1:]), (ws[:-1, :], ws[1:, :])):
        touch = (a != b) & (a > 0) & (b > 0)
        pairs.update(zip(np.minimum(a[touch], b[touch]).tolist(), np.maximum(a[touch], b[touch]).tolist(),
                         strict=True))
    parent = np.arange(n + 1)

    def find(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    for i, j in sorted(pairs):
        close = np.hypot(*(com[i] - com[j])) < cfg.merge_centroid_distance * d
        thin = min(half_width[i], half_width[j]) < cfg.merge_min_radius * d
        if close or thin:
            parent[find(j)] = find(i)
    roots = np.array([find(i) for i in range(n + 1)])
    return roots[ws]


def detect_cells(rgb: np.ndarray, config: DetectConfig | None = None) -> Detection:
    """Find the white cells of a smear field.

    Args:
        rgb: the field, ``(H, W, 3)`` uint8 RGB.
        config: detection parameters; defaults to :class:`DetectConfig`.

    Returns:
        A :class:`Detection` with one :class:`Cell` per white cell, in original-image pixels.
    """
    cfg = config or DetectConfig()
    check_rgb(rgb, "field")
    rbc_d = cfg.rbc_diameter if cfg.rbc_diameter is not None else estimate_rbc_diameter(rgb)
    if not np.isfinite(rbc_d) or rbc_d <= 0:
        raise ValueError(f"red-cell diameter must be a positive number of pixels, got {rbc_d!r}")
    d = cfg.work_rbc_px
    scale = d / rbc_d
    work = _resize(rgb, scale) if abs(scale - 1) > 1e-3 else rgb
    score = nucleus_score(work)
    sigma = cfg.smooth * d
    if sigma > 0.3:
        score = cv2.GaussianBlur(score, (0, 0), sigma)
    mask = (score > cfg.nucleus_threshold).astype(np.uint8)
    if cfg.merge_radius > 0:
        mask = cv2.morphologyEx(mask, cv2.MORPH_CLOSE, _disc(cfg.merge_radius * d))
    rbc_area = np.pi * d * d / 4.0
    # Only small holes: a ring of touching cells around a red cell must not become one solid blob.
    mask = remove_small_holes(mask.astype(bool), max_size=int(0.5 * rbc_area))
    lab, n = ndi.label(mask)
    if n:
        sizes = np.bincount(lab.ravel())
        keep = sizes >= cfg.min_area * rbc_area
        keep[0] = False
        mask = keep[lab]
    dark = 255.0 - cv2.GaussianBlur(work[..., 1].astype(np.float32), (0, 0), max(sigma, 0.5))
    nuclei = _split_touching(mask, dark, cfg)
    # Drop fragments too small to be a nucleus (a lobe cut off a neighbour) and objects too large to be one.
    n_nuc = int(nuclei.max())
    if n_nuc:
        sizes = np.bincount(nuclei.ravel(), minlength=n_nuc + 1)
        ok = (sizes >= cfg.min_area * rbc_area) & (sizes <= cfg.max_area * rbc_area)
        ok[0] = False
        remap = np.zeros(n_nuc + 1, np.int32)
        remap[ok] = np.arange(1, int(ok.sum()) + 1)
        nuclei = remap[nuclei]
    cells_lab = expand_labels(nuclei, distance=cfg.cell_margin * d) if cfg.cell_margin > 0 else nuclei
    # Solidity is measured on the unsmoothed, unclosed nucleus pixels: smoothing hides a smudge cell's frayed edge.
    raw = nucleus_score(work) > cfg.nucleus_threshold
    found = _describe(cells_lab, nuclei, score, raw, work[..., 1], scale, rgb.shape[:2])
    smudge = _smudges(found, cfg)
    order = sorted(range(len(found)), key=lambda i: (round(found[i].y), found[i].x))
    remap = np.zeros(len(found) + 1, np.int32)
    kept = [i for i in order if not smudge[i]]
    for new, old in enumerate(kept):
        remap[old + 1] = new + 1
    cells = [found[i] for i in kept]
    smudges = [found[i] for i in order if smudge[i]]
    return Detection(cells, float(rbc_d), float(scale), remap[cells_lab], smudges)


def _smudges(cells: list[Cell], cfg: DetectConfig) -> list[bool]:
    """Which objects are smudge (basket) cells: a frayed outline (low solidity) *and* chromatin paler than the
    field's intact nuclei. The reference darkness is the median of the solid nuclei (solidity >= 0.85); with fewer
    than two of them there is no reference and nothing is called a smudge (a BCCD field with one lobed neutrophil).

    On the five masked ALL-IDB1 fields this removes 9 of the 23 objects outside the WBC masks and none of the 80
    inside them.
    """
    if cfg.smudge_max_solidity <= 0:
        return [False] * len(cells)
    solid = [c.darkness for c in cells if c.solidity >= 0.85]
    if len(solid) < 2:
        return [False] * len(cells)
    ref = float(np.median(solid))
    return [c.solidity < cfg.smudge_max_solidity and c.darkness < cfg.smudge_darkness * ref for c in cells]


def _describe(cells_lab: np.ndarray, nuclei: np.ndarray, score: np.ndarray, raw: np.ndarray, green: np.ndarray,
              scale: float, shape: tuple[int, int]) -> list[Cell]:
    n = int(cells_lab.max())
    if n == 0:
        return []
    h, w = shape
    idx = np.arange(1, n + 1)
    com = ndi.center_of_mass(np.ones_like(cells_lab, dtype=np.float32), cells_lab, idx)
    areas = np.bincount(cells_lab.ravel(), minlength=n + 1)[1:]
    nuc_areas = np.bincount(nuclei.ravel(), minlength=n + 1)[1:]
    means = ndi.mean(score, nuclei, index=idx)
    glass = float(np.percentile(green, 95)) or 1.0
    out = []
    for i, sl in enumerate(ndi.find_objects(cells_lab)):
        if sl is None:
            continue
        ys, xs = sl
        x0 = max(0, int(np.floor(xs.start / scale)))
        y0 = max(0, int(np.floor(ys.start / scale)))
        x1 = min(w, int(np.ceil(xs.stop / scale)))
        y1 = min(h, int(np.ceil(ys.stop / scale)))
        sub = (cells_lab[sl] == i + 1).astype(np.uint8)
        contours, _ = cv2.findContours(sub, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
        contour: list[tuple[float, float]] = []
        if contours:
            c = max(contours, key=cv2.contourArea)
            c = cv2.approxPolyDP(c, 0.5, True)[:, 0, :]
            # Pixel centres: +0.5 in the working image, then back to original pixels.
            contour = [(round((px + xs.start + 0.5) / scale, 1), round((py + ys.start + 0.5) / scale, 1))
                       for px, py in c]
        in_nucleus = nuclei[sl] == i + 1
        med_green = float(np.median(green[sl][in_nucleus])) if in_nucleus.any() else glass
        nuc = (cells_lab[sl] == i + 1) & raw[sl]
        solidity = float(nuc.sum()) / max(float(convex_hull_image(nuc).sum()), 1.0) if nuc.any() else 0.0
        cy, cx = com[i]
        out.append(Cell(
            x=round(float((cx + 0.5) / scale - 0.5), 1),
            y=round(float((cy + 0.5) / scale - 0.5), 1),
            bbox=(x0, y0, x1, y1),
            area=round(float(areas[i] / scale**2), 1),
            nucleus_area=round(float(nuc_areas[i] / scale**2), 1),
            score=round(float(means[i]), 2),
            solidity=round(min(solidity, 1.0), 3),
            darkness=round(1.0 - med_green / glass, 3),
            contour=contour,
        ))
    return out
