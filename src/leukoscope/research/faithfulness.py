"""Does a heatmap point at what the model really uses? Deletion / insertion curves (Petsiuk et al., RISE, 2018).

Deletion: remove the pixels the map ranks highest first (set them to black) and watch the explained class's
probability fall; a faithful map makes it fall fast (low area under the curve). Insertion: start from a heavily
blurred image and put the highest-ranked pixels back first; a faithful map makes the probability rise fast (high
area). Both are compared with a random map of the same smoothness (:func:`random_map`).

ROAD (Rong et al., "A Consistent and Efficient Evaluation Strategy for Attribution Methods", ICML 2022;
:func:`road`) removes pixels without leaving an image the model never saw: the removed pixels are filled in from
their neighbours by noisy linear imputation (pytorch-grad-cam's ``NoisyLinearImputer``, from the paper's code), so a
hole in a cell becomes a smooth patch of the colours around it, not black or blur. MoRF removes the most relevant
pixels first (a faithful map makes the probability fall: low is better), LeRF the least relevant first (the
probability should stay: high is better).
"""

from __future__ import annotations

from collections.abc import Callable

import cv2
import numpy as np
import torch

from leukoscope.explain.record import (
    PRIMARY,
    SECONDARY,
)
from leukoscope.models.modeldir import LoadedModel, softmax


def random_map(size: int, grid: int = 7, seed: int = 0) -> np.ndarray:
    """A random ``grid`` x ``grid`` map upsampled bilinearly to ``size`` x ``size``: as smooth as a 7 x 7 CAM."""
    rng = np.random.default_rng(seed)
    return cv2.resize(rng.random((grid, grid)).astype(np.float32), (size, size), interpolation=cv2.INTER_LINEAR)


def _order(heat: np.ndarray, seed: int) -> np.ndarray:
    # Ties (flat or zero regions of a map) are broken at random, not in raster order, which would favour the top rows.
    jitter = np.random.default_rng(seed).random(heat.size) * 1e-6
    return np.argsort(-(heat.ravel().astype(np.float64) + jitter), kind="stable")


def deletion_insertion(score_fn: Callable[[np.ndarray], np.ndarray], image: np.ndarray, heat: np.ndarray,
                       steps: int = 16, seed: int = 0) -> dict:
    """Deletion and insertion AUC of one map.

    Args:
        score_fn: uint8 batch ``(B, S, S, 3)`` -> probability of the explained class, shape ``(B,)``.
        image: the prepared ``(S, S, 3)`` uint8 image the model sees.
        heat: ``(S, S)`` map; higher = more important.
        steps: the curves have ``steps + 1`` points (fractions 0, 1/steps, ..., 1 of the pixels).

    Returns:
        ``deletion`` and ``insertion`` (normalised AUC in [0, 1]) and both curves.
    """
    if heat.shape != image.shape[:2]:
        raise ValueError(f"map {heat.shape} and image {image.shape[:2]} differ in size")
    h, w = heat.shape
    order = _order(heat, seed)
    sigma = max(h, w) / 16
    k = int(2 * round(3 * sigma) + 1)
    blurred = cv2.GaussianBlur(image, (k, k), sigma)
    counts = np.linspace(0, h * w, steps + 1).round().astype(int)
    deleted, inserted = [], []
    flat_img, flat_blur = image.reshape(-1, 3), blurred.reshape(-1, 3)
    for c in counts:
        d = flat_img.copy()
        d[order[:c]] = 0
        deleted.append(d.reshape(image.shape))
        ins = flat_blur.copy()
        ins[order[:c]] = flat_img[order[:c]]
        inserted.append(ins.reshape(image.shape))
    scores = np.asarray(score_fn(np.stack(deleted + inserted)), np.float64)
    dcurve, icurve = scores[:steps + 1], scores[steps + 1:]
    x = counts / counts[-1]
    return {"deletion": _auc(dcurve, x), "insertion": _auc(icurve, x),
            "deletion_curve": dcurve.tolist(), "insertion_curve": icurve.tolist()}


