"""Fit what tells a user when not to trust a model: its out-of-distribution detector (``ood.npz``) and its
image-quality reference (``quality.json``), from the training and validation parts of its own split.

Training writes both at the end (:func:`leukoscope.train.trainer.write_model`); ``leukoscope ood --model DIR`` fits
them for a model directory trained before, or again with another method.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np

from leukoscope.data.datasets import Dataset
from leukoscope.data.images import read_readable
from leukoscope.models.modeldir import LoadedModel, load_model
from leukoscope.models.ood import DEFAULT_METHOD, KEEP, OOD_FILE, fit_model_detector

log = logging.getLogger(__name__)


def _readable(ds: Dataset, total: int, seed: int) -> list[np.ndarray]:
    """About ``total`` images of ``ds`` drawn at random, the same number from each source (``total / sources``, or
    all of a smaller source), as RGB arrays (unreadable ones skipped)."""
    rng = np.random.default_rng(seed)
    by_source: dict[str, list] = {}
    for s in ds.samples:
        by_source.setdefault(s.source, []).append(s)
    per_source = -(-total // max(1, len(by_source)))
    samples = []
    for src in sorted(by_source):
        group = by_source[src]
        samples += [group[i] for i in sorted(rng.permutation(len(group))[:per_source])]
    failed: list[tuple[str, str]] = []
    out = [rgb for _, rgb in read_readable(samples, failed, lambda s: s.path)]
    for path, reason in failed:
        log.warning("quality reference: skipping %s (%s)", path, reason)
    return out


def fit_trust(model: LoadedModel | str | Path, parts: dict[str, Dataset] | None = None, method: str = DEFAULT_METHOD,
              keep: float = KEEP, max_train: int = 4000, quality_images: int = 750,
              calibration_images: int = 400, seed: int = 0,
              progress: bool = False) -> dict[str, Any]:
    """Fit and save the detector and the quality reference of ``model``'s directory.

    Args:
        parts: the split's parts (``train``, ``val``); default: read from the model's ``split.json``.
        method: the out-of-distribution score (:data:`leukoscope.models.ood.OOD_METHODS`).
        keep: the share of validation images the threshold leaves unflagged.
        max_train: at most this many training images (drawn at random) fit the detector.
        quality_images: about this many training images fit the quality reference, and ``calibration_images``
            validation images set its margins (other patients); each source gives the same share (a model of five
            sources: 150 and 80 of each; of one source: all 750 and 400 from it, as far as it has them).

    Returns:
        What was fitted: method, threshold, counts, and the validation share flagged.
    """
    if not isinstance(model, LoadedModel):
        model = load_model(model)
    if parts is None:
        from leukoscope.evaluate.run import model_parts

        parts = model_parts(model)
    det = fit_model_detector(model, parts["train"], parts["val"], method, keep, max_train, seed, progress)
    if "test" in parts:
        det.meta["test"] = flagged_accuracy(model, det, parts["test"], progress)
    det.save(model.path / OOD_FILE)
    model._ood = det
    from leukoscope.preprocess.quality import MIN_CALIBRATION, QUALITY_FILE, QualityReference

    calibration = _readable(parts["val"], calibration_images, seed + 1)
    if len(calibration) < MIN_CALIBRATION:  # too few to set the margins: the training images set them themselves
        log.info("quality reference: %d validation images are too few to calibrate on", len(calibration))
        calibration = None
    ref = QualityReference.fit(_readable(parts["train"], quality_images, seed), progress=progress,
                               calibration=calibration)
    ref.save(model.path / QUALITY_FILE)
    model._quality = ref
    write_trust_section(model.path)
    return {"method": det.method, "threshold": det.threshold, "keep": keep, "n_fit": det.meta["n_fit"],
            "n_val": det.meta["n_val"], "test": det.meta.get("test"),
            "quality_images": len(ref.stats)}


def flagged_accuracy(model: LoadedModel, det: Any, part: Dataset, progress: bool = False) -> dict[str, Any]:
    """On a held-out part: the share flagged, and the accuracy of all answers, of the unflagged and of the flagged."""
    from leukoscope.models.modeldir import softmax
    from leukoscope.models.ood import embed_images

    index = {c: i for i, c in enumerate(model.classes)}
    z, f, ok, _ = embed_images(model, [s.path for s in part.samples], progress=progress, desc="OOD: test part")
    y = np.array([index[part.samples[i].label] for i in ok], int)
    answer = np.array([model.decide(p) for p in softmax(z / model.temperature)], int)
    flagged = det.flag(det.score(f, z))
    right = answer == y

    def acc(mask: np.ndarray) -> float | None:
        return float(right[mask].mean()) if mask.any() else None

    return {"n": int(len(y)), "flagged": float(flagged.mean()) if len(y) else None,
            "accuracy_all": acc(np.ones(len(y), bool)), "accuracy_unflagged": acc(~flagged),
            "accuracy_flagged": acc(flagged)}


TRUST_TITLE = "## When not to trust an answer"
SHIFTS_FILE = "ood_shifts.json"


def trust_section(model_dir: Path) -> list[str]:
    """The model card's section on the out-of-distribution flag and the quality warnings, from what is stored in the
    model directory (``ood.npz``, and ``ood_shifts.json`` when ``benchmarks/ood_shifts.py --card`` measured it)."""
    import json

    from leukoscope.models.ood import OODDetector

    path = model_dir / OOD_FILE
    if not path.exists():
        return []
    det = OODDetector.load(path)
    lines = [TRUST_TITLE,
             f"Every answer carries an out-of-distribution score (`{det.method}` on the network's embeddings, fitted "
             f"on {det.meta.get('n_fit')} training images) and a flag `ood` when the score is above "
             f"{det.threshold:.3f}, the level that leaves {det.meta.get('keep', KEEP):.0%} of the "
             f"{det.meta.get('n_val')} validation images "
             "unflagged. A flagged image still gets its class: the flag says not to trust it. Image-quality warnings "
             "(focus, exposure, stain colour, cell size, a whole field given to this single-cell model) come with "
             "the answer too (`quality.json`).", ""]
    test = det.meta.get("test")
    if test and test.get("n"):
        def pct(v: float | None) -> str:
            return "-" if v is None else f"{v:.3f}"

        lines += ["| held-out test part | n | flagged | accuracy of all | unflagged | flagged |",
                  "|---|---|---|---|---|---|",
                  f"| this model's test part | {test['n']} | {test['flagged']:.1%} | {pct(test['accuracy_all'])} | "
                  f"{pct(test['accuracy_unflagged'])} | {pct(test['accuracy_flagged'])} |", ""]
    shifts_path = model_dir / SHIFTS_FILE
    if shifts_path.exists():
        sh = json.loads(shifts_path.read_text())
        m = det.method
        lines += ["What the flag catches and misses (`benchmarks/ood_shifts.py`; AUROC of the score against this "
                  "model's test part, and the share flagged):", "",
                  "| shift | n | AUROC | flagged |", "|---|---|---|---|"]
        for name, row in sh.get("shifts", {}).items():
            if m in row:
                lines.append(f"| {name.replace('_', ' ')} | {row[m]['n']} | {row[m]['auroc']:.3f} | "
                             f"{row[m]['flagged']:.1%} |")
        for src, row in sh.get("held_out_sources", {}).items():
            if m in row:
                s = row[m]["selective"]
                unflagged = "no answer" if s["accuracy_unflagged"] is None else f"{s['accuracy_unflagged']:.3f}"
                lines.append(f"| {src} held out (a model trained without it; accuracy {s['accuracy_all']:.3f} of "
                             f"all, {unflagged} unflagged) | {row[m]['n']} | "
                             f"{row[m]['auroc']:.3f} | {row[m]['flagged']:.1%} |")
        rows = {name.replace("_", " "): row[m] for name, row in sh.get("shifts", {}).items() if m in row}
        rows |= {f"{src} held out": row[m] for src, row in sh.get("held_out_sources", {}).items() if m in row}
        caught = [k for k, r in rows.items() if r["flagged"] >= 0.9]
        missed = [k for k, r in rows.items() if r["flagged"] < 0.5]
        lines += ["", f"It catches (90% or more flagged): {', '.join(caught) or 'none of these'}. "
                      f"It misses (under half flagged): {', '.join(missed) or 'none of these'}; there the answer "
                      "comes without a flag, and only the quality warnings (below) and the lab's own checks "
                      "stand between it and the user."]
        wq = sh.get("with_quality")
        if wq and wq.get("method") == m:
            lines += ["", "Flagged or given an image-quality warning (either tells the user not to trust the answer): "
                      f"{wq['test_part']['flagged_or_warned']:.1%} of the test part; " + ", ".join(
                          f"{name.replace('_', ' ')} {r['flagged_or_warned']:.0%}" for name, r in wq["shifts"].items())
                      + "."]
        lines.append("")
    return lines


def write_trust_section(model_dir: Path) -> None:
    """Put :func:`trust_section` into the directory's MODEL_CARD.md, in place of an earlier one (before "## Intended
    use" when it has none)."""
    card = model_dir / "MODEL_CARD.md"
    section = trust_section(model_dir)
    if not card.exists() or not section:
        return
    lines = card.read_text().splitlines()
    if TRUST_TITLE in lines:
        start = lines.index(TRUST_TITLE)
        end = next((i for i in range(start + 1, len(lines)) if lines[i].startswith("## ")), len(lines))
        lines[start:end] = section
    else:
        at = lines.index("## Intended use") if "## Intended use" in lines else len(lines)
        lines[at:at] = section
    card.write_text("\n".join(lines) + "\n")
