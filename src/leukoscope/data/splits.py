"""Group-aware splits: stratified train/validation/test and stratified group k-fold, saved to JSON so that every
later model uses the same split. A split is a mapping of sample (path relative to the dataset root) to a part."""

from __future__ import annotations

import json
import warnings
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from leukoscope.data.datasets import Dataset, Sample
from leukoscope.errors import SplitLeakError

HOLDOUT_PARTS = ("train", "val", "test")


@dataclass
class Split:
    """Which part each sample belongs to.

    Attributes:
        kind: ``"holdout"`` (parts train / val / test) or ``"kfold"`` (parts fold0 ... fold{k-1}; fold k is the
            test part of round k and the other folds its training data).
        parts: part name -> sample paths relative to the dataset root.
    """

    dataset: str
    target: str
    kind: str
    seed: int
    parts: dict[str, list[str]]
    params: dict = field(default_factory=dict)

    @property
    def n_folds(self) -> int:
        return len(self.parts) if self.kind == "kfold" else 0

    def part_of(self) -> dict[str, str]:
        return {p: name for name, paths in self.parts.items() for p in paths}

    def subset(self, ds: Dataset, part: str) -> Dataset:
        """The samples of ``ds`` in ``part``. Raises if the split names samples the dataset does not have."""
        if part not in self.parts:
            raise ValueError(f"split has no part {part!r}; it has {list(self.parts)}")
        by_path = {ds.relpath(s): s for s in ds.samples}
        missing = [p for p in self.parts[part] if p not in by_path]
        if missing:
            raise ValueError(
                f"split names {len(missing)} sample(s) not in dataset {ds.name!r} (root {ds.root}), "
                f"e.g. {missing[:3]}; was it made for another copy of the data?"
            )
        return ds.subset([by_path[p] for p in self.parts[part]])

    def fold(self, ds: Dataset, k: int) -> tuple[Dataset, Dataset]:
        """(train, test) of round ``k`` of a k-fold split."""
        if self.kind != "kfold":
            raise ValueError("fold() needs a k-fold split")
        test = self.subset(ds, f"fold{k}")
        test_paths = set(self.parts[f"fold{k}"])
        train = ds.subset([s for s in ds.samples if ds.relpath(s) not in test_paths and ds.relpath(s) in
                           self.part_of()])
        return train, test

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        doc = {"dataset": self.dataset, "target": self.target, "kind": self.kind, "seed": self.seed,
               "params": self.params, "sizes": {k: len(v) for k, v in self.parts.items()}, "parts": self.parts}
        path.write_text(json.dumps(doc, indent=1))
        return path

    @classmethod
    def load(cls, path: str | Path) -> Split:
        doc = json.loads(Path(path).read_text())
        for key in ("dataset", "kind", "parts"):
            if key not in doc:
                raise ValueError(f"{path} is not a leukoscope split file (no {key!r})")
        return cls(doc["dataset"], doc.get("target", ""), doc["kind"], doc.get("seed", 0), doc["parts"],
                   doc.get("params", {}))


def group_folds(labels: Sequence[Any], groups: Sequence[Any], n_splits: int, seed: int = 0,
                quiet: bool = False) -> list[tuple[np.ndarray, np.ndarray]]:
    """The one group k-fold of leukoscope: ``(train_idx, test_idx)`` per fold from scikit-learn's
    StratifiedGroupKFold (shuffled with ``seed``): no group on both sides of a fold, class ratios kept as far as the
    groups allow. Image splits, the flow subject folds and the classical models' tuning folds all come from here.

    Args:
        quiet: silence scikit-learn's warning that a class has fewer groups than folds (inner tuning folds).

    Raises:
        ValueError: fewer groups than ``n_splits``.
        SplitLeakError: a group on both sides of a fold (a guard; StratifiedGroupKFold never does it).
    """
    groups = np.asarray(groups)
    n_groups = len(np.unique(groups))
    if n_groups < n_splits:
        raise ValueError(f"cannot make {n_splits} group folds from only {n_groups} groups")
    from sklearn.model_selection import StratifiedGroupKFold  # scikit-learn takes a second to import

    cv = StratifiedGroupKFold(n_splits=n_splits, shuffle=True, random_state=seed)
    with warnings.catch_warnings():
        if quiet:
            warnings.filterwarnings("ignore", message=".*least populated class.*")
        folds = list(cv.split(np.zeros(len(labels)), np.asarray(labels), groups))
    for tr, te in folds:
        both = set(groups[tr].tolist()) & set(groups[te].tolist())
        if both:
            raise SplitLeakError(f"groups on both sides of a fold: {sorted(both)[:5]}")
    return folds


def _fold_ids(labels: list[str], groups: list[str], n_splits: int, seed: int) -> np.ndarray:
    """Fold index per sample of :func:`group_folds`."""
    fold = np.empty(len(labels), dtype=int)
    for k, (_, test) in enumerate(group_folds(labels, groups, n_splits, seed)):
        fold[test] = k
    return fold