ROAD_PERCENTILES = (10, 30, 50, 70, 90)


def road(score_fn: Callable[[np.ndarray], np.ndarray], image: np.ndarray, heat: np.ndarray,
         percentiles: tuple[int, ...] = ROAD_PERCENTILES, seed: int = 0) -> dict:
    """ROAD scores of one map: the explained class's probability after removing (imputing) a share of the pixels.

    Args:
        score_fn: uint8 batch ``(B, S, S, 3)`` -> probability of the explained class, shape ``(B,)``.
        image: the prepared ``(S, S, 3)`` uint8 image the model sees.
        heat: ``(S, S)`` map; higher = more important.
        percentiles: shares of the pixels removed, in percent.
        seed: ties in the map and the imputation noise.

    Returns:
        ``morf`` (mean probability over the percentiles, most relevant removed first; lower is better), ``lerf``
        (least relevant first; higher is better), ``combined`` = (lerf - morf) / 2 (higher is better; the paper's
        ``ROADCombined``) and both curves, one point per percentile.
    """
    from pytorch_grad_cam.metrics.road import NoisyLinearImputer

    if heat.shape != image.shape[:2]:
        raise ValueError(f"map {heat.shape} and image {image.shape[:2]} differ in size")
    h, w = heat.shape
    order = _order(heat, seed)
    imputer = NoisyLinearImputer(noise=0.01)  # noise in [0, 1] units: 2.5 grey levels
    img = torch.from_numpy(image.astype(np.float32).transpose(2, 0, 1) / 255.0)
    torch.manual_seed(seed)
    batch = []
    for first in (order, order[::-1]):  # MoRF, then LeRF
        for p in percentiles:
            keep = torch.ones(h * w)
            keep[torch.from_numpy(np.ascontiguousarray(first[:round(h * w * p / 100)]))] = 0
            out = imputer(img, keep.reshape(h, w)).clamp(0, 1)
            batch.append((out.numpy().transpose(1, 2, 0) * 255).round().astype(np.uint8))
    scores = np.asarray(score_fn(np.stack(batch)), np.float64)
    morf, lerf = scores[:len(percentiles)], scores[len(percentiles):]
    return {"morf": float(morf.mean()), "lerf": float(lerf.mean()), "combined": float((lerf.mean() - morf.mean()) / 2),
            "morf_curve": morf.tolist(), "lerf_curve": lerf.tolist(), "percentiles": list(percentiles)}


def _auc(y: np.ndarray, x: np.ndarray) -> float:
    return float(np.sum((y[1:] + y[:-1]) / 2 * np.diff(x)))  # np.trapezoid needs numpy 2


def model_score_fn(model: LoadedModel, target: int, batch_size: int = 32) -> Callable[[np.ndarray], np.ndarray]:
    """``score_fn`` for :func:`deletion_insertion`: the model's calibrated probability of class ``target`` for
    prepared uint8 images."""

    def score(batch: np.ndarray) -> np.ndarray:
        out = []
        for i in range(0, len(batch), batch_size):
            x = np.stack([model.preprocess.normalize(im) for im in batch[i:i + batch_size]])
            out.append(softmax(model.logits(x) / model.temperature)[:, target])
        return np.concatenate(out)

    return score


# ---- measuring it on any held-out images ----------------------------------------------------------------------------
SLOW_METHODS = frozenset({"scorecam"})  # one forward pass per channel of the target layer


def paired_difference(method: list[float], rnd: list[float], seed: int = 0, n_boot: int = 2000) -> dict:
    """Mean of (method - random map) over the same images, with a 95 % bootstrap CI over the images (the random
    map's list may be longer: its first ``len(method)`` values are used)."""
    d = np.asarray(method, np.float64) - np.asarray(rnd[:len(method)], np.float64)
    if not len(d):
        return {"mean": float("nan"), "ci": [float("nan"), float("nan")], "n": 0}
    boots = np.random.default_rng(seed).choice(d, (n_boot, len(d))).mean(axis=1)
    return {"mean": float(d.mean()), "ci": [float(np.quantile(boots, 0.025)), float(np.quantile(boots, 0.975))],
            "n": int(len(d))}


