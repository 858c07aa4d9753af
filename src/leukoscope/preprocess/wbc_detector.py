"""The learned white-cell detector: one physical scale, a centre heatmap, peaks as cells.

    from leukoscope.preprocess.wbc_detector import load_detector
    det = load_detector()                      # the shipped detector (weights/wbc-detector)
    found = det.detect(rgb)                    # a leukoscope.preprocess.cells.Detection

1. **Magnification.** The field's red-cell diameter is measured (:func:`~leukoscope.preprocess.cells.
   estimate_rbc_diameter`, or given) and the field is resampled so that a red cell is ``work_rbc_px`` pixels across:
   every field, whatever its microscope and camera, reaches the network at one physical scale.
2. **Marks.** Yellow arrows burned into some ALL-IDB1 fields are painted out (:func:`remove_marks`) before
   training and before detection, so no model learns them and none is distracted by them.
3. **Heatmap.** :class:`leukoscope.models.detector_net.DetectorNet` gives the probability that a white cell's centre
   lies in each 8 x 8 block of the resampled field.
4. **Peaks.** Local maxima above the threshold, at least ``min_distance`` red-cell diameters apart, are the cells;
   their centre is refined by the heat-weighted mean of the 3 x 3 neighbourhood. Touching cells give separate peaks,
   which is what the classical segmentation's watershed could not always do.

The cell outline is a disc of ``cell_radius`` red-cell diameters (the detector predicts centres, not outlines).
Inference runs through ONNX Runtime when installed (no PyTorch import), else through PyTorch.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from leukoscope.preprocess.cells import Cell, Detection, estimate_rbc_diameter
from leukoscope.preprocess.segment import check_rgb

DETECTOR_DIR = Path(__file__).resolve().parents[1] / "weights" / "wbc-detector"
ONNX_FILE = "detector.onnx"
WEIGHTS_FILE = "detector.safetensors"
STRIDE = 8
PAD = 16
# Red cells are measured away from nuclei (estimate_rbc_diameter's white_cell_margin): dense blast fields otherwise
# read up to 1.6x too large (ALL-IDB1 Im061_1: 132.6 px plain, 82.8 px with the margin; its neighbours measure 75-83).
WHITE_CELL_MARGIN = 0.012


def measure_rbc(rgb: np.ndarray) -> float:
    """The field's red-cell diameter in pixels, measured away from white cells (see WHITE_CELL_MARGIN)."""
    return estimate_rbc_diameter(rgb, white_cell_margin=WHITE_CELL_MARGIN)


def arrow_mask(rgb: np.ndarray) -> np.ndarray:
    """Pixels of burned-in yellow/orange arrow marks (ALL-IDB1): saturated yellow, a colour no Romanowsky stain
    gives, plus a rim of a few pixels for the arrow's reddish anti-aliased edge."""
    f = rgb.astype(np.int16)
    r, g, b = f[..., 0], f[..., 1], f[..., 2]
    core = (r > 200) & (g > 150) & (b < 140) & (r - b > 90) & (g - b > 50)
    if core.sum() < 20:  # a few stray JPEG pixels are not an arrow
        return np.zeros(rgb.shape[:2], bool)
    return cv2.dilate(core.astype(np.uint8), cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (9, 9))) > 0


def remove_marks(rgb: np.ndarray) -> tuple[np.ndarray, int]:
    """The field with burned-in arrow marks painted out (OpenCV inpainting) and the number of pixels replaced."""
    mask = arrow_mask(rgb)
    n = int(mask.sum())
    if not n:
        return rgb, 0
    return cv2.inpaint(np.ascontiguousarray(rgb), mask.astype(np.uint8), 5, cv2.INPAINT_TELEA), n


def to_work(rgb: np.ndarray, scale: float) -> np.ndarray:
    """Resample by ``scale`` and pad (reflect) to a multiple of 16; returns ``(1, 3, H, W)`` float32 in [-1, 1]."""
    h, w = rgb.shape[:2]
    size = (max(16, round(w * scale)), max(16, round(h * scale)))
    interp = cv2.INTER_AREA if scale < 1 else cv2.INTER_LINEAR
    work = cv2.resize(rgb, size, interpolation=interp)
    ph, pw = (-work.shape[0]) % PAD, (-work.shape[1]) % PAD
    if ph or pw:
        work = np.pad(work, ((0, ph), (0, pw), (0, 0)), mode="reflect")
    x = work.astype(np.float32).transpose(2, 0, 1)[None] / 127.5 - 1.0
    return np.ascontiguousarray(x)


