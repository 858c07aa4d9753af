"""The faithfulness record a model directory carries (``faithfulness.json``): what ``leukoscope faithfulness
--record`` measured for each heatmap method, per kind of image, and what ``explain`` reports with every heatmap.

Reading it needs neither PyTorch nor the measurement code (:mod:`leukoscope.research.faithfulness`).
"""

from __future__ import annotations

import functools
import hashlib
import json
from pathlib import Path

import numpy as np

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