def differences(a: list[float], b: list[float], scale: float = 1.0) -> list[float]:
    """``scale * (a_i - b_i)`` per image: one number per pair of curves (insertion - deletion, ROAD combined)."""
    return [scale * (x - y) for x, y in zip(a, b, strict=True)]


def measure(model: LoadedModel, images: list[np.ndarray], methods: list[str], steps: int = 16,
            road_percentiles: tuple[int, ...] | None = ROAD_PERCENTILES, n_slow: int | None = None,
            progress: bool = False) -> dict:
    """Deletion / insertion (and ROAD) of each method's map against a random map, on the same images.

    Each image's predicted class is explained; the random map of image ``i`` is :func:`random_map` with seed ``i``
    (the benchmark's baseline). Returns ``{"n_images", "steps", "road_percentiles", "methods": {name: {"n",
    "deletion_auc", "insertion_auc", "paired_vs_random": {deletion, insertion, insertion_minus_deletion[, road_morf,
    road_lerf, road_combined]}}}}`` (the random map under ``random``), the shape
    :func:`record_from_results` reads.

    Args:
        images: RGB uint8 arrays, held out from the model's training.
        methods: registered method names; ``scorecam`` runs on the first ``n_slow`` images only when given.
        road_percentiles: None or empty skips ROAD (it solves one sparse system per point).
    """
    from tqdm import tqdm

    from leukoscope.explain.core import gradcam_array

    pcts = tuple(road_percentiles or ())
    per = {m: {"del": [], "ins": [], "morf": [], "lerf": []} for m in [*methods, "random"]}

    def add(name: str, score, prepared: np.ndarray, small: np.ndarray, i: int) -> None:
        f = deletion_insertion(score, prepared, small, steps=steps, seed=i)
        per[name]["del"].append(f["deletion"])
        per[name]["ins"].append(f["insertion"])
        if pcts:
            r = road(score, prepared, small, percentiles=pcts, seed=i)
            per[name]["morf"].append(r["morf"])
            per[name]["lerf"].append(r["lerf"])

    for i, rgb in enumerate(tqdm(images, desc="faithfulness", unit="img", disable=not progress, leave=False)):
        k = int(model.predict_arrays([rgb])[0].argmax())
        prepared = model.preprocess.prepare(rgb)
        score = model_score_fn(model, k)
        add("random", score, prepared, random_map(model.input_size, seed=i), i)
        for m in methods:
            if m in SLOW_METHODS and n_slow is not None and i >= n_slow:
                continue
            heat = gradcam_array(model, rgb, target_class=k, method=m)
            add(m, score, prepared, model.preprocess.to_input(heat, rgb), i)

    rnd = per["random"]
    out: dict = {}
    for m, v in per.items():
        r = {"n": len(v["del"]), "deletion_auc": float(np.mean(v["del"])) if v["del"] else None,
             "insertion_auc": float(np.mean(v["ins"])) if v["ins"] else None}
        if m != "random":
            pv = {"deletion": paired_difference(v["del"], rnd["del"]),
                  "insertion": paired_difference(v["ins"], rnd["ins"]),
                  PRIMARY: paired_difference(differences(v["ins"], v["del"]), differences(rnd["ins"], rnd["del"]))}
            if pcts:
                pv["road_morf"] = paired_difference(v["morf"], rnd["morf"])
                pv["road_lerf"] = paired_difference(v["lerf"], rnd["lerf"])
                pv[SECONDARY] = paired_difference(differences(v["lerf"], v["morf"], 0.5),
                                                  differences(rnd["lerf"], rnd["morf"], 0.5))
            r["paired_vs_random"] = pv
        out[m] = r
    return {"n_images": len(images), "steps": steps, "road_percentiles": list(pcts), "methods": out}