def find_peaks(prob: np.ndarray, threshold: float, min_distance: float) -> list[tuple[float, float, float]]:
    """Peaks of a stride-8 probability map: ``(x, y, p)`` in work-image pixels, strongest first.

    Args:
        threshold: minimum centre probability.
        min_distance: in work-image pixels; a weaker peak closer than this to a stronger one is dropped.
    """
    h, w = prob.shape
    dil = cv2.dilate(prob, np.ones((3, 3), np.uint8))
    ys, xs = np.nonzero((prob >= dil) & (prob >= threshold))
    order = np.argsort(-prob[ys, xs], kind="stable")
    kept: list[tuple[float, float, float]] = []
    for i in order:
        y, x = int(ys[i]), int(xs[i])
        y0, y1, x0, x1 = max(0, y - 1), min(h, y + 2), max(0, x - 1), min(w, x + 2)
        win = prob[y0:y1, x0:x1]
        gy, gx = np.mgrid[y0:y1, x0:x1]
        cy, cx = float((gy * win).sum() / win.sum()), float((gx * win).sum() / win.sum())
        px, py = cx * STRIDE + (STRIDE - 1) / 2, cy * STRIDE + (STRIDE - 1) / 2
        if all((px - kx) ** 2 + (py - ky) ** 2 >= min_distance ** 2 for kx, ky, _ in kept):
            kept.append((px, py, float(prob[y, x])))
    return kept


def field_peaks(prob: np.ndarray, scale: float, shape: tuple[int, int], threshold: float,
                min_distance: float) -> list[tuple[float, float, float]]:
    """:func:`find_peaks` of a work-image probability map as ``(x, y, p)`` in field pixels (``shape`` = the field's
    ``(h, w)``); peaks in the reflected padding beyond the field are not cells."""
    h, w = shape
    out = []
    for px, py, p in find_peaks(prob, threshold, min_distance):
        x, y = px / scale, py / scale
        if 0 <= x < w and 0 <= y < h:
            out.append((x, y, p))
    return out


def disc_cell(x: float, y: float, radius: float, p: float, shape: tuple[int, int]) -> Cell:
    """A detected centre as a :class:`~leukoscope.preprocess.cells.Cell` with a disc outline of ``radius`` pixels."""
    h, w = shape
    bbox = (max(0, int(np.floor(x - radius))), max(0, int(np.floor(y - radius))),
            min(w, int(np.ceil(x + radius)) + 1), min(h, int(np.ceil(y + radius)) + 1))
    angles = np.linspace(0, 2 * np.pi, 24, endpoint=False)
    contour = [(float(np.clip(x + radius * np.cos(a), 0, w - 1)), float(np.clip(y + radius * np.sin(a), 0, h - 1)))
               for a in angles]
    area = float(np.pi * radius * radius)
    return Cell(float(x), float(y), bbox, area, area, p, contour=contour)


