"""Int8 ONNX: static quantisation calibrated on the model's own training images, checked against float32.

On a CPU with int8 dot-product instructions (AVX-512 VNNI, AVX-VNNI, ARM dot-product) ONNX Runtime runs the int8
network about twice as fast as the float32 one (EfficientNet-Lite0 at 224 px on this project's 2-core machine, the
network alone at batch 32, random inputs, measured 2026-11-26: 479 vs 208 images/s; `leukoscope predict` end to
end: benchmarks/predict_speed.py).
Predictions move a little, so the export measures that on held-out images (:func:`agreement`) and writes the result
next to the network (``model.int8.json``); the model card's metrics are those of the float32 network. Used only
when asked for (``--backend int8``).

    leukoscope export --model leukemia-cell --int8
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from leukoscope.models.modeldir import INT8_FILE, INT8_REPORT

log = logging.getLogger(__name__)


def split_images(model: Any, part: str, n: int, seed: int = 0) -> list[Path]:
    """Up to ``n`` image paths of ``part`` (``train``, ``val``, ``test``) of the model's own split, spread evenly over
    the datasets it was trained on and their classes (random within each, fixed ``seed``)."""
    from leukoscope.evaluate.run import select

    datasets = model.info.get("datasets") or []
    if not datasets or not (model.path / "split.json").exists():
        raise ValueError(f"model {model.name!r} has no recorded datasets and split.json; pass calibration images")
    strata: dict[tuple[str, str], list[Path]] = {}
    for name in datasets:
        for s in select(model, name, part).samples:
            strata.setdefault((name, s.label), []).append(s.path)
    rng = np.random.default_rng(seed)
    for paths in strata.values():
        rng.shuffle(paths)
    out: list[Path] = []
    while len(out) < n and any(strata.values()):  # round robin over (dataset, class)
        for key in sorted(strata):
            if strata[key] and len(out) < n:
                out.append(strata[key].pop())
    return out


class _Reader:
    """ONNX Runtime's calibration reader over prepared batches."""

    def __init__(self, batches: list[np.ndarray]) -> None:
        self._it = iter(batches)

    def get_next(self) -> dict | None:
        x = next(self._it, None)
        return None if x is None else {"input": x}

    def __iter__(self):  # some of ONNX Runtime's tools iterate instead
        return iter(self.get_next, None)


def prepared(model: Any, paths: list[Path], batch_size: int = 16) -> list[np.ndarray]:
    """Prepared batches of the readable images among ``paths`` (unreadable ones are logged and skipped)."""
    from leukoscope.data.images import read_image
    from leukoscope.errors import ImageReadError

    images = []
    for p in paths:
        try:
            images.append(read_image(p))
        except ImageReadError as exc:
            log.warning("skipping unreadable %s: %s", p, exc.reason)
    if not images:
        raise ValueError(f"none of the {len(paths)} images could be read")
    return [model.prepare_batch(images[i:i + batch_size]) for i in range(0, len(images), batch_size)]


@contextlib.contextmanager
def _quiet_root_logger():
    """ONNX Runtime's quantiser logs a line per adjusted weight scale through the root logger at INFO."""
    root = logging.getLogger()
    level = root.level
    root.setLevel(max(level, logging.WARNING))
    try:
        yield
    finally:
        root.setLevel(level)


def float32_onnx(model: Any) -> Path:
    """The float32 ONNX file of ``model`` that ``backend="onnx"`` uses (:func:`onnx_path_for`), exported if missing."""
    from leukoscope.models.export import export_onnx
    from leukoscope.models.modeldir import onnx_path_for

    path = onnx_path_for(model)
    return path if path.exists() else export_onnx(model.module, model.input_size, path)


def quantize_int8(model: Any, calibration: list[Path], out: str | Path | None = None) -> tuple[Path, int]:
    """Write the int8 network of ``model`` (a :class:`LoadedModel`) calibrated on ``calibration`` images; returns
    (its path, how many images were readable and used).

    Static quantisation in ONNX Runtime's QDQ format: weights int8 per output channel, activations uint8 with ranges
    from the calibration images (min-max). Atomic write; default ``model.int8.onnx`` in the model directory."""
    from onnxruntime.quantization import QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    if not calibration:
        raise ValueError("int8 calibration needs at least one image")
    out = Path(out) if out else model.path / INT8_FILE
    with tempfile.TemporaryDirectory() as tmp:
        fp32 = float32_onnx(model)
        pre = Path(tmp) / "pre.onnx"
        batches = prepared(model, calibration)
        tmp_out = out.with_name(f".{out.name}.{os.getpid()}.tmp")
        try:
            with _quiet_root_logger():
                quant_pre_process(str(fp32), str(pre))
                quantize_static(str(pre), str(tmp_out), _Reader(batches), quant_format=QuantFormat.QDQ,
                                per_channel=True, activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8)
            os.replace(tmp_out, out)
        finally:
            tmp_out.unlink(missing_ok=True)
    return out, sum(len(b) for b in batches)


