"""Batch prediction over files, folders and globs, with image decoding overlapped with inference."""

from __future__ import annotations

import csv
import glob
import io
import sys
from collections import deque
from collections.abc import Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from tqdm import tqdm

from leukoscope.data.images import batched, is_image_path, read_image
from leukoscope.errors import ImageReadError
from leukoscope.models.modeldir import LoadedModel, load_model


@dataclass
class Prediction:
    """One image's answer.

    Attributes:
        label: the answered class (at the model's operating threshold when it stores one).
        confidence: the calibrated probability of ``label``.
        probabilities: every class's calibrated probability.
        ood: True when the image is unlike the model's training images (its ``ood_score`` is above the threshold that
            keeps 95 % of the validation images): the class is still given, but is not to be trusted. None when the
            model has no out-of-distribution detector.
        ood_score: the detector's score (higher is more unusual), None without a detector.
        warnings: image-quality warnings (:mod:`leukoscope.preprocess.quality`), each ``(code, message)``; None
            when the checks were not run (``quality=False``).
    """

    path: str
    label: str
    confidence: float
    probabilities: dict[str, float]
    ood: bool | None = None
    ood_score: float | None = None
    warnings: list[tuple[str, str]] | None = field(default_factory=list)

    @property
    def trusted(self) -> bool:
        """False when the image was flagged as out of distribution or drew a quality warning."""
        return not self.ood and not self.warnings

    def to_dict(self) -> dict:
        return {"path": self.path, "label": self.label, "confidence": self.confidence,
                "probabilities": self.probabilities, "ood": self.ood, "ood_score": self.ood_score,
                "warnings": None if self.warnings is None else [{"code": c, "message": m} for c, m in self.warnings]}


def quality_warnings(model: LoadedModel, rgb: np.ndarray) -> list[tuple[str, str]]:
    """The model's image-quality warnings for one RGB image (none when the model stores no quality reference)."""
    ref = model.quality
    return [] if ref is None else [(w.code, w.message) for w in ref.check(rgb)]


def _answers(model: LoadedModel, names: list[str], x: np.ndarray,
             warnings: list[list[tuple[str, str]]]) -> list[Prediction]:
    proba, scores = model.proba_and_ood(x)
    out = []
    for i, (name, pr) in enumerate(zip(names, proba)):
        k = model.decide(pr)
        score = None if scores is None else float(scores[i])
        out.append(Prediction(name, model.classes[k], float(pr[k]), {c: float(v) for c, v in zip(model.classes, pr)},
                              None if score is None else bool(model.ood.flag(score)), score, warnings[i]))
    return out


def collect_paths(inputs: Iterable[str | Path]) -> tuple[list[Path], list[tuple[str, str]]]:
    """Expand files, folders (recursively, image files only) and globs; keep order, drop repeats.

    Returns:
        (paths, problems) where problems are (input, reason) for inputs that matched nothing.
    """
    paths: list[Path] = []
    problems: list[tuple[str, str]] = []
    seen: set[Path] = set()

    def add(p: Path) -> None:
        if p not in seen:
            seen.add(p)
            paths.append(p)

    for item in inputs:
        item = str(item)
        p = Path(item)
        if p.is_dir():
            found = sorted(q for q in p.rglob("*") if q.is_file() and is_image_path(q))
            if not found:
                problems.append((item, "folder holds no PNG, JPEG, TIFF or BMP files"))
            for q in found:
                add(q)
        elif p.exists():
            add(p)
        elif any(ch in item for ch in "*?["):
            matches = sorted(Path(m) for m in glob.glob(item, recursive=True) if Path(m).is_file())
            if not matches:
                problems.append((item, "pattern matched no files"))
            for q in matches:
                add(q)
        else:
            problems.append((item, "file does not exist"))
    return paths, problems


