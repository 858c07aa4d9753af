"""Batch prediction over files, folders and globs, with image decoding overlapped with inference."""

from __future__ import annotations

import csv
import glob
import io
import sys
from collections import deque
from collections.abc import Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm import tqdm

from leukoscope.data.images import is_image_path, read_image
from leukoscope.errors import ImageReadError
from leukoscope.models.modeldir import LoadedModel, load_model


@dataclass
class Prediction:
    path: str
    label: str
    confidence: float
    probabilities: dict[str, float]


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


def _prepared(model: LoadedModel, paths: list[Path], workers: int) -> Iterator[tuple[Path, np.ndarray | str]]:
    """Decode + preprocess in a thread pool (Pillow and OpenCV release the GIL), in input order."""

    def load(p: Path) -> np.ndarray | str:
        try:
            return model.preprocess(read_image(p))
        except ImageReadError as exc:
            return exc.reason

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
                  progress: bool = False) -> tuple[list[Prediction], list[tuple[str, str]]]:
    """Predict every readable file; unreadable ones are returned as (path, reason), never fatal."""
    if not isinstance(model, LoadedModel):
        model = load_model(model)
    preds: list[Prediction] = []
    failed: list[tuple[str, str]] = []
    batch_x: list[np.ndarray] = []
    batch_p: list[Path] = []

    def flush() -> None:
        if not batch_x:
            return
        from leukoscope.models.modeldir import softmax

        proba = softmax(model.logits(np.stack(batch_x)) / model.temperature)
        for p, pr in zip(batch_p, proba):
            k = model.decide(pr)
            preds.append(Prediction(str(p), model.classes[k], float(pr[k]),
                                    {c: float(v) for c, v in zip(model.classes, pr)}))
        batch_x.clear()
        batch_p.clear()

    for path, x in tqdm(_prepared(model, paths, workers), total=len(paths), desc="predicting", unit="img",
                        disable=not progress, leave=False):
        if isinstance(x, str):
            failed.append((str(path), x))
            continue
        batch_x.append(x)
        batch_p.append(path)
        if len(batch_x) >= batch_size:
            flush()
    flush()
    return preds, failed


def write_csv(preds: list[Prediction], classes: list[str], out: str | Path | None) -> None:
    """Columns exactly ``path,label,confidence,p_<class>...`` in the model's class order (stdout if ``out`` is None)."""
    buf = io.StringIO() if out is None else open(out, "w", newline="")  # noqa: SIM115
    try:
        w = csv.writer(buf)
        w.writerow(["path", "label", "confidence", *[f"p_{c}" for c in classes]])
        for p in preds:
            w.writerow([p.path, p.label, f"{p.confidence:.6f}", *[f"{p.probabilities[c]:.6f}" for c in classes]])
        if out is None:
            sys.stdout.write(buf.getvalue())
    finally:
        buf.close()


def predict(image: str | Path | np.ndarray | bytes, model: LoadedModel | str | None = None) -> Prediction:
    """Predict one image (path, bytes or RGB array) with a model (loaded, shipped name or directory)."""
    if not isinstance(model, LoadedModel):
        model = load_model(model)
    rgb = image if isinstance(image, np.ndarray) else read_image(image)
    proba = model.predict_arrays([rgb])[0]
    k = model.decide(proba)
    name = "<array>" if isinstance(image, np.ndarray) else ("<bytes>" if isinstance(image, bytes) else str(image))
    return Prediction(name, model.classes[k], float(proba[k]), {c: float(v) for c, v in zip(model.classes, proba)})