def int8_temperature(model: Any, int8_path: str | Path) -> float | None:
    """Temperature of the int8 network fitted on the validation images of the model's split (as training fits the
    float32 one), so that its confidences are calibrated too; None when the model has no recorded split."""
    import dataclasses

    from leukoscope.evaluate.run import model_logits, select
    from leukoscope.models.modeldir import onnx_session
    from leukoscope.train.trainer import fit_temperature

    datasets = model.info.get("datasets") or []
    if not datasets or not (model.path / "split.json").exists():
        return None
    int8 = dataclasses.replace(model, _session=onnx_session(int8_path), backend="onnx", precision="int8", tta=False)
    parts = [model_logits(int8, select(model, name, "val")) for name in datasets]
    y = np.concatenate([p[1] for p in parts])
    return fit_temperature(np.concatenate([p[0] for p in parts]), y) if len(y) else None


def agreement(model: Any, int8_path: str | Path, paths: list[Path], seed: int = 0,
              int8_temp: float | None = None) -> dict:
    """How the int8 network's calibrated probabilities (temperature ``int8_temp``, default the float32 one) compare
    with the float32 network's on ``paths``: share of equal labels, largest and mean absolute difference of the
    probabilities. For scale, the same comparison of the
    float32 network with itself on the images plus Gaussian noise of one grey level (sd 1/255 per channel), a
    difference no one would see in the image."""
    from leukoscope.models.modeldir import onnx_session, softmax

    fp32, q = onnx_session(float32_onnx(model)), onnx_session(int8_path)
    rng = np.random.default_rng(seed)
    sd = (1 / 255 / np.asarray(model.preprocess.std, np.float32))[None, :, None, None]
    p32, p8, pn = [], [], []
    for x in prepared(model, paths, 32):
        p32.append(softmax(fp32.run(None, {"input": x})[0] / model.temperature))
        p8.append(softmax(q.run(None, {"input": x})[0] / (int8_temp or model.temperature)))
        noisy = (x + rng.normal(size=x.shape).astype(np.float32) * sd).astype(np.float32)
        pn.append(softmax(fp32.run(None, {"input": noisy})[0] / model.temperature))
    a, b, c = np.concatenate(p32), np.concatenate(p8), np.concatenate(pn)

    def compare(other: np.ndarray) -> dict:
        diff = np.abs(a - other)
        return {"label_agreement": float((a.argmax(1) == other.argmax(1)).mean()),
                "max_abs_prob_diff": float(diff.max()), "mean_abs_prob_diff": float(diff.mean())}

    return {"n_images": len(a), **compare(b), "float32_under_1_grey_level_noise": compare(c)}


def export_int8(model: Any, n_calibration: int = 256, n_check: int = 512, calibration: list[Path] | None = None,
                out: str | Path | None = None) -> tuple[Path, dict]:
    """Calibrate on ``n_calibration`` training images (or ``calibration``), write the int8 network, fit its
    temperature on the validation images and check it on up to ``n_check`` held-out validation and test images of
    the model's split; temperature and check are saved next to it (``model.int8.json``)."""
    cal = calibration or split_images(model, "train", n_calibration)
    path, n_used = quantize_int8(model, cal, out)
    try:
        check_paths = split_images(model, "val", n_check // 2) + split_images(model, "test", n_check // 2)
        held = "validation and test images of the model's split"
    except ValueError:
        check_paths, held = cal, "the calibration images (the model has no recorded split)"
    temp = int8_temperature(model, path)
    report = {"calibration_images": n_used, "temperature": temp, "temperature_float32": model.temperature,
              "checked_on": held, **agreement(model, path, check_paths, int8_temp=temp),
              "weights_sha256": model.info.get("weights_sha256")}
    report_path = path.parent / INT8_REPORT if path.name == INT8_FILE else path.with_suffix(".json")
    report_path.write_text(json.dumps(report, indent=1) + "\n")
    return path, report
