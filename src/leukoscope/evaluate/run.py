"""Evaluate a model directory on a dataset (its held-out split part, or all of it)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from tqdm import tqdm

from leukoscope.data.datasets import Dataset, combine, load_dataset
from leukoscope.data.images import batched, read_readable
from leukoscope.data.splits import Split
from leukoscope.evaluate.report import evaluate_predictions
from leukoscope.models.modeldir import LoadedModel, load_model


def model_logits(model: LoadedModel, ds: Dataset, batch_size: int = 32, progress: bool = False):
    """Logits for every readable sample of ``ds``: (logits, y, samples, failures)."""
    index = {c: i for i, c in enumerate(model.classes)}
    ys, ok, failed, out = [], [], [], []
    samples = tqdm(ds.samples, desc="evaluating", unit="img", disable=not progress, leave=False)
    for batch in batched(read_readable(samples, failed, lambda s: s.path), batch_size):
        out.append(model.logits(model.prepare_batch([rgb for _, rgb in batch])))
        ys.extend(index[s.label] for s, _ in batch)
        ok.extend(s for s, _ in batch)
    logits = np.concatenate(out) if out else np.zeros((0, len(model.classes)), np.float32)
    return logits, np.array(ys, dtype=int), ok, failed


def select(model: LoadedModel, dataset: str, part: str = "test", root: str | None = None,
           split_file: str | None = None) -> Dataset:
    """The samples of ``dataset`` to evaluate ``model`` on.

    ``part`` ``all`` takes every sample; otherwise the part of the split (``split_file``, default the model's own
    ``split.json``). When the model was trained on several datasets the split covers their combination, and only
    this dataset's samples of that part are kept.
    """
    target = model.info.get("target")
    ds = load_dataset(dataset, root=root, target=target)
    missing = set(ds.classes) - set(model.classes)
    if missing:
        raise ValueError(f"dataset {dataset!r} (target {target!r}) has classes {sorted(missing)} the model "
                         f"{model.name!r} does not know: {model.classes}")
    if part == "all":
        return ds
    split_path = Path(split_file) if split_file else model.path / "split.json"
    if not split_path.exists():
        raise FileNotFoundError(f"no split file {split_path}; pass --split-file or --split all")
    split = Split.load(split_path)
    trained_on = model.info.get("datasets", [split.dataset])
    if split.dataset == dataset or len(trained_on) == 1:
        return split.subset(ds, part)
    if dataset not in trained_on:
        raise ValueError(f"model {model.name!r} was trained on {trained_on}; its split does not cover {dataset!r}. "
                         "Use --split all to evaluate on the whole dataset as external data.")
    both = combine([load_dataset(n, target=target) if n != dataset else ds for n in trained_on],
                   name=split.dataset)
    chosen = split.subset(both, part)
    keep = {s.path for s in chosen.samples if s.source == dataset}
    return ds.subset([s for s in ds.samples if s.path in keep])


def evaluate_model(model: LoadedModel | str, dataset: str, part: str = "test", out_dir: str | Path | None = None,
                   root: str | None = None, split_file: str | None = None, progress: bool = False) -> dict:
    if not isinstance(model, LoadedModel):
        model = load_model(model)
    ds = select(model, dataset, part, root, split_file)
    logits, y, samples, failed = model_logits(model, ds, progress=progress)
    res = evaluate_predictions(model.classes, y, logits, model.temperature, samples,
                               out_dir=Path(out_dir) if out_dir else None,
                               title=f"{model.name} on {dataset} ({part})")
    res["unreadable"] = [{"path": p, "reason": r} for p, r in failed]
    res["model"] = {"name": model.name, "path": str(model.path), "weights_sha256": model.info.get("weights_sha256")}
    return res


def model_parts(model: LoadedModel, root: str | None = None) -> dict[str, Dataset]:
    """The parts (train, val, test, ...) of the split a model was trained with (its ``split.json``), over every
    dataset it was trained on."""
    split_path = model.path / "split.json"
    if not split_path.exists():
        raise FileNotFoundError(f"model {model.name!r} has no split file ({split_path})")
    split = Split.load(split_path)
    target = model.info.get("target")
    names = model.info.get("datasets", [split.dataset])
    ds = (load_dataset(names[0], root=root, target=target) if len(names) == 1 else
          combine([load_dataset(n, target=target) for n in names], name=split.dataset))
    return {part: split.subset(ds, part) for part in split.parts}
