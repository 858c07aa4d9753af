"""No group on both sides of any split the library makes; k-fold folds near-equal in size and class ratio."""

from __future__ import annotations

import numpy as np
import pytest

from leukoscope.data.datasets import load_dataset
from leukoscope.data.splits import Split, assert_no_leak, group_kfold, group_split, groups_on_both_sides
from leukoscope.errors import SplitLeakError

SPLIT_DATASETS = [("cnmc2019", None), ("aria", None), ("aria", "binary"), ("all_idb2", None), ("deepapl", None),
                  ("deepapl", "diagnosis"), ("all_idb1", None), ("bccd", None)]


@pytest.mark.parametrize("name,target", SPLIT_DATASETS)
def test_holdout_and_kfold_never_cut_a_group(name, target, data_root):
    ds = load_dataset(name, target=target)
    for seed in (0, 1):
        split = group_split(ds, test_size=0.2, val_size=0.15 if len(set(ds.groups)) > 10 else 0.0, seed=seed)
        assert groups_on_both_sides(ds, split) == {}
        assert sum(len(v) for v in split.parts.values()) == len(ds)
        k = min(5, len(set(ds.groups)))
        assert groups_on_both_sides(ds, group_kfold(ds, k, seed)) == {}


@pytest.mark.parametrize("name,target,size_tol,ratio_tol", [
    ("aria", None, 0.05, 0.05), ("all_idb2", None, 0.05, 0.08), ("deepapl", "diagnosis", 0.25, 0.10),
])
def test_kfold_sizes_and_class_ratios_within_tolerance(name, target, size_tol, ratio_tol, data_root):
    ds = load_dataset(name, target=target)
    split = group_kfold(ds, 5, seed=0)
    sizes = np.array([len(v) for v in split.parts.values()])
    assert np.all(np.abs(sizes / sizes.mean() - 1) <= size_tol), sizes
    overall = np.array(list(ds.class_counts().values())) / len(ds)
    for part in split.parts:
        sub = split.subset(ds, part)
        ratio = np.array(list(sub.class_counts().values())) / len(sub)
        assert np.all(np.abs(ratio - overall) <= ratio_tol), (part, ratio, overall)


def test_holdout_fractions(data_root):
    ds = load_dataset("aria")
    split = group_split(ds, test_size=0.2, val_size=0.1, seed=0)
    n = len(ds)
    assert abs(len(split.parts["test"]) / n - 0.2) < 0.03
    assert abs(len(split.parts["val"]) / n - 0.1) < 0.03


def test_split_is_seeded_and_round_trips(tmp_path, data_root):
    ds = load_dataset("all_idb2")
    a, b = group_split(ds, seed=3), group_split(ds, seed=3)
    assert a.parts == b.parts
    assert group_split(ds, seed=4).parts != a.parts
    path = a.save(tmp_path / "split.json")
    c = Split.load(path)
    assert c.parts == a.parts and c.dataset == "all_idb2" and c.kind == "holdout"
    train, test = group_kfold(ds, 5, 0).fold(ds, 2)
    assert len(train) + len(test) == len(ds) and not set(train.groups) & set(test.groups)


def test_leak_is_detected(data_root):
    ds = load_dataset("all_idb2")
    split = group_split(ds, seed=0)
    moved = split.parts["test"].pop()
    split.parts["train"].append(moved)
    with pytest.raises(SplitLeakError, match="on both sides"):
        assert_no_leak(ds, split)


def test_split_naming_unknown_samples_is_refused(data_root):
    ds = load_dataset("all_idb2")
    split = group_split(ds, seed=0)
    split.parts["test"].append("ALL_IDB2/img/Im999_1.tif")
    with pytest.raises(ValueError, match="not in dataset 'all_idb2'"):
        split.subset(ds, "test")
