"""Whole smear fields: find every white cell, classify it, mark the abnormal ones.

    from leukoscope.scan import scan_field, write_outputs
    result = scan_field(rgb, model)             # model: anything with .classes, .input_size, .predict_arrays
    write_outputs(result, rgb, "out/", "Im001_1")  # Im001_1.json, Im001_1.overlay.png, Im001_1.geojson

Pipeline: the learned detector (:mod:`leukoscope.preprocess.wbc_detector`, default) or the classical segmentation
(:func:`leukoscope.preprocess.cells.detect_cells`, ``ScanConfig.detector="classical"``) finds the white cells; each is
cut out as a square crop of :attr:`ScanConfig.crop_rbc_diameters` red-cell diameters centred on the cell (so a crop
looks like an ALL-IDB2 training image whatever the field's magnification: 257 px around a cell of a 1712 x 1368
ALL-IDB1 field, where a red cell measures ~70 px, is ~3.6 red-cell diameters), resized to the model's input size and
classified. A cell is
*abnormal* when the probability of the model's non-normal classes reaches :attr:`ScanConfig.abnormal_threshold`
(default: the model's stored operating point, see :func:`abnormal_threshold`).
Field totals come only from the cells found, never from the image size or magnification.
"""

from __future__ import annotations

import json
import sys
import uuid
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Protocol

import cv2
import numpy as np

from leukoscope.data.datasets import NORMAL_CLASS_NAMES
from leukoscope.preprocess.cells import Cell, DetectConfig, Detection, detect_cells
from leukoscope.preprocess.segment import check_rgb

# A class named in NORMAL_CLASS_NAMES is "not abnormal" (a cell that is no blast / from a healthy person); any other
# class of the model counts as abnormal unless ScanConfig.normal_classes says otherwise.

# Box colours (RGB) of the overlay and of QuPath classifications.
NORMAL_COLOUR = (40, 170, 60)
ABNORMAL_COLOUR = (220, 30, 30)
PARTIAL_COLOUR = (150, 150, 150)  # cells cut by the field edge: shown, not counted
_OTHER_COLOURS = ((30, 110, 230), (240, 150, 20), (150, 60, 200), (0, 170, 170), (120, 120, 120))


class Classifier(Protocol):
    """What :func:`scan_field` needs from a model (``leukoscope.models.load_model`` returns one)."""

    classes: Sequence[str]
    input_size: int

    def predict_arrays(self, images: list[np.ndarray]) -> np.ndarray: ...


DETECTORS = ("learned", "classical")
DEFAULT_DETECTOR = "learned"


@dataclass(frozen=True)
class ScanConfig:
    """Parameters of :func:`scan_field`.

    Attributes:
        detector: ``learned`` (the shipped white-cell detector, :mod:`leukoscope.preprocess.wbc_detector`; it
            separates touching cells) or ``classical`` (nucleus segmentation and watershed,
            :func:`leukoscope.preprocess.cells.detect_cells`, tuned by ``detect``), or the path of a detector
            directory.
        detect: white-cell detection settings of the classical detector (``rbc_diameter`` applies to both).
        crop_rbc_diameters: side of the square crop handed to the classifier, in red-cell diameters.
        border: crops of cells near the field's edge: ``clip``, ``shift`` or ``reflect`` (see :func:`crop_cell`).
        abnormal_threshold: a cell is abnormal when its summed probability of abnormal classes reaches this; None
            (default): the model's stored operating point for a two-class model, else 0.5 (:func:`abnormal_threshold`).
        normal_classes: the model's classes that are not abnormal; empty = those named in ``NORMAL_CLASS_NAMES``.
        partial_rbc_diameters: a cell touching the field's edge whose centroid lies closer to the edge than this many
            red-cell diameters is *partial* (most of it is outside the field): it is listed, classified and drawn
            (grey, dashed), but not counted and never flagged abnormal, as a manual differential skips cells cut by
            the edge. 0 counts every cell. See docs/SCAN.md for how 0.8 was chosen.
        gradcam: draw Grad-CAM on the abnormal cells of the overlay (needs a model with Grad-CAM support).
        max_gradcam: at most this many abnormal cells (the most confident) get a Grad-CAM.
        batch_size: crops per classifier call.
    """

    detector: str = DEFAULT_DETECTOR
    detect: DetectConfig = field(default_factory=DetectConfig)
    crop_rbc_diameters: float = 3.6
    border: str = "clip"
    abnormal_threshold: float | None = None
    normal_classes: tuple[str, ...] = ()
    partial_rbc_diameters: float = 0.8
    gradcam: bool = True
    max_gradcam: int = 25
    batch_size: int = 32

    def __post_init__(self) -> None:
        if self.abnormal_threshold is not None and not 0.0 <= self.abnormal_threshold <= 1.0:
            raise ValueError(f"abnormal_threshold must be in [0, 1], got {self.abnormal_threshold}")
        if self.border not in BORDER_MODES:
            raise ValueError(f"Unknown border mode {self.border!r}. Available: {list(BORDER_MODES)}")
        if self.crop_rbc_diameters <= 0:
            raise ValueError(f"crop_rbc_diameters must be positive, got {self.crop_rbc_diameters}")
        if self.detector not in DETECTORS and not Path(self.detector).expanduser().is_dir():
            raise ValueError(f"detector must be one of {list(DETECTORS)} or a detector directory, "
                             f"got {self.detector!r}")
        if self.partial_rbc_diameters < 0:
            raise ValueError(f"partial_rbc_diameters must be 0 or more, got {self.partial_rbc_diameters}")


