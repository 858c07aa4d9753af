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

import functools
import hashlib
import json
from collections.abc import Callable
from pathlib import Path

import cv2
import numpy as np
import torch

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


# ---- the faithfulness record a model directory carries ------------------------------------------------------------
RECORD_FILE = "faithfulness.json"
PRIMARY = "insertion_minus_deletion"
SECONDARY = "road_combined"
SCORE_TITLES = {PRIMARY: "insertion - deletion (Petsiuk et al.)", SECONDARY: "ROAD combined, (LeRF - MoRF) / 2"}


def verdict(diff: dict | None) -> str:
    """``passes`` when the 95 % CI of (method - random map) on the same images lies above 0, ``fails`` when it lies
    below, else ``inconclusive``; ``not measured`` without a measurement."""
    if not diff or diff.get("ci") is None:
        return "not measured"
    lo, hi = diff["ci"]
    return "passes" if lo > 0 else "fails" if hi < 0 else "inconclusive"


@functools.lru_cache(maxsize=16)
def _sha256(path: str, mtime_ns: int) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def weights_sha256(model_dir) -> str | None:
    """sha256 of the directory's ``model.safetensors`` (what a record is tied to), None without one."""
    f = Path(model_dir) / "model.safetensors"
    return _sha256(str(f), f.stat().st_mtime_ns) if f.is_file() else None


IMAGE_KINDS = ("cutout", "smear")
KIND_TITLES = {"cutout": "cells cut out onto black", "smear": "smear images"}


def image_kind(rgb: np.ndarray) -> str:
    """``cutout`` for one cell cut out onto black (most of the border black, as in C-NMC 2019), else ``smear``.
    The two kinds can get different verdicts: on cut-out cells the model also reads the cell's outline against black,
    which interior-first maps do not rank first (docs/EXPLAIN.md)."""
    from leukoscope.preprocess.background import is_cutout_view

    return "cutout" if is_cutout_view(rgb) else "smear"


def images_kind(kinds: list[str]) -> str:
    """The kind of a set of images: the kind of most of them (``cutout`` or ``smear``)."""
    return "cutout" if 2 * sum(k == "cutout" for k in kinds) > len(kinds) else "smear"


# arguments of a run that say nothing about how it measured (image lists, output, what to record)
_NOT_RUN_SETTINGS = frozenset({"paths", "from_results", "verbose", "command", "record", "no_progress", "image_set",
                               "title"})


def _method_entries(cn: dict, res: dict) -> dict:
    out = {}
    for name, m in cn["methods"].items():
        paired = m.get("paired_vs_random")
        if name == "random" or "(reference)" in name or not paired:
            continue
        run = {k: v for k, v in res.get("args", {}).items() if k not in _NOT_RUN_SETTINGS}
        entry = {"n_cells": m["n"], "cells": cn.get("selection", ""), "run": run, "date": res.get("date")}
        for key in (PRIMARY, SECONDARY):
            d = paired.get(key)
            entry[key] = None if d is None else {"mean": d["mean"], "ci": d["ci"], "verdict": verdict(d)}
        if isinstance(m.get("mass_in_cell"), dict):
            entry["mass_in_cell"] = m["mass_in_cell"]["mean"]
        out[name] = entry
    return out


def kind_conflict(previous: dict | None, weights: str | None, image_set: str | None, kind: str | None) -> str | None:
    """Why results of ``kind`` cannot go into ``previous``'s main set (``image_set`` None) or its set ``image_set``:
    that set already holds results of the other kind (same weights). None when they can."""
    if previous is None or previous.get("weights_sha256") != weights or kind is None:
        return None
    if image_set is None:
        old_kind, has, where = previous.get("kind"), bool(previous.get("methods")), "the record's main set"
    else:
        old = previous.get("image_sets", {}).get(image_set, {})
        old_kind, has, where = old.get("kind"), bool(old.get("methods")), f"image set {image_set!r}"
    if has and old_kind and kind != old_kind:
        return (f"{where} holds {KIND_TITLES[old_kind]}; these are {KIND_TITLES[kind]}: record them as a further "
                "image set (leukoscope faithfulness ... --record --image-set NAME)")
    return None


