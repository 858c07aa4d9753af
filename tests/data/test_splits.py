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


def test_aria_is_held_out_as_contiguous_number_ranges_at_the_end_of_each_class(data_root):
    ds = load_dataset("aria")
    split = group_split(ds, test_size=0.2, val_size=0.15, seed=3)
    assert_no_leak(ds, split)  # boundaries on block edges: no block of 10 neighbouring numbers is cut
    part = split.part_of()
    for cls in ("Benign", "Early", "Pre", "Pro"):
        numbers = {p: s.meta["number"] for s in ds.samples if s.label == cls for p in [ds.relpath(s)]}
        by_part = {k: sorted(n for p, n in numbers.items() if part[p] == k) for k in ("train", "val", "test")}
        # train < val < test, each a contiguous range of the class's numbers
        assert by_part["train"][-1] < by_part["val"][0] and by_part["val"][-1] < by_part["test"][0]
        assert by_part["test"][-1] == max(numbers.values())
        assert len(by_part["test"]) >= 0.2 * len(numbers)
        assert len(by_part["val"]) >= 0.14 * len(numbers)
        assert by_part["test"][0] % 10 == 0 and by_part["val"][0] % 10 == 0
    # the ranges do not depend on the seed
    assert group_split(ds, 0.2, 0.15, seed=0).parts == split.parts


def test_combined_sources_keep_aria_ranges_and_other_groups_whole(data_root):
    from leukoscope.data.datasets import combine

    ds = combine([load_dataset(n, target="binary") for n in ("aria", "pbc", "all_idb2")])
    split = group_split(ds, 0.2, 0.15, seed=0)
    assert_no_leak(ds, split)
    alone = group_split(load_dataset("aria", target="binary"), 0.2, 0.15, seed=0)
    aria_test = {p for p in split.parts["test"] if p.startswith("all_aria/")}
    assert aria_test == {f"all_aria/{p}" for p in alone.parts["test"]}
    pbc_test = [p for p in split.parts["test"] if p.startswith("pbc/")]
    assert 0.15 * 1200 <= len(pbc_test) <= 0.25 * 1200


def test_one_group_kfold_behind_every_caller() -> None:
    """Image splits, flow subject folds and the classical models' tuning folds are the same group_folds."""
    from leukoscope.data.splits import group_folds
    from leukoscope.flow.classifier import subject_folds
    from leukoscope.research.classical import inner_group_splits

    rng = np.random.default_rng(0)
    groups = np.repeat([f"p{i}" for i in range(12)], 5)
    y = np.repeat(rng.permutation([0, 1] * 6), 5)
    folds = group_folds(y, groups, 4, seed=3)
    assert sorted(np.concatenate([te for _, te in folds]).tolist()) == list(range(len(y)))
    for tr, te in folds:
        assert not set(groups[tr]) & set(groups[te])
        assert set(y[te]) == {0, 1}  # stratified: both classes in every test fold
    for other in (subject_folds(y, groups, 4, 3), inner_group_splits(y, groups, 4, 3)):
        assert all(np.array_equal(a[1], b[1]) for a, b in zip(folds, other, strict=True))
    with pytest.raises(ValueError, match="only 12 groups"):
        group_folds(y, groups, 13)