@dataclass
class ScannedCell:
    """One white cell with its classification. Coordinates are pixels of the original field."""

    cell: Cell
    label: str
    confidence: float
    proba: dict[str, float]
    p_abnormal: float
    abnormal: bool
    crop_box: tuple[int, int, int, int]
    heatmap: np.ndarray | None = field(default=None, repr=False)
    partial: bool = False
    ood: bool | None = None  # unlike the model's training cells (None: the model has no detector)
    ood_score: float | None = None

    def to_dict(self) -> dict[str, Any]:
        c = self.cell
        d: dict[str, Any] = {
            "x": c.x, "y": c.y, "bbox": list(c.bbox), "area": c.area, "nucleus_area": c.nucleus_area,
            "label": self.label, "confidence": round(self.confidence, 4), "abnormal": self.abnormal,
            "p_abnormal": round(self.p_abnormal, 4),
        }
        d.update({f"p_{k}": round(v, 4) for k, v in self.proba.items()})
        d["crop_box"] = list(self.crop_box)
        d["gradcam"] = self.heatmap is not None
        d["partial"] = self.partial
        d["ood"] = self.ood
        d["ood_score"] = None if self.ood_score is None else round(self.ood_score, 4)
        return d


@dataclass
class FieldResult:
    """Everything :func:`scan_field` found in one field."""

    cells: list[ScannedCell]
    classes: list[str]
    abnormal_classes: list[str]
    rbc_diameter: float
    image_size: tuple[int, int]
    smudges: list[Cell]
    config: ScanConfig
    model_name: str = ""
    gradcam_note: str = ""
    warnings: list[tuple[str, str]] = field(default_factory=list)  # the field's image-quality warnings
    ood_checked: bool = False  # the model had an out-of-distribution detector
    work_scale: float | None = None  # detector's working pixels per field pixel (one red cell = work_rbc_px)
    threshold: float = 0.5  # the abnormal threshold used (ScanConfig's, or the model's operating point)

    @property
    def counted(self) -> list[ScannedCell]:
        """The cells that count: every cell but the partial ones cut by the field's edge."""
        return [c for c in self.cells if not c.partial]

    @property
    def n_white_cells(self) -> int:
        return len(self.counted)

    @property
    def n_partial(self) -> int:
        return len(self.cells) - self.n_white_cells

    @property
    def n_abnormal(self) -> int:
        return sum(c.abnormal for c in self.cells)

    @property
    def n_ood(self) -> int | None:
        """Counted cells flagged as unlike the model's training cells (None when the model has no detector)."""
        return sum(bool(c.ood) for c in self.counted) if self.ood_checked else None

    @property
    def abnormal_share(self) -> float | None:
        return self.n_abnormal / self.n_white_cells if self.n_white_cells else None

    def abnormal_count_interval(self, level: float = 0.95) -> tuple[int, int]:
        """Interval of the number of abnormal cells given each counted cell's probability of being abnormal
        (Poisson-binomial; the uncertainty of the classification, with the detector's cells taken as found)."""
        return poisson_binomial_interval([c.p_abnormal for c in self.counted], level)

    def abnormal_share_interval(self, level: float = 0.95) -> tuple[float, float] | None:
        """Wilson interval of the abnormal share of white cells (the sampling uncertainty of a differential count
        of ``n_white_cells`` cells)."""
        return wilson_interval(self.n_abnormal, self.n_white_cells, level) if self.n_white_cells else None

    def to_dict(self, source: str = "") -> dict[str, Any]:
        w, h = self.image_size
        return {
            "source": source,
            "image_width": w,
            "image_height": h,
            "model": self.model_name,
            "classes": self.classes,
            "abnormal_classes": self.abnormal_classes,
            "abnormal_threshold": self.threshold,
            "rbc_diameter_px": round(self.rbc_diameter, 2),
            "white_cells": self.n_white_cells,
            "abnormal_cells": self.n_abnormal,
            "abnormal_share": None if self.abnormal_share is None else round(self.abnormal_share, 4),
            "abnormal_cells_ci95": list(self.abnormal_count_interval()),
            "abnormal_share_ci95": (None if self.abnormal_share_interval() is None
                                    else [round(v, 4) for v in self.abnormal_share_interval()]),
            "label_counts": {k: sum(c.label == k for c in self.counted) for k in self.classes},
            "partial_cells": self.n_partial,
            "smudge_cells": len(self.smudges),
            "ood_cells": self.n_ood,
            "warnings": [{"code": c, "message": m} for c, m in self.warnings],
            "gradcam": self.gradcam_note,
            "cells": [c.to_dict() for c in self.cells],
            "detection": asdict(self.config.detect) | {"detector": self.config.detector,
                                                        "work_scale": (None if self.work_scale is None
                                                                       else round(self.work_scale, 5)),
                                                        "crop_rbc_diameters": self.config.crop_rbc_diameters,
                                                        "partial_rbc_diameters": self.config.partial_rbc_diameters},
        }