def record_from_results(res: dict, previous: dict | None = None, weights: str | None = None,
                        image_set: str | None = None, kind: str | None = None, title: str = "") -> dict:
    """The model directory's faithfulness record from a ``benchmarks/explain_localisation.py`` (or ``leukoscope
    faithfulness``) results dict.

    Per method: the primary score (insertion - deletion, method minus a random map on the same cells, 95 % bootstrap
    CI) and its verdict, and the secondary score (ROAD combined) likewise. Methods this run did not measure keep their
    entry from ``previous`` (a run of one slow method updates that method only) when ``previous`` is of the same
    weights (``weights``: their sha256).

    Without ``image_set`` the results are the record's main set (``methods``, of ``kind``); with it they go to
    ``image_sets[image_set]`` (e.g. held-out smear crops), the main set and the other sets kept. ``kind`` (``cutout``
    / ``smear``) lets :func:`method_faithfulness` give an image the verdict measured on its own kind (a set without a
    kind, as in records from before kinds were kept, counts for every kind); ``title`` says in words what the images
    were. Results of one kind are never merged into a set of the other kind (``ValueError``: record them as a
    further set)."""
    if kind is not None and kind not in IMAGE_KINDS:
        raise ValueError(f"unknown image kind {kind!r}; expected one of {list(IMAGE_KINDS)}")
    conflict = kind_conflict(previous, weights, image_set, kind)
    if conflict:
        raise ValueError(conflict)
    cn = res["cnmc"] if "cnmc" in res else res["cells"]
    same = previous is not None and previous.get("weights_sha256") == weights
    prev = previous if same else {}
    methods = dict(prev.get("methods", {}))
    sets = {k: dict(v) for k, v in prev.get("image_sets", {}).items()}
    entries = _method_entries(cn, res)
    # a set of no recorded kind (made before kinds were kept) takes the given one
    if image_set is None:
        main = {"kind": kind or prev.get("kind"), "title": title or prev.get("title", "")}
        methods.update(entries)
    else:
        main = {"kind": prev.get("kind"), "title": prev.get("title", "")}
        old = sets.get(image_set, {})
        sets[image_set] = {"kind": kind or old.get("kind"), "title": title or old.get("title", image_set),
                           "methods": {**old.get("methods", {}), **entries}}
    rec = {"weights_sha256": weights, "primary": PRIMARY, "secondary": SECONDARY, "scores": SCORE_TITLES,
           "rule": "a method passes when the 95 % CI of its score minus a random map's (as smooth as a 7 x 7 CAM, "
                   "same cells) lies above 0; measured on held-out images (`cells` of each method says which); "
                   "an image gets the worst verdict of the sets of its own kind (cut-out cell or smear image; a set "
                   "without a kind counts for both), and none when only the other kind was measured",
           "measured_by": "benchmarks/explain_localisation.py --record, or leukoscope faithfulness --record",
           **main, "methods": methods}
    if sets:
        rec["image_sets"] = sets
    return rec


@functools.lru_cache(maxsize=16)
def _read_record(path: str, mtime_ns: int) -> dict:  # read once per version of the file, not per explained image
    return json.loads(Path(path).read_text())


_WORST_FIRST = ("fails", "inconclusive", "not measured", "passes")


def method_faithfulness(model_dir, method: str, kind: str | None = None) -> dict:
    """What the model directory's record says of ``method``: ``verdict`` (``passes`` / ``fails`` / ``inconclusive`` /
    ``not measured``), the primary score, the secondary, and a sentence for a reader.

    The record can hold several image sets (its main set and ``image_sets``). With ``kind`` (of the image being
    explained, :func:`image_kind`) the verdict is the worst over the sets of that kind and the sets of no recorded
    kind; when only sets of the other kind measured the method, it is ``not measured``. Without ``kind`` it is the
    worst over all sets. The note names every set's result, those that decide the verdict first."""
    path = Path(model_dir) / RECORD_FILE if model_dir else None
    rec = _read_record(str(path), path.stat().st_mtime_ns) if path and path.is_file() else None
    if rec is not None and rec.get("weights_sha256") != weights_sha256(model_dir):
        return {"verdict": "not measured", "method": method,
                "note": f"{RECORD_FILE} in this model directory was measured on other weights; measure again "
                        "(leukoscope faithfulness HELD_OUT_IMAGES... --record)"}
    rec = rec or {}
    sets = [(rec.get("kind"), rec.get("title", ""), rec.get("methods", {}))]
    sets += [(s.get("kind"), s.get("title", name), s.get("methods", {}))
             for name, s in rec.get("image_sets", {}).items()]
    found = [(k, t, m[method]) for k, t, m in sets if method in m]
    if not found:
        return {"verdict": "not measured", "method": method, "kind": kind,
                "note": f"the faithfulness of {method} has not been measured for this model "
                        "(leukoscope faithfulness HELD_OUT_IMAGES... --record; --image-set NAME for a further kind "
                        "of image)"}
    parts, results = [], []
    for k, title, entry in found:
        p, s = (dict(x) if x else None for x in (entry.get(PRIMARY), entry.get(SECONDARY)))  # copies: cached record
        v = p["verdict"] if p else "not measured"
        what = {"passes": "beats", "fails": "is worse than", "inconclusive": "does not clearly beat"}.get(v, "?")
        where = f"{entry['n_cells']} held-out " + (title or KIND_TITLES.get(k, "cells"))
        text = (f"on {where}, {method} {what} a random map by insertion - deletion ({p['mean']:+.3f}, 95 % CI "
                f"{p['ci'][0]:+.3f} to {p['ci'][1]:+.3f})" if p else f"on {where}: no primary score")
        if s:
            text += f"; ROAD combined {s['mean']:+.3f} ({s['verdict']})"
        parts.append(text)
        # a set counts for the image when it is of the image's kind, or of no recorded kind, or the kind is unknown
        results.append({"kind": k, "title": title, "verdict": v, "primary": p, "secondary": s,
                        "n_cells": entry["n_cells"], "relevant": kind is None or k is None or k == kind})
    relevant = [r for r in results if r["relevant"]]
    if not relevant:  # measured, but only on another kind of image: no verdict for this one
        return {"verdict": "not measured", "method": method, "kind": kind, "sets": results,
                "note": f"{method} has not been measured on {KIND_TITLES.get(kind, kind)} for this model; "
                        + "; ".join(parts)}
    worst = min(relevant, key=lambda r: _WORST_FIRST.index(r["verdict"]))
    # the sets that decide the verdict first, then what was measured on the other kind of image
    note = "; ".join(t for t, r in zip(parts, results, strict=True) if r["relevant"])
    others = [t for t, r in zip(parts, results, strict=True) if not r["relevant"]]
    if others:
        note += "; measured on other images: " + "; ".join(others)
    return {"verdict": worst["verdict"], "method": method, "kind": kind, "primary": worst["primary"],
            "secondary": worst["secondary"], "n_cells": worst["n_cells"], "sets": results, "note": note}


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