def _prepared(model: LoadedModel, paths: list[Path], workers: int, quality: bool = True,
              ) -> Iterator[tuple[Path, tuple[np.ndarray, list[tuple[str, str]] | None] | str]]:
    """Decode, check quality and preprocess in a thread pool (Pillow and OpenCV release the GIL), in input order."""

    def load(p: Path) -> tuple[np.ndarray, list[tuple[str, str]] | None] | str:
        try:
            rgb = read_image(p)
        except ImageReadError as exc:
            return exc.reason
        return model.preprocess(rgb), quality_warnings(model, rgb) if quality else None

    window = 64  # bounded read-ahead: memory stays flat however many files there are
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        pending: deque = deque()
        for p in paths:
            pending.append((p, pool.submit(load, p)))
            if len(pending) >= window:
                q, fut = pending.popleft()
                yield q, fut.result()
        while pending:
            q, fut = pending.popleft()
            yield q, fut.result()


def predict_files(model: LoadedModel | str | None, paths: list[Path], batch_size: int = 32, workers: int = 2,
                  progress: bool = False, quality: bool = True) -> tuple[list[Prediction], list[tuple[str, str]]]:
    """Predict every readable file; unreadable ones are returned as (path, reason), never fatal.

    ``quality=False`` skips the image-quality checks (about 20 ms per image on one core, more than the network
    itself): each prediction's ``warnings`` is then None, and the CSV says ``unchecked``."""
    if not isinstance(model, LoadedModel):
        model = load_model(model, kind="image")
    preds: list[Prediction] = []
    failed: list[tuple[str, str]] = []

    def readable() -> Iterator[tuple[Path, tuple[np.ndarray, list[tuple[str, str]] | None]]]:
        for path, item in tqdm(_prepared(model, paths, workers, quality), total=len(paths), desc="predicting",
                               unit="img", disable=not progress, leave=False):
            if isinstance(item, str):
                failed.append((str(path), item))
            else:
                yield path, item

    for batch in batched(readable(), batch_size):
        preds.extend(_answers(model, [str(p) for p, _ in batch], np.stack([x for _, (x, _) in batch]),
                              [w for _, (_, w) in batch]))
    return preds, failed


def write_csv(preds: list[Prediction], classes: list[str], out: str | Path | None) -> None:
    """Columns ``path,label,confidence,p_<class>...`` in the model's class order, then ``ood`` (true / false, empty
    without a detector), ``ood_score`` and ``warnings`` (quality warning codes joined by ``;``, ``unchecked`` when
    the checks were skipped); stdout if ``out`` is None."""
    buf = io.StringIO() if out is None else open(out, "w", newline="")  # noqa: SIM115
    try:
        w = csv.writer(buf)
        w.writerow(["path", "label", "confidence", *[f"p_{c}" for c in classes], "ood", "ood_score", "warnings"])
        for p in preds:
            w.writerow([p.path, p.label, f"{p.confidence:.6f}", *[f"{p.probabilities[c]:.6f}" for c in classes],
                        "" if p.ood is None else str(p.ood).lower(),
                        "" if p.ood_score is None else f"{p.ood_score:.4f}",
                        "unchecked" if p.warnings is None else ";".join(c for c, _ in p.warnings)])
        if out is None:
            sys.stdout.write(buf.getvalue())
    finally:
        buf.close()


def predict(image: str | Path | np.ndarray | bytes, model: LoadedModel | str | None = None) -> Prediction:
    """Predict one image (path, bytes or RGB array) with a model (loaded, shipped name or directory): its class,
    calibrated confidence, out-of-distribution flag and image-quality warnings."""
    if not isinstance(model, LoadedModel):
        model = load_model(model, kind="image")
    rgb = image if isinstance(image, np.ndarray) else read_image(image)
    name = "<array>" if isinstance(image, np.ndarray) else ("<bytes>" if isinstance(image, bytes) else str(image))
    return _answers(model, [name], model.prepare_batch([rgb]), [quality_warnings(model, rgb)])[0]