@dataclass
class WBCDetector:
    """A trained centre-heatmap detector (see the module docstring).

    Attributes:
        info: the detector's ``model.json`` (work scale, threshold, how it was trained and measured).
        runner: ``f(x (1, 3, H, W) float32) -> logits (1, 1, H/8, W/8)``.
    """

    info: dict[str, Any]
    runner: Any
    path: Path | None = None

    @property
    def classes(self) -> list[str]:
        """What the detector finds (one kind of object), as ``leukoscope models`` lists it."""
        return ["white cell"]

    @property
    def work_rbc_px(self) -> float:
        return float(self.info["work_rbc_px"])

    @property
    def threshold(self) -> float:
        return float(self.info["threshold"])

    @property
    def min_distance(self) -> float:
        return float(self.info.get("min_distance", 0.55))

    @property
    def cell_radius(self) -> float:
        return float(self.info.get("cell_radius", 0.6))

    def heatmap(self, rgb: np.ndarray, rbc_diameter: float | None = None) -> tuple[np.ndarray, float, float]:
        """(centre probabilities at stride 8 of the work image, scale, red-cell diameter in field pixels)."""
        check_rgb(rgb, "field")
        clean, _ = remove_marks(rgb)
        rbc_d = float(rbc_diameter) if rbc_diameter is not None else measure_rbc(clean)
        if not np.isfinite(rbc_d) or rbc_d <= 0:
            raise ValueError(f"red-cell diameter must be a positive number of pixels, got {rbc_d!r}")
        scale = self.work_rbc_px / rbc_d
        logits = np.asarray(self.runner(to_work(clean, scale)), dtype=np.float32)[0, 0]
        h, w = rgb.shape[:2]
        logits = logits[:int(np.ceil(h * scale / STRIDE)), :int(np.ceil(w * scale / STRIDE))]
        return 1.0 / (1.0 + np.exp(-logits)), scale, rbc_d

    def detect(self, rgb: np.ndarray, rbc_diameter: float | None = None, threshold: float | None = None) -> Detection:
        """The white cells of a field as a :class:`~leukoscope.preprocess.cells.Detection` (disc outlines)."""
        prob, scale, rbc_d = self.heatmap(rgb, rbc_diameter)
        thr = self.threshold if threshold is None else float(threshold)
        shape = rgb.shape[:2]
        cells = [disc_cell(x, y, self.cell_radius * rbc_d, p, shape)
                 for x, y, p in field_peaks(prob, scale, shape, thr, self.min_distance * self.work_rbc_px)]
        cells.sort(key=lambda c: (round(c.y), c.x))
        return Detection(cells, rbc_d, scale, np.zeros((0, 0), np.int32), [])


def _onnx_runner(path: Path) -> Any:
    from leukoscope.models.modeldir import onnx_session

    sess = onnx_session(path)
    name = sess.get_inputs()[0].name
    return lambda x: sess.run(None, {name: x})[0]


def _torch_runner(path: Path, info: dict[str, Any]) -> Any:
    import torch
    from safetensors.torch import load_file

    from leukoscope.models.detector_net import DetectorNet

    net = DetectorNet(pretrained=False, width=int(info.get("head_width", 48)))
    net.load_state_dict({k: v.float() for k, v in load_file(str(path)).items()})
    net.eval()

    def run(x: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            return net(torch.from_numpy(x)).numpy()

    return run


def load_detector(path: str | Path | None = None, backend: str = "auto") -> WBCDetector:
    """A detector directory (``model.json`` with ``detector.onnx`` and/or ``detector.safetensors``); default: the
    shipped one.

    Args:
        backend: ``auto`` (ONNX Runtime when installed and the directory has the ONNX file, else PyTorch), ``onnx`` or
            ``torch``.
    """
    d = Path(path).expanduser() if path is not None else DETECTOR_DIR
    info_path = d / "model.json"
    if not info_path.exists():
        raise FileNotFoundError(f"{d} is not a white-cell detector directory (no model.json); rebuild the shipped "
                                f"one with `leukoscope detector train`")
    info = json.loads(info_path.read_text())
    if info.get("kind") != "detector":
        raise ValueError(f"{info_path} holds a model of kind {info.get('kind')!r}, not a white-cell detector")
    if backend not in ("auto", "onnx", "torch"):
        raise ValueError(f"backend must be auto, onnx or torch, got {backend!r}")
    use_onnx = backend == "onnx" or (backend == "auto" and (d / ONNX_FILE).exists() and _has_onnxruntime())
    if use_onnx:
        if not (d / ONNX_FILE).exists():
            raise FileNotFoundError(f"{d / ONNX_FILE} does not exist")
        return WBCDetector(info, _onnx_runner(d / ONNX_FILE), d)
    if not (d / WEIGHTS_FILE).exists():
        raise FileNotFoundError(f"{d / WEIGHTS_FILE} does not exist (the torch backend needs it)")
    return WBCDetector(info, _torch_runner(d / WEIGHTS_FILE, info), d)


def _has_onnxruntime() -> bool:
    try:
        import onnxruntime  # noqa: F401
    except ImportError:
        return False
    return True
