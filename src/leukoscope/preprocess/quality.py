"""Image-quality checks: named warnings when an image is unlike the images a model was trained on.

Two doors:

- :class:`QualityReference` (saved as ``quality.json`` in a cell model's directory) holds the measures of the model's
  training images. :meth:`QualityReference.check` compares one single-cell image with them and warns when it is
  ``out_of_focus``, ``overexposed`` or ``underexposed``, stained unlike any training ``stain``, at a ``cell_size``
  that does not fit the model's magnification, or a ``whole_field`` rather than one cell.
- :func:`check_field` needs no reference: it warns when the field scanner is given one ``single_cell`` crop, and when
  a field is out of focus or badly exposed by fixed, loose bounds.

How a single-cell image is compared: the training sets have several stains, lighting levels and magnifications
(C-NMC cells cut out onto black, dark ALL-IDB2 crops, Aria field crops with burnt-out white glass at about a third of
the others' magnification), so one global range per measure would be as wide as all of them together. Each image is
instead compared with the ``neighbours`` training images of the closest *look*: the chromaticity of its glass, of
its nucleus and of the rest of its foreground, and whether it is a cell cut out onto black. Chromaticity does not
change when the light is dimmed or raised, so a darkened ALL-IDB2 crop is still compared with ALL-IDB2 crops, whose
glass is brighter. A check warns when the image lies beyond the neighbours' 5th-95th percentile band of a measure by
more than a margin (in band widths, past a small fixed ``gap`` that no user would call a problem); ``stain`` warns
when the image's colours are farther from its closest training images than usual. The margins and the stain
threshold are set when the reference is fitted, so that ``FIT_FALSE_ALARM`` (1%) of real images warn per check:
best from calibration images of other patients than the fitting images (a model's validation images, see
:meth:`QualityReference.fit`), else from the fitting images compared with each other, times a safety factor.

Measured (benchmarks/quality_checks.py, reference fitted on 742 training and calibrated on 355 validation images of
the shipped leukemia-cell model, scored on its test images): 1.6-6.1% of real held-out images warn per source;
blur, darkening, channel swaps, hue rotation and a 2-3x digital zoom of single-cell crops warn with the right code in
85-100% of images; Aria's field crops are the exception for zoom (their digital zoom warns out_of_focus, not
cell_size), and brightening by 1.6x warns in only 72% of the dark ALL-IDB2 crops, whose brighter versions look like
other training sources.

:func:`image_stats` gives the measures of one image (about 10-15 ms for a 224-450 px crop on one CPU core):

============== ==========================================================================================
``aspect``     longer side over shorter side
``sharpness``  log10 of the variance of the Laplacian of the grey image (longer side resized to
               ``WORK_SIZE``), over the squared 1st-99th percentile grey range (so dimming does not change it)
``brightness`` 99th percentile grey level (0-255): the glass, or the brightest part of a cell on black
``median``     median grey level of the specimen (pixels brighter than the black surround of a cut-out cell)
``clipped``    share of pixels whose three channels are all at least ``CLIP_LEVEL`` (burnt-out white)
``black``      share of pixels whose brightest channel is below ``BLACK_LEVEL`` (a cell cut out onto black)
``nucleus``    share of the image covered by the nucleus of the white cell nearest the centre (``segment_cell``)
``cell``       share covered by that whole white cell
``offset``     distance of that nucleus from the image centre, in image widths
``span``       the image's size (square root of its area) in red-cell diameters (``estimate_rbc_diameter``);
               NaN when it cannot be measured (a cell on black)
``*_r, *_g``   chromaticity r = R / (R + G + B) and g of the mean colour of the ``glass`` (not foreground), the
               ``nucleus`` and the ``other`` foreground (red cells, cytoplasm)
============== ==========================================================================================
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from leukoscope.preprocess.background import dark_border_share
from leukoscope.preprocess.cells import Detection, detect_cells, estimate_rbc_diameter
from leukoscope.preprocess.segment import check_rgb, segment_cell

QUALITY_FILE = "quality.json"
QUALITY_CODES = ("out_of_focus", "overexposed", "underexposed", "stain", "cell_size", "whole_field", "single_cell")

# Sharpness and exposure are measured with the longer side resized to this (sharpness depends on the pixel scale).
WORK_SIZE = 256
MIN_SIDE = 16  # smaller images cannot be measured (segment.check_rgb refuses them)
# Segmentation and the red-cell size run on a smaller copy (speed; a PBC nucleus is still ~30 px across).
SEG_SIZE = 128
# Below this many pixels per red cell at SEG_SIZE the granulometry is too coarse: the red cells are measured again
# on a copy of up to 512 px (field-like images only; a 360 px single-cell crop has ~25 px red cells at SEG_SIZE).
_SPAN_REMEASURE_PX = 24
BLACK_LEVEL = 20
# A colour region smaller than this share of the image has no colour of its own (the glass of an image filled by one
# cell is a few misread pixels); a nucleus of an Aria field crop covers only ~1% of it.
_MIN_REGION = {"glass": 0.03, "nucleus": 0.002, "other": 0.02}
CLIP_LEVEL = 250

COLOURS = ("glass_r", "glass_g", "nucleus_r", "nucleus_g", "other_r", "other_g")
MEASURES = ("aspect", "size", "sharpness", "brightness", "median", "clipped", "black", "cutout", "nucleus", "cell",
            "offset", "span", *COLOURS)
# The measures that say which training images an image is compared with: its colours, and whether it is a cell cut
# out onto black (C-NMC's colours overlap those of dark smear crops).
LOOK = ("cutout", *COLOURS)

# Share of the fitting images that may warn on each check (each compared with the others).
FIT_FALSE_ALARM = 0.01
MIN_CALIBRATION = 50  # fewer calibration images cannot place a 1% false-alarm margin


@dataclass(frozen=True)
class QualityWarning:
    """One named problem with an image.

    Attributes:
        code: one of :data:`QUALITY_CODES`.
        message: one plain sentence for a lab user, with the measured value and the expected range.
    """

    code: str
    message: str

    def __post_init__(self) -> None:
        if self.code not in QUALITY_CODES:
            raise ValueError(f"unknown quality code {self.code!r}; known: {list(QUALITY_CODES)}")

    def to_dict(self) -> dict[str, str]:
        return {"code": self.code, "message": self.message}


@dataclass(frozen=True)
class _Side:
    """One side of one measure.

    Attributes:
        measure: key of :func:`image_stats`.
        side: ``low`` or ``high``.
        log: compared in log10 units (sizes and shares that vary by factors).
        floor: least width of the neighbours' band, in the compared units (a band of identical values has none).
        gap: the band is widened by this much on its side first, in the compared units: differences smaller
            than this do not matter to a user whatever the training images did (an exposure 15% off).
    """

    measure: str
    side: str
    log: bool
    floor: float
    gap: float = 0.0


@dataclass(frozen=True)
class _Check:
    """A test that raises one warning: how far the image lies beyond its neighbours' band on each of ``sides``
    (in band widths), combined by ``max`` (any side on its own) or ``mean`` (evidence that adds up)."""

    name: str
    code: str
    sides: tuple[_Side, ...]
    combine: str


CHECKS = (
    _Check("blur", "out_of_focus", (_Side("sharpness", "low", False, 0.15, 0.1),), "max"),
    _Check("dark", "underexposed", (_Side("brightness", "low", True, 0.05, 0.07),), "max"),
    _Check("bright", "overexposed", (_Side("brightness", "high", True, 0.05, 0.07),
                                     _Side("median", "high", True, 0.05, 0.07),
                                     _Side("clipped", "high", False, 0.03, 0.02)), "max"),
    # A magnification that does not fit moves the cell's share of the image, the red cells' size and (for a cell
    # cut out onto black) the black surround together.
    _Check("large", "cell_size", (_Side("nucleus", "high", True, 0.15, 0.05), _Side("cell", "high", True, 0.15, 0.05),
                                  _Side("span", "low", True, 0.06, 0.03), _Side("black", "low", False, 0.05, 0.05)),
           "mean"),
    _Check("small", "cell_size", (_Side("nucleus", "low", True, 0.15, 0.05), _Side("cell", "low", True, 0.15, 0.05),
                                  _Side("span", "high", True, 0.06, 0.03)), "mean"),
)


# ----------------------------------------------------------------------------------------------------------------
# Measures of one image
# ----------------------------------------------------------------------------------------------------------------
def _resize_long(rgb: np.ndarray, size: int) -> np.ndarray:
    """Resize so the longer side is ``size`` (area interpolation to shrink, linear to enlarge)."""
    h, w = rgb.shape[:2]
    s = size / max(h, w)
    if abs(s - 1) < 1e-9:
        return rgb
    interp = cv2.INTER_AREA if s < 1 else cv2.INTER_LINEAR
    return cv2.resize(rgb, (max(1, round(w * s)), max(1, round(h * s))), interpolation=interp)


def _grey_levels(grey: np.ndarray, quantiles: tuple[float, ...]) -> list[float]:
    cum = np.cumsum(np.bincount(grey.ravel(), minlength=256))
    return [float(np.searchsorted(cum, q * cum[-1])) for q in quantiles]


def _sharpness(grey: np.ndarray, p1: float, p99: float) -> float:
    """log10 of the Laplacian's variance over the squared grey range: falls with blur, not with dimming."""
    lap = cv2.Laplacian(grey, cv2.CV_32F)
    contrast = max(p99 - p1, 8.0)
    return float(np.log10(float(lap.var()) / contrast**2 + 1e-6))