def abnormal_threshold(model: Any, classes: Sequence[str], abnormal: Sequence[str]) -> float:
    """The threshold on P(abnormal) when the scan settings give none: a two-class model's stored operating point
    (chosen on its validation images, e.g. where sensitivity equals specificity; ``predict`` answers at it too) when
    its second class is the abnormal one, else 0.5."""
    t = getattr(model, "threshold", None)
    if t is not None and len(classes) == 2 and list(abnormal) == [classes[1]]:
        return float(t)
    return 0.5


def poisson_binomial_interval(p: Sequence[float], level: float = 0.95) -> tuple[int, int]:
    """Central interval of the number of successes of independent trials with probabilities ``p``."""
    dist = np.ones(1)
    for q in p:
        q = float(np.clip(q, 0.0, 1.0))
        dist = np.convolve(dist, [1.0 - q, q])
    cdf = np.cumsum(dist)
    tail = (1.0 - level) / 2
    return int(np.searchsorted(cdf, tail - 1e-12)), int(np.searchsorted(cdf, 1.0 - tail - 1e-12))


def wilson_interval(k: int, n: int, level: float = 0.95) -> tuple[float, float]:
    """Wilson score interval of a proportion ``k / n``."""
    from statistics import NormalDist

    if n <= 0:
        raise ValueError(f"n must be positive, got {n}")
    z = NormalDist().inv_cdf(0.5 + level / 2)
    ph = k / n
    centre = (ph + z * z / (2 * n)) / (1 + z * z / n)
    half = z * np.sqrt(ph * (1 - ph) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    lo = 0.0 if k == 0 else max(0.0, float(centre - half))  # exact ends where rounding would leave 1e-17
    hi = 1.0 if k == n else min(1.0, float(centre + half))
    return lo, hi


def abnormal_class_names(classes: Sequence[str], normal: Sequence[str] = ()) -> list[str]:
    """The classes that count as abnormal: every class not in ``normal`` (default: not in NORMAL_CLASS_NAMES)."""
    classes = list(classes)
    if normal:
        unknown = [n for n in normal if n not in classes]
        if unknown:
            raise ValueError(f"normal class(es) {unknown} are not classes of the model; its classes: {classes}")
        normal_set = set(normal)
    else:
        normal_set = {c for c in classes if c.lower() in NORMAL_CLASS_NAMES}
        if not normal_set:
            raise ValueError(f"none of the model's classes {classes} is a known normal class "
                             f"{list(NORMAL_CLASS_NAMES)}; say which are normal (--normal-class NAME)")
    abnormal = [c for c in classes if c not in normal_set]
    if not abnormal:
        raise ValueError(f"every class of the model {classes} is normal; nothing could be flagged abnormal")
    return abnormal


BORDER_MODES = ("clip", "shift", "reflect")


def is_partial(cell: Cell, width: int, height: int, max_distance: float) -> bool:
    """True when ``cell`` touches the field's edge and its centroid lies within ``max_distance`` pixels of it."""
    x0, y0, x1, y1 = cell.bbox
    if not (x0 <= 0 or y0 <= 0 or x1 >= width or y1 >= height):
        return False
    return min(cell.x, cell.y, width - cell.x, height - cell.y) < max_distance


def crop_cell(rgb: np.ndarray, x: float, y: float, side: float,
              border: str = "clip") -> tuple[np.ndarray, tuple[int, int, int, int]]:
    """A ``side`` x ``side`` crop centred on ``(x, y)``.

    Args:
        border: what happens where the square sticks out of the field. ``clip`` (default): the crop is cut at the
            field's edge and so is smaller, as ALL-IDB2 crops at a field border are (e.g. 257 x 220); ``shift``: the
            square moves inside the field, the cell off-centre; ``reflect``: the outside is filled by reflection.

    Returns:
        (crop, (x0, y0, x1, y1)) with the box in field pixels, clipped to the field.
    """
    if border not in BORDER_MODES:
        raise ValueError(f"Unknown border mode {border!r}. Available: {list(BORDER_MODES)}")
    h, w = rgb.shape[:2]
    s = max(2, int(round(side)))
    x0 = int(np.floor(x + 0.5)) - s // 2  # the cell's pixel sits at index s // 2 of the crop
    y0 = int(np.floor(y + 0.5)) - s // 2
    if border == "shift":
        x0 = min(max(0, x0), max(0, w - s))
        y0 = min(max(0, y0), max(0, h - s))
    x1, y1 = x0 + s, y0 + s
    box = (max(0, x0), max(0, y0), min(w, x1), min(h, y1))
    crop = rgb[box[1]:box[3], box[0]:box[2]]
    pad = ((max(0, -y0), max(0, y1 - h)), (max(0, -x0), max(0, x1 - w)), (0, 0))
    if border == "reflect" and any(p for pair in pad[:2] for p in pair):
        mode = "reflect" if min(crop.shape[:2]) > max(max(pad[0]), max(pad[1])) else "edge"
        crop = np.pad(crop, pad, mode=mode)
    return np.ascontiguousarray(crop), box


def cell_crops(rgb: np.ndarray, centres: Sequence[tuple[float, float]], side: float, size: int,
               border: str = "clip") -> tuple[list[np.ndarray], list[tuple[int, int, int, int]]]:
    """The classifier's input for each cell centre: a :func:`crop_cell` of ``side`` pixels resized to ``size`` x
    ``size`` (a clipped crop is squared, as the model's own preprocessing does with a clipped training crop), and
    each crop's box in field pixels."""
    crops, boxes = [], []
    for x, y in centres:
        crop, box = crop_cell(rgb, x, y, side, border)
        shrink = crop.shape[0] > size or crop.shape[1] > size
        crops.append(cv2.resize(crop, (size, size), interpolation=cv2.INTER_AREA if shrink else cv2.INTER_LINEAR))
        boxes.append(box)
    return crops, boxes


def _model_name(model: Any) -> str:
    return str(getattr(model, "name", "") or type(model).__name__)


Explainer = Callable[[list[np.ndarray], list[int]], Sequence[np.ndarray]]


def _default_explainer(model: Any) -> tuple[Explainer | None, str]:
    """Batched Grad-CAM for a model loaded by :func:`leukoscope.models.load_model`; None (and why) otherwise."""
    # A LoadedModel can only exist once its module is imported: checking sys.modules keeps torch out of scans
    # that run another classifier.
    modeldir = sys.modules.get("leukoscope.models.modeldir")
    if modeldir is None or not isinstance(model, modeldir.LoadedModel):
        return None, f"off: Grad-CAM needs a model loaded with leukoscope.models.load_model, got {type(model).__name__}"
    from leukoscope.explain.cam import get_method, resolve_layer
    from leukoscope.explain.core import cam_batch

    resolve_layer(model.module, get_method("gradcam"), None, model.target_layer)  # fails early without a layer

    def explain(crops: list[np.ndarray], classes: list[int]) -> list[np.ndarray]:
        # One forward/backward pass per 8 cells (gradcam_array would add a prediction and a pass per cell).
        out: list[np.ndarray] = []
        for i in range(0, len(crops), 8):
            out.extend(cam_batch(model, model.prepare_batch(crops[i:i + 8]), classes[i:i + 8]))
        return out

    return explain, "gradcam on abnormal cells"


def scan_field(rgb: np.ndarray, model: Classifier, config: ScanConfig | None = None,
               explainer: Explainer | None = None) -> FieldResult:
    """Find, classify and flag the white cells of one smear field.

    Args:
        rgb: the field, ``(H, W, 3)`` uint8 RGB (not modified).
        model: any object with ``classes``, ``input_size`` and ``predict_arrays(list of RGB arrays) -> (N, C)``.
        config: scan settings.
        explainer: ``f(crops, class_indices) -> heatmaps`` (each ``(h, w)`` in [0, 1]) for the abnormal cells;
            default Grad-CAM when ``model`` is a :class:`leukoscope.models.LoadedModel`, else none.
    """
    cfg = config or ScanConfig()
    check_rgb(rgb, "field")
    classes = [str(c) for c in model.classes]
    abnormal = abnormal_class_names(classes, cfg.normal_classes)
    ab_idx = [classes.index(c) for c in abnormal]
    threshold = (abnormal_threshold(model, classes, abnormal) if cfg.abnormal_threshold is None
                 else float(cfg.abnormal_threshold))
    det = find_white_cells(rgb, cfg)
    crops, boxes = cell_crops(rgb, [(c.x, c.y) for c in det.cells], cfg.crop_rbc_diameters * det.rbc_diameter,
                              int(model.input_size), cfg.border)
    proba = np.zeros((0, len(classes)), np.float32)
    scores: np.ndarray | None = None
    if crops:
        with_ood = getattr(model, "ood", None) is not None and hasattr(model, "predict_arrays_ood")
        parts, score_parts = [], []
        for i in range(0, len(crops), cfg.batch_size):
            if with_ood:
                p, sc = model.predict_arrays_ood(crops[i:i + cfg.batch_size])
                score_parts.append(sc)
            else:
                p = model.predict_arrays(crops[i:i + cfg.batch_size])
            parts.append(np.asarray(p, dtype=np.float64))
        proba = np.concatenate(parts)
        scores = np.concatenate(score_parts) if with_ood else None
        if proba.shape != (len(crops), len(classes)):
            raise ValueError(f"model returned probabilities of shape {proba.shape} for {len(crops)} crops and "
                             f"{len(classes)} classes")
    cells = []
    h, w = rgb.shape[:2]
    for i, (c, p, box) in enumerate(zip(det.cells, proba, boxes, strict=True)):
        k = int(np.argmax(p))
        p_ab = float(p[ab_idx].sum())
        probs = {n: float(v) for n, v in zip(classes, p, strict=True)}
        part = is_partial(c, w, h, cfg.partial_rbc_diameters * det.rbc_diameter)
        score = None if scores is None else float(scores[i])
        cells.append(ScannedCell(c, classes[k], float(p[k]), probs, p_ab,
                                 p_ab >= threshold and not part, box, partial=part,
                                 ood=None if score is None else bool(model.ood.flag(score)), ood_score=score))
    note = "off"
    if cfg.gradcam and not any(c.abnormal for c in cells):
        note = "no abnormal cells"
    elif cfg.gradcam:
        if explainer is None:
            explainer, note = _default_explainer(model)
        else:
            note = "gradcam on abnormal cells"
        if explainer is not None:
            flagged = sorted((i for i, c in enumerate(cells) if c.abnormal), key=lambda i: -cells[i].p_abnormal)
            flagged = flagged[:cfg.max_gradcam]
            targets = [max(ab_idx, key=lambda j, i=i: proba[i, j]) for i in flagged]
            heats = explainer([crops[i] for i in flagged], targets)
            for i, heat in zip(flagged, heats, strict=True):
                cells[i].heatmap = np.asarray(heat, dtype=np.float32)
    from leukoscope.preprocess.quality import check_field

    return FieldResult(cells, classes, abnormal, det.rbc_diameter, (w, h), det.smudges, cfg, _model_name(model), note,
                       [(q.code, q.message) for q in check_field(rgb)],
                       getattr(model, "ood", None) is not None and hasattr(model, "predict_arrays_ood"), det.scale,
                       threshold)


_DETECTORS: dict[str, Any] = {}


def get_detector(name: str) -> Any:
    """The learned white-cell detector (``learned`` = the shipped one, or a directory), loaded once per process."""
    if name not in _DETECTORS:
        from leukoscope.preprocess.wbc_detector import load_detector

        _DETECTORS[name] = load_detector(None if name == "learned" else name)
    return _DETECTORS[name]


def find_white_cells(rgb: np.ndarray, config: ScanConfig | None = None) -> Detection:
    """The white cells of a field with the detector that ``config`` names (see :class:`ScanConfig`)."""
    cfg = config or ScanConfig()
    if cfg.detector == "classical":
        return detect_cells(rgb, cfg.detect)
    return get_detector(cfg.detector).detect(rgb, rbc_diameter=cfg.detect.rbc_diameter)


# ------------------------------------------------------------------------------------------------------------------
# Outputs
# ------------------------------------------------------------------------------------------------------------------
def class_colour(name: str, classes: Sequence[str], abnormal: Sequence[str]) -> tuple[int, int, int]:
    """RGB colour of a class: green for a single normal class, red for the first abnormal class, else a palette."""
    normal = [c for c in classes if c not in abnormal]
    if name in normal and len(normal) == 1:
        return NORMAL_COLOUR
    if abnormal and name == abnormal[0]:
        return ABNORMAL_COLOUR
    return _OTHER_COLOURS[list(classes).index(name) % len(_OTHER_COLOURS)]


def render_field_overlay(rgb: np.ndarray, result: FieldResult, heat_alpha: float = 0.5) -> np.ndarray:
    """The field with every white cell boxed in its class colour (thicker and more opaque the more confident),
    its label and confidence written above, Grad-CAM blended into the crops of the abnormal cells, and a legend.

    Returns a new RGB uint8 array of the field's size; ``rgb`` is not modified.
    """
    out = rgb.copy()
    d = max(result.rbc_diameter, 8.0)
    for sc in result.cells:
        if sc.heatmap is None:
            continue
        x0, y0, x1, y1 = sc.crop_box
        if result.config.border == "reflect":
            # The crop is the full square around the cell; only its part inside the field is drawn.
            s = max(2, int(round(result.config.crop_rbc_diameters * result.rbc_diameter)))
            heat = cv2.resize(sc.heatmap, (s, s), interpolation=cv2.INTER_LINEAR)
            cx0 = int(np.floor(sc.cell.x + 0.5)) - s // 2
            cy0 = int(np.floor(sc.cell.y + 0.5)) - s // 2
            region = heat[y0 - cy0:y1 - cy0, x0 - cx0:x1 - cx0]
        else:  # the crop shows exactly crop_box
            region = cv2.resize(sc.heatmap, (x1 - x0, y1 - y0), interpolation=cv2.INTER_LINEAR)
        out[y0:y1, x0:x1] = _blend_heat(out[y0:y1, x0:x1], region, heat_alpha)
    scale = max(0.4, d / 90.0)
    for sc in result.cells:
        if sc.partial:  # cut by the edge, not counted: a thin grey box, no label
            x0, y0, x1, y1 = sc.cell.bbox
            cv2.rectangle(out, (x0, y0), (x1 - 1, y1 - 1), PARTIAL_COLOUR, max(1, int(round(d / 60))), cv2.LINE_AA)
            continue
        colour = np.asarray(class_colour(sc.label, result.classes, result.abnormal_classes), np.float32)
        # An unsure cell gets a thin, pale box: the colour fades towards white as the confidence falls.
        fade = float(np.clip((sc.confidence - 0.5) / 0.5, 0.0, 1.0)) if len(result.classes) == 2 else sc.confidence
        c = tuple(int(v) for v in np.round(colour * (0.4 + 0.6 * fade) + 255 * 0.6 * (1 - fade)))
        x0, y0, x1, y1 = sc.cell.bbox
        thick = max(1, int(round((1 + 3 * fade) * d / 60)))
        cv2.rectangle(out, (x0, y0), (x1 - 1, y1 - 1), c, thick, cv2.LINE_AA)
        cv2.putText(out, f"{sc.label} {sc.confidence:.2f}", (x0, max(int(14 * scale), y0 - 4)),
                    cv2.FONT_HERSHEY_SIMPLEX, 0.5 * scale, c, max(1, int(round(scale))), cv2.LINE_AA)
    _legend(out, result, scale)
    return out


def _blend_heat(rgb: np.ndarray, heat: np.ndarray, alpha: float) -> np.ndarray:
    """Heat (turbo colours, as leukoscope.explain draws it) blended with an opacity growing with the heat, so cold
    parts of the crop keep the original pixels. Kept here so that drawing an overlay does not import torch."""
    colours = cv2.applyColorMap(np.round(np.clip(heat, 0, 1) * 255).astype(np.uint8), cv2.COLORMAP_TURBO)[..., ::-1]
    a = (alpha * np.clip(heat, 0, 1))[..., None].astype(np.float32)
    return np.round(rgb.astype(np.float32) * (1 - a) + colours.astype(np.float32) * a).astype(np.uint8)


def _legend(out: np.ndarray, result: FieldResult, scale: float) -> None:
    lines = [(f"white cells {result.n_white_cells}, abnormal {result.n_abnormal}", (0, 0, 0))]
    for k in result.classes:
        lines.append((f"{k}: {sum(c.label == k for c in result.counted)}",
                      class_colour(k, result.classes, result.abnormal_classes)))
    fs = 0.5 * scale
    th = max(1, int(round(scale)))
    (tw, tht), _ = cv2.getTextSize(lines[0][0], cv2.FONT_HERSHEY_SIMPLEX, fs, th)
    pad = int(6 * scale)
    box_h = len(lines) * (tht + pad) + pad
    box_w = min(out.shape[1], tw + 2 * pad)
    panel = out[:box_h, :box_w]
    panel[:] = (0.3 * panel + 0.7 * 255).astype(np.uint8)
    for i, (text, colour) in enumerate(lines):
        cv2.putText(out, text, (pad, (i + 1) * (tht + pad)), cv2.FONT_HERSHEY_SIMPLEX, fs, colour, th, cv2.LINE_AA)


def to_geojson(result: FieldResult) -> dict[str, Any]:
    """A GeoJSON FeatureCollection that QuPath (0.4+) imports as detections with classifications: one Polygon
    (the cell outline, pixel coordinates of the field) per white cell, with its probabilities as measurements."""
    features = []
    for sc in result.cells:
        ring = [[float(x), float(y)] for x, y in sc.cell.contour]
        if len(ring) < 3:
            x0, y0, x1, y1 = sc.cell.bbox
            ring = [[x0, y0], [x1, y0], [x1, y1], [x0, y1]]
        ring.append(ring[0])
        name = "Partial (field edge)" if sc.partial else sc.label
        colour = PARTIAL_COLOUR if sc.partial else class_colour(sc.label, result.classes, result.abnormal_classes)
        measurements = {"confidence": round(sc.confidence, 4), "p_abnormal": round(sc.p_abnormal, 4),
                        "area_px": sc.cell.area, "partial": int(sc.partial)}
        measurements.update({f"p_{k}": round(v, 4) for k, v in sc.proba.items()})
        features.append({
            "type": "Feature",
            "id": str(uuid.uuid5(uuid.NAMESPACE_OID, f"{sc.cell.x},{sc.cell.y},{sc.cell.bbox}")),
            "geometry": {"type": "Polygon", "coordinates": [ring]},
            "properties": {
                "objectType": "detection",
                "classification": {"name": name, "color": list(colour)},
                "isLocked": False,
                "measurements": measurements,
            },
        })
    return {"type": "FeatureCollection", "features": features}


def write_outputs(result: FieldResult, rgb: np.ndarray, out_dir: str | Path, stem: str, source: str = "",
                  overlay: bool = True) -> dict[str, Path]:
    """Write ``<stem>.json``, ``<stem>.geojson`` and (unless ``overlay`` is False) ``<stem>.overlay.png``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"json": out / f"{stem}.json", "geojson": out / f"{stem}.geojson"}
    paths["json"].write_text(json.dumps(result.to_dict(source), indent=1))
    paths["geojson"].write_text(json.dumps(to_geojson(result)))
    if overlay:
        paths["overlay"] = out / f"{stem}.overlay.png"
        img = render_field_overlay(rgb, result)
        if not cv2.imwrite(str(paths["overlay"]), cv2.cvtColor(img, cv2.COLOR_RGB2BGR)):
            raise OSError(f"could not write {paths['overlay']}")
    return paths


def with_detect(config: ScanConfig, **detect: Any) -> ScanConfig:
    """``config`` with some detection settings replaced (unknown names are an error)."""
    return replace(config, detect=DetectConfig.from_dict(asdict(config.detect) | detect))