def group_kfold(ds: Dataset, n_splits: int = 5, seed: int = 0) -> Split:
    """Stratified group k-fold over ``ds``: no group in two folds."""
    fold = _fold_ids(ds.labels, ds.groups, n_splits, seed)
    parts: dict[str, list[str]] = {f"fold{k}": [] for k in range(n_splits)}
    for s, k in zip(ds.samples, fold):
        parts[f"fold{k}"].append(ds.relpath(s))
    return Split(ds.name, ds.target, "kfold", seed, parts, {"n_splits": n_splits})


def range_parts(samples: list[Sample], test_size: float, val_size: float) -> list[str]:
    """The part of each sample that carries ``meta["range"] = (key, number, block)``: per key, the last
    ``test_size`` of the numbers (at least that share) are ``test``, the ``val_size`` before them ``val``, the rest
    ``train``. Boundaries fall on multiples of ``block``, so no block of neighbouring numbers is cut."""
    by_key: dict[str, list[int]] = defaultdict(list)
    for i, s in enumerate(samples):
        by_key[s.meta["range"][0]].append(i)
    part = ["train"] * len(samples)
    for idx in by_key.values():
        numbers = np.array(sorted(samples[i].meta["range"][1] for i in idx))
        block = samples[idx[0]].meta["range"][2]

        def edge(share: float, numbers: np.ndarray = numbers, block: int = block) -> int:
            """The highest block edge with at least ``share`` of the numbers at or above it."""
            k = max(1, int(np.ceil(share * len(numbers))))
            return int(numbers[-k] // block * block)

        test_from = edge(test_size)
        val_from = edge(test_size + val_size) if val_size > 0 else test_from
        for i in idx:
            n = samples[i].meta["range"][1]
            part[i] = "test" if n >= test_from else "val" if n >= val_from else "train"
    return part


def group_split(ds: Dataset, test_size: float = 0.2, val_size: float = 0.1, seed: int = 0) -> Split:
    """Stratified group train / validation / test split.

    ``test_size`` and ``val_size`` are fractions of the whole; they are met as closely as whole groups allow
    (one round of a stratified group k-fold with ``round(1 / size)`` folds). Samples whose loader gives them a
    number range (``meta["range"]``: aria, which has no patient ids) are held out as contiguous ranges at the end
    instead (:func:`range_parts`), as new images of such a source would be.
    """
    if not 0 < test_size < 1 or not 0 <= val_size < 1 or test_size + val_size >= 1:
        raise ValueError(f"test_size and val_size must be in (0, 1) and sum below 1, got {test_size}, {val_size}")
    ranged = [s for s in ds.samples if "range" in s.meta]
    if ranged:
        rest = ds.subset([s for s in ds.samples if "range" not in s.meta])
        parts = {"train": [], "val": [], "test": []}
        for s, part in zip(ranged, range_parts(ranged, test_size, val_size)):
            parts[part].append(ds.relpath(s))
        if len(rest):
            sub = group_split(rest, test_size, val_size, seed)
            for k in parts:
                parts[k] += sub.parts[k]
        return Split(ds.name, ds.target, "holdout", seed, parts,
                     {"test_size": test_size, "val_size": val_size, "ranges": "contiguous number ranges per class"})
    idx = np.arange(len(ds))
    fold = _fold_ids(ds.labels, ds.groups, max(2, round(1 / test_size)), seed)
    test_idx, rest = idx[fold == 0], idx[fold != 0]
    val_idx = np.array([], dtype=int)
    if val_size > 0:
        rel = val_size / (1 - test_size)
        sub = _fold_ids([ds.labels[i] for i in rest], [ds.groups[i] for i in rest], max(2, round(1 / rel)), seed + 1)
        val_idx, rest = rest[sub == 0], rest[sub != 0]
    parts = {
        "train": [ds.relpath(ds.samples[i]) for i in rest],
        "val": [ds.relpath(ds.samples[i]) for i in val_idx],
        "test": [ds.relpath(ds.samples[i]) for i in test_idx],
    }
    return Split(ds.name, ds.target, "holdout", seed, parts, {"test_size": test_size, "val_size": val_size})


def groups_on_both_sides(ds: Dataset, split: Split) -> dict[str, list[str]]:
    """Group -> the parts it appears in, for every group found in more than one part."""
    part_of = split.part_of()
    seen: dict[str, set[str]] = defaultdict(set)
    for s in ds.samples:
        part = part_of.get(ds.relpath(s))
        if part is not None:
            seen[s.group].add(part)
    return {g: sorted(p) for g, p in seen.items() if len(p) > 1}


def assert_no_leak(ds: Dataset, split: Split) -> None:
    leaks = groups_on_both_sides(ds, split)
    if leaks:
        first = list(leaks.items())[:5]
        raise SplitLeakError(f"{len(leaks)} group(s) of {ds.name!r} on both sides of the split, e.g. {first}")


def samples_of(ds: Dataset, paths: list[str]) -> list[Sample]:
    by_path = {ds.relpath(s): s for s in ds.samples}
    return [by_path[p] for p in paths]