def _chroma(rgb: np.ndarray, mask: np.ndarray, least: float) -> tuple[float, float]:
    """Chromaticity (r, g) of the mean colour under ``mask``; NaN when the region is too small to say (no glass in
    an image filled by one cell)."""
    if np.count_nonzero(mask) < max(least * mask.size, 8):
        return float("nan"), float("nan")
    m = rgb[mask].astype(np.float64).mean(axis=0)
    s = max(float(m.sum()), 1e-6)
    return float(m[0] / s), float(m[1] / s)


def _span(rgb: np.ndarray, small: np.ndarray) -> float:
    """The image's size in red-cell diameters (NaN when no red-cell size can be measured)."""
    try:
        d = estimate_rbc_diameter(small)
        if d < _SPAN_REMEASURE_PX and max(rgb.shape[:2]) > max(small.shape[:2]):
            larger = _resize_long(rgb, min(512, max(rgb.shape[:2])))
            d = estimate_rbc_diameter(larger) * max(small.shape[:2]) / max(larger.shape[:2])
    except ValueError:
        return float("nan")
    return float(math.sqrt(small.shape[0] * small.shape[1]) / d) if d > 0 else float("nan")


def image_stats(rgb: np.ndarray) -> dict[str, float]:
    """The quality measures of one image (see the module docstring for what each means).

    Args:
        rgb: ``(H, W, 3)`` uint8 RGB image, as :func:`leukoscope.data.images.read_image` returns it.

    Returns:
        Measure name -> value, with the keys of :data:`MEASURES`.
    """
    check_rgb(rgb)
    h, w = rgb.shape[:2]
    big = _resize_long(rgb, WORK_SIZE)
    grey = cv2.cvtColor(big, cv2.COLOR_RGB2GRAY)
    p1, p99 = _grey_levels(grey, (0.01, 0.99))
    lo = cv2.min(cv2.min(big[..., 0], big[..., 1]), big[..., 2])
    hi = cv2.max(cv2.max(big[..., 0], big[..., 1]), big[..., 2])
    specimen = hi >= BLACK_LEVEL
    # The median of the specimen, not of a cut-out cell's black surround (which a zoom would change).
    (p50,) = _grey_levels(grey[specimen] if np.count_nonzero(specimen) > 0.01 * grey.size else grey, (0.5,))
    out: dict[str, float] = {
        "aspect": max(h, w) / min(h, w),
        "sharpness": _sharpness(grey, p1, p99),
        "brightness": p99,
        "median": p50,
        "clipped": float(np.count_nonzero(lo >= CLIP_LEVEL)) / lo.size,
        "black": float(np.count_nonzero(hi < BLACK_LEVEL)) / hi.size,
        "size": math.sqrt(h * w),
        "cutout": dark_border_share(rgb),
    }
    small = _resize_long(big, SEG_SIZE)
    seg = segment_cell(small)
    sh, sw = seg.nucleus.shape
    out["nucleus"] = float(np.count_nonzero(seg.nucleus)) / seg.nucleus.size
    out["cell"] = float(np.count_nonzero(seg.cell)) / seg.cell.size
    ys, xs = np.nonzero(seg.nucleus)
    out["offset"] = float(np.hypot(ys.mean() / sh - 0.5, xs.mean() / sw - 0.5)) if len(ys) else 0.0
    out["span"] = _span(rgb, small)
    notblack = cv2.max(cv2.max(small[..., 0], small[..., 1]), small[..., 2]) >= BLACK_LEVEL
    for key, mask in (("glass", ~seg.foreground & notblack), ("nucleus", seg.nucleus),
                      ("other", seg.foreground & ~seg.nucleus & notblack)):
        out[f"{key}_r"], out[f"{key}_g"] = _chroma(small, mask, _MIN_REGION[key])
    return {k: out[k] for k in MEASURES}


# ----------------------------------------------------------------------------------------------------------------
# The reference of a single-cell model
# ----------------------------------------------------------------------------------------------------------------
def _pct(x: float) -> str:
    """A share as a percentage with two significant digits (``0.4%``, ``12%``)."""
    return f"{100 * x:.2g}%" if x < 0.1 else f"{100 * x:.0f}%"


def _look_distance(looks: np.ndarray, look: np.ndarray) -> np.ndarray:
    """Euclidean distance of ``look`` to each row of ``looks`` over the colours both have (a colour region too small
    to measure is NaN), scaled up to all dimensions; infinite when they share none."""
    diff = looks - look
    ok = np.isfinite(diff)
    n = ok.sum(axis=1)
    sq = np.where(ok, diff, 0.0) ** 2
    return np.where(n > 0, np.sqrt(sq.sum(axis=1) * looks.shape[1] / np.maximum(n, 1)), np.inf)


@dataclass
class QualityReference:
    """What the training images of a cell model looked like; saved as quality.json in the model directory.

    Build it with :meth:`fit` from the training images, then :meth:`check` new images against it.

    Attributes:
        stats: one row of :data:`MEASURES` per fitting image (NaN where a measure could not be taken).
        margins: per check of :data:`CHECKS`, how many band widths beyond the neighbours' band an image may lie.
        stain_threshold: the colour distance beyond which an image's stain is unlike every training image.
        max_aspect: the 99th percentile of the training images' aspect (longer over shorter side).
        max_size: the largest training image, in pixels (square root of its area).
        neighbours: how many training images of the closest look give the band of each measure (fitting sets about
            a third of one source's images: ``n_images // 15``, within 10 to 50).
        band: the band is the neighbours' ``band`` to ``1 - band`` quantile.
        stain_neighbours: the colour distance is the mean distance to this many nearest training images.
        whole_field_span: an image spanning this many times the neighbours' band of red-cell diameters is a field.
        safety: each check's margin is this times the margin at which ``FIT_FALSE_ALARM`` of the fitting images
            (each compared with the others) would warn. Images of new patients are farther from the fitting images
            than those are from each other, hence more than 1.
        stain_safety: the same for the stain threshold.
        min_margin: the least margin of every check.
    """

    stats: np.ndarray
    margins: dict[str, float]
    stain_threshold: float
    max_aspect: float
    max_size: float
    neighbours: int = 50
    band: float = 0.05
    stain_neighbours: int = 5
    whole_field_span: float = 2.5
    safety: float = 1.5
    stain_safety: float = 1.0
    min_margin: float = 0.1
    _look_mean: np.ndarray = field(init=False, repr=False)
    _look_scale: np.ndarray = field(init=False, repr=False)
    _looks: np.ndarray = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self.stats = np.asarray(self.stats, dtype=np.float64)
        if self.stats.ndim != 2 or self.stats.shape[1] != len(MEASURES) or len(self.stats) < 2:
            raise ValueError(f"a quality reference needs at least 2 rows of {len(MEASURES)} measures, "
                             f"got an array of shape {self.stats.shape}")
        unknown = sorted(set(self.margins) - {c.name for c in CHECKS})
        if unknown:
            raise ValueError(f"margins for unknown checks {unknown}; checks: {[c.name for c in CHECKS]}")
        look = self.stats[:, [MEASURES.index(k) for k in LOOK]]
        with np.errstate(all="ignore"):
            mean, std = np.nanmean(look, axis=0), np.nanstd(look, axis=0)
        self._look_mean = np.nan_to_num(mean, nan=1 / 3)
        # A colour that hardly varies in training still counts, but not infinitely.
        self._look_scale = np.maximum(np.nan_to_num(std, nan=0.01), 0.01)
        self._looks = (look - self._look_mean) / self._look_scale

    # -- fitting ------------------------------------------------------------------------------------------------
    @classmethod
    def fit(cls, images: Iterable[np.ndarray], progress: bool = False,
            calibration: Iterable[np.ndarray] | None = None) -> QualityReference:
        """Measure the training images of a model and set the margins so that few real images would warn.

        Args:
            images: the model's training images (``(H, W, 3)`` uint8 RGB); a few hundred covering every source are
                plenty (e.g. up to 150 per source, drawn at random).
            progress: show a progress bar on stderr.
            calibration: images of other patients / fields / slides than ``images`` (the model's validation
                images). When given, each check's margin is the one at which ``FIT_FALSE_ALARM`` of them warn.
                Without them the fitting images are compared with each other and the margins multiplied by
                ``safety``, which guesses how much farther new patients lie than a patient's own other images.
        """
        from tqdm import tqdm

        def measure(imgs: Iterable[np.ndarray], desc: str) -> list[dict[str, float]]:
            return [image_stats(rgb) for rgb in tqdm(imgs, desc=desc, unit="img", disable=not progress, leave=False)]

        rows = measure(images, "quality reference")
        calib = measure(calibration, "quality calibration") if calibration is not None else None
        return cls.from_stats(rows, calibration=calib)

    @classmethod
    def from_stats(cls, rows: list[dict[str, float]], calibration: list[dict[str, float]] | None = None,
                   **settings: Any) -> QualityReference:
        """Fit from measures already taken with :func:`image_stats`.

        Args:
            rows: one :func:`image_stats` result per training image (at least 10).
            calibration: measures of images of other patients (see :meth:`fit`); at least 50 when given.
            settings: overrides of the settings (``neighbours``, ``band``, ... ``min_margin``).
        """
        if len(rows) < 10:
            raise ValueError(f"a quality reference needs at least 10 training images, got {len(rows)}")
        known = {"neighbours", "band", "stain_neighbours", "whole_field_span", "safety", "stain_safety", "min_margin"}
        unknown = sorted(set(settings) - known)
        if unknown:
            raise ValueError(f"unknown quality reference setting(s) {unknown}; known: {sorted(known)}")
        table = np.array([[r[k] for k in MEASURES] for r in rows], dtype=np.float64)
        settings.setdefault("neighbours", int(min(50, max(10, len(rows) // 15))))
        ref = cls(table, margins={}, stain_threshold=np.inf,
                  max_aspect=float(np.quantile(table[:, MEASURES.index("aspect")], 0.99)),
                  max_size=float(np.max(table[:, MEASURES.index("size")])), **settings)
        if calibration is None:
            ref._calibrate()
        else:
            if len(calibration) < MIN_CALIBRATION:
                raise ValueError(f"calibration needs at least {MIN_CALIBRATION} images of other patients, got "
                                 f"{len(calibration)}")
            ref._calibrate(np.array([[r[k] for k in MEASURES] for r in calibration], dtype=np.float64))
        return ref

    def _calibrate(self, held_out: np.ndarray | None = None) -> None:
        """Margins and the stain threshold: from ``held_out`` rows compared with the fitting images, or else from the
        fitting images, each compared with all the others, times the safety factors."""
        n = len(self.stats)
        if held_out is None:
            queries, scale, stain_scale = self.stats, self.safety, self.stain_safety
            looks = self._looks
        else:
            queries, scale, stain_scale = held_out, 1.0, 1.0
            looks = (held_out[:, [MEASURES.index(k) for k in LOOK]] - self._look_mean) / self._look_scale
        dist = np.stack([_look_distance(self._looks, look) for look in looks])
        if held_out is None:
            np.fill_diagonal(dist, np.inf)
        order = np.argsort(dist, axis=1, kind="stable")
        ks = min(self.stain_neighbours, n - 1)
        stain = np.take_along_axis(dist, order[:, :ks], axis=1).mean(axis=1)
        stain = stain[np.isfinite(stain)]
        self.stain_threshold = float(np.quantile(stain, 1 - FIT_FALSE_ALARM) * stain_scale)
        k = min(self.neighbours, n - 1)
        for c in CHECKS:
            excess = np.array([self._check_excess(c, q, order[i, :k])[0] for i, q in enumerate(queries)])
            excess = excess[np.isfinite(excess)]
            q = float(np.quantile(excess, 1 - FIT_FALSE_ALARM)) if len(excess) else 0.0
            self.margins[c.name] = max(q * scale, self.min_margin)

    # -- comparing ----------------------------------------------------------------------------------------------
    def _side_excess(self, sd: _Side, row: np.ndarray, idx: np.ndarray) -> tuple[float, float, float]:
        """(band widths beyond the band, the band's low end, its high end) of ``row`` on one side, against the
        training rows ``idx``; the band ends in the measure's own units. NaN when it cannot be said."""
        j = MEASURES.index(sd.measure)
        vals = self.stats[idx, j]
        vals = vals[np.isfinite(vals)]
        x = float(row[j])
        if len(vals) < 3 or not np.isfinite(x):
            return float("nan"), float("nan"), float("nan")
        if sd.log:
            vals, x = np.log10(np.maximum(vals, 1e-4)), math.log10(max(x, 1e-4))
        lo, hi = float(np.quantile(vals, self.band)), float(np.quantile(vals, 1 - self.band))
        if hi - lo < 1e-9 and abs(x - lo) < 1e-9:
            # Every neighbour and the image share one value (no black surround anywhere): nothing to say.
            return float("nan"), float("nan"), float("nan")
        width = max(hi - lo, sd.floor)
        e = (lo - sd.gap - x) / width if sd.side == "low" else (x - hi - sd.gap) / width
        if sd.log:
            lo, hi = 10**lo, 10**hi
        return e, lo, hi

    def _check_excess(self, c: _Check, row: np.ndarray, idx: np.ndarray) -> tuple[float, _Side | None, float, float]:
        """(combined excess, the side that lies farthest out, that side's band) of one check."""
        parts = [(self._side_excess(sd, row, idx), sd) for sd in c.sides]
        parts = [(e, sd) for e, sd in parts if np.isfinite(e[0])]
        if not parts:
            return float("nan"), None, float("nan"), float("nan")
        (e, lo, hi), sd = max(parts, key=lambda p: p[0][0])
        total = e if c.combine == "max" else float(np.mean([p[0][0] for p in parts]))
        return total, sd, lo, hi

    def _neighbours(self, row: np.ndarray) -> tuple[np.ndarray, float]:
        """The training images of the closest look, and the mean colour distance to the ``stain_neighbours``
        closest."""
        look = (row[[MEASURES.index(k) for k in LOOK]] - self._look_mean) / self._look_scale
        d = _look_distance(self._looks, look)
        order = np.argsort(d, kind="stable")
        return order[: self.neighbours], float(d[order[: self.stain_neighbours]].mean())

    def check(self, rgb: np.ndarray) -> list[QualityWarning]:
        """Warnings for an image given to a single-cell model (empty when it looks like the training images).

        Args:
            rgb: ``(H, W, 3)`` uint8 RGB image.

        Returns:
            At most one warning per code, in the order of :data:`QUALITY_CODES`. An image too small to measure
            (under ``MIN_SIDE`` pixels on a side) gets only a ``cell_size`` warning.
        """
        if isinstance(rgb, np.ndarray) and rgb.ndim == 3 and min(rgb.shape[:2]) < MIN_SIDE:
            h, w = rgb.shape[:2]
            return [QualityWarning("cell_size", f"the image is {w}x{h} pixels: too small to hold a white cell at "
                                                "this model's magnification")]
        return self.check_stats(image_stats(rgb))

    def check_stats(self, stats: dict[str, float]) -> list[QualityWarning]:
        """Like :meth:`check`, from measures already taken with :func:`image_stats`."""
        missing = [k for k in MEASURES if k not in stats]
        if missing:
            raise ValueError(f"stats lack the measure(s) {missing}; take them with image_stats()")
        row = np.array([stats[k] for k in MEASURES], dtype=np.float64)
        # Even an image of an unknown stain is compared with the closest training images: a zoomed-in cell loses
        # its glass and so its look, but its neighbours still come from the right source.
        idx, colour = self._neighbours(row)
        fired: dict[str, tuple[float, _Check, _Side, float, float]] = {}
        for c in CHECKS:
            e, sd, lo, hi = self._check_excess(c, row, idx)
            if sd is not None and e > self.margins[c.name]:
                over = e - self.margins[c.name]
                if c.code not in fired or over > fired[c.code][0]:
                    fired[c.code] = (over, c, sd, lo, hi)
        field_msg = self._whole_field(stats, idx, fired)
        if field_msg:
            fired.pop("cell_size", None)  # a field's cells are small; the field message says why
        found = {code: QualityWarning(code, _message(sd, stats[sd.measure], lo, hi))
                 for code, (_, _, sd, lo, hi) in fired.items()}
        if colour > self.stain_threshold:
            found["stain"] = QualityWarning("stain", (
                f"The colours of the image are unlike every stain the model was trained on: its colour distance to "
                f"the closest training images is {colour:.1f}, where up to {self.stain_threshold:.1f} is usual."))
        if field_msg:
            found["whole_field"] = QualityWarning("whole_field", field_msg)
        return [found[c] for c in QUALITY_CODES if c in found]

    def _whole_field(self, stats: dict[str, float], idx: np.ndarray, fired: dict[str, tuple]) -> str | None:
        """The whole_field message, or None. A field is a camera frame larger than any training crop, an image
        spanning far more red cells than the training images of its look, or one spanning more red cells than
        them that is also not square. (The number of white cells says little: Aria's training crops hold several.)"""
        tail = "; crop single white cells first, or use the field scanner (leukoscope scan)."
        shape = stats["aspect"] > max(self.max_aspect * 1.05, 1.15)
        if shape and stats["size"] > self.max_size * 1.2:
            return (f"This looks like a whole smear field, not an image of one white cell: it is a "
                    f"{stats['aspect']:.2f}:1 frame of {stats['size']:.0f} px (square root of its area), where the "
                    f"model's training images were square-ish crops of up to {self.max_size:.0f} px" + tail)
        span = stats["span"]
        vals = self.stats[idx, MEASURES.index("span")]
        vals = vals[np.isfinite(vals)]
        if not np.isfinite(span) or len(vals) < 3:
            return None
        top = float(np.quantile(vals, 1 - self.band))
        lead = (f"This looks like a whole smear field, not an image of one white cell: it spans about {span:.0f} "
                f"red-cell diameters, where the model's training images of similar staining spanned up to {top:.1f}")
        if span > self.whole_field_span * top:
            return lead + tail
        if not ("cell_size" in fired and fired["cell_size"][1].name == "small"):
            return None
        if shape:
            return lead + f", and it is a {stats['aspect']:.2f}:1 frame, not a square crop" + tail
        return None

    # -- saving -------------------------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict (NaN measures as null)."""
        rows = [[None if not np.isfinite(v) else float(f"{v:.5g}") for v in r] for r in self.stats]
        return {
            "format": "leukoscope-quality-reference", "version": 1, "n_images": len(self.stats),
            "settings": {"neighbours": self.neighbours, "band": self.band, "stain_neighbours": self.stain_neighbours,
                         "whole_field_span": self.whole_field_span, "safety": self.safety,
                         "stain_safety": self.stain_safety, "min_margin": self.min_margin},
            "margins": {k: round(v, 4) for k, v in self.margins.items()},
            "stain_threshold": round(self.stain_threshold, 4), "max_aspect": round(self.max_aspect, 4),
            "max_size": round(self.max_size, 2), "measures": list(MEASURES), "stats": rows,
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> QualityReference:
        """Rebuild from :meth:`to_dict`'s output; a dict of another kind or version is refused, saying what it has."""
        if not isinstance(d, dict) or d.get("format") != "leukoscope-quality-reference":
            what = f"format {d.get('format')!r}, keys {sorted(d)}" if isinstance(d, dict) else type(d).__name__
            raise ValueError(f"not a leukoscope quality reference ({what})")
        if d.get("version") != 1:
            raise ValueError(f"quality reference version {d.get('version')!r} is not supported (expected 1)")
        if list(d["measures"]) != list(MEASURES):
            raise ValueError(f"quality reference measures {d['measures']} differ from this version's {list(MEASURES)}")
        missing = sorted({c.name for c in CHECKS} - set(d["margins"]))
        if missing:
            raise ValueError(f"quality reference has no margins for the check(s) {missing}")
        stats = np.array([[np.nan if v is None else v for v in r] for r in d["stats"]], dtype=np.float64)
        return cls(stats, margins={k: float(v) for k, v in d["margins"].items()},
                   stain_threshold=float(d["stain_threshold"]), max_aspect=float(d["max_aspect"]),
                   max_size=float(d["max_size"]), **d["settings"])

    def save(self, path: str | Path) -> None:
        """Write to ``path`` (conventionally ``quality.json`` in the model directory)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.to_dict(), separators=(",", ":")))

    @classmethod
    def load(cls, path: str | Path) -> QualityReference:
        """Read a reference written by :meth:`save`."""
        path = Path(path)
        try:
            doc = json.loads(path.read_text())
        except json.JSONDecodeError as exc:
            raise ValueError(f"{path} is not valid JSON: {exc}") from exc
        return cls.from_dict(doc)


def _message(sd: _Side, value: float, lo: float, hi: float) -> str:
    """The sentence for the side of a check that lies farthest out; ``lo``/``hi``: the band of the training images
    of similar staining (their 5th to 95th percentile, by default) in the measure's units."""
    ref = "the model's training images of similar staining"
    key = f"{sd.measure}:{sd.side}"
    if sd.measure == "sharpness":
        return (f"The image looks out of focus: its sharpness is {value:.2f}, where {ref} measured {lo:.2f} to "
                f"{hi:.2f} (log10 of the Laplacian's variance over the squared contrast).")
    if key == "brightness:low":
        return (f"The image is too dark: its brightest parts reach grey level {value:.0f} of 255, where {ref} "
                f"reached {lo:.0f} to {hi:.0f}.")
    if key == "brightness:high":
        return (f"The image is brighter than the model was trained on: its brightest parts reach grey level "
                f"{value:.0f} of 255, where {ref} reached {lo:.0f} to {hi:.0f}.")
    if sd.measure == "median":
        return (f"The image is overexposed: its median grey level is {value:.0f} of 255, where {ref} had {lo:.0f} to "
                f"{hi:.0f}.")
    if sd.measure == "clipped":
        return (f"The image is overexposed: {_pct(value)} of its pixels are burnt-out white, where {ref} had "
                f"{_pct(lo)} to {_pct(hi)}.")
    if sd.measure in ("nucleus", "cell"):
        what = "its nucleus" if sd.measure == "nucleus" else "the white cell"
        size = "larger" if sd.side == "high" else "smaller"
        return (f"The white cell is {size} than the model expects: {what} covers {_pct(value)} of the image, where "
                f"{ref} had {_pct(lo)} to {_pct(hi)}; the magnification or the crop may not match.")
    if sd.measure == "black":
        return (f"The cell fills more of the image than the model expects: the black surround covers {_pct(value)} "
                f"of it, where {ref} had {_pct(lo)} to {_pct(hi)}; the magnification or the crop may not match.")
    more = "more" if sd.side == "low" else "less"
    return (f"The image is {more} magnified than the model expects: it spans {value:.1f} red-cell diameters, where "
            f"{ref} spanned {lo:.1f} to {hi:.1f}.")


# ----------------------------------------------------------------------------------------------------------------
# The field scanner's check
# ----------------------------------------------------------------------------------------------------------------
# Fixed bounds for whole fields, which come without a reference. Measured on 40 BCCD and 30 ALL-IDB1 fields
# (benchmarks/quality_checks.py has the evaluation): sharpness -2.54 to -1.46 (blurred by 0.06 red-cell diameters:
# -3.41 to -2.42); glass (99th percentile grey) 120 to 216; no clipped pixels.
FIELD_RBC_PX = 24  # sharpness is measured with a red cell this many pixels across
FIELD_MIN_SHARPNESS = -2.75
FIELD_MIN_GLASS = 110
FIELD_MAX_CLIPPED = 0.4  # Aria's field crops have up to ~35% burnt-out glass
FIELD_MAX_MEDIAN = 250
# A single-cell crop: at most this many red-cell diameters across its shorter side (PBC / DeepAPL crops: up to ~6;
# BCCD's high-magnification fields: 4.4-6.3 but 4:3 frames with the cell anywhere), nearly square, with at most two
# white cells, one of them near the centre.
SINGLE_CELL_SPAN = 6.5
SINGLE_CELL_ASPECT = 1.2
SINGLE_CELL_OFFSET = 0.15


def check_field(rgb: np.ndarray, detection: Detection | None = None) -> list[QualityWarning]:
    """Warnings for an image given to the whole-field scanner: ``single_cell`` when it is one cell's crop, and
    ``out_of_focus`` / ``underexposed`` / ``overexposed`` by the fixed bounds above (no reference needed).

    Args:
        rgb: ``(H, W, 3)`` uint8 RGB image.
        detection: the scanner's :func:`detect_cells` result for ``rgb``, when it has one (saves finding the cells
            again).

    Returns:
        At most one warning per code, in the order of :data:`QUALITY_CODES`.
    """
    check_rgb(rgb, "field")
    h, w = rgb.shape[:2]
    found: dict[str, QualityWarning] = {}
    cutout = dark_border_share(rgb) > 0.5
    if detection is None and not cutout:
        try:
            detection = detect_cells(rgb)
        except ValueError:
            detection = None  # blank or without red cells: only the exposure can be judged
    scale = 1.0
    if detection is not None and detection.rbc_diameter > 0:
        scale = min(1.0, FIELD_RBC_PX / detection.rbc_diameter)
    else:
        scale = min(1.0, 1024 / max(h, w))
    work = rgb if scale >= 1 else cv2.resize(rgb, (max(1, round(w * scale)), max(1, round(h * scale))),
                                             interpolation=cv2.INTER_AREA)
    grey = cv2.cvtColor(work, cv2.COLOR_RGB2GRAY)
    p1, p50, p99 = _grey_levels(grey, (0.01, 0.5, 0.99))
    lo = cv2.min(cv2.min(work[..., 0], work[..., 1]), work[..., 2])
    clipped = float(np.count_nonzero(lo >= CLIP_LEVEL)) / lo.size

    if detection is not None and not cutout:
        sharp = _sharpness(grey, p1, p99)
        if sharp < FIELD_MIN_SHARPNESS:
            found["out_of_focus"] = QualityWarning("out_of_focus", (
                f"The field looks out of focus: its sharpness at a red-cell size of {FIELD_RBC_PX} px is {sharp:.2f}, "
                f"where focused fields measure {FIELD_MIN_SHARPNESS:.2f} or more."))
    if clipped > FIELD_MAX_CLIPPED or p50 >= FIELD_MAX_MEDIAN:
        found["overexposed"] = QualityWarning("overexposed", (
            f"The field is overexposed: {_pct(clipped)} of its pixels are burnt-out white and its median grey level "
            f"is {p50:.0f} of 255, where a well-exposed field has at most {_pct(FIELD_MAX_CLIPPED)} burnt out and a "
            f"median below {FIELD_MAX_MEDIAN}."))
    if p99 < FIELD_MIN_GLASS and not cutout:
        found["underexposed"] = QualityWarning("underexposed", (
            f"The field is too dark: its brightest parts (the glass between cells) reach grey level {p99:.0f} of 255, "
            f"where a well-exposed field reaches {FIELD_MIN_GLASS} or more."))

    single = _single_cell_reason(rgb, detection, cutout)
    if single:
        found["single_cell"] = QualityWarning("single_cell", (
            f"This looks like an image of one white cell, not a smear field: {single}; use the single-cell model "
            f"(leukoscope predict) instead of the field scanner."))
    return [found[c] for c in QUALITY_CODES if c in found]


def _single_cell_reason(rgb: np.ndarray, detection: Detection | None, cutout: bool) -> str | None:
    if cutout:
        return "it is a cell cut out onto a black background"
    if detection is None or detection.rbc_diameter <= 0:
        return None
    h, w = rgb.shape[:2]
    span = min(h, w) / detection.rbc_diameter
    aspect = max(h, w) / min(h, w)
    cells = detection.cells
    if span >= SINGLE_CELL_SPAN or aspect > SINGLE_CELL_ASPECT or len(cells) > 2:
        return None
    offsets = [math.hypot(c.x / w - 0.5, c.y / h - 0.5) for c in cells]
    if cells and min(offsets) > SINGLE_CELL_OFFSET:
        return None
    where = f"{len(cells)} white cell{'s' if len(cells) != 1 else ''}" + (" near its centre" if cells else "")
    return (f"it spans only {span:.1f} red-cell diameters across (fields span {SINGLE_CELL_SPAN:g} or more) and shows "
            f"{where}")
