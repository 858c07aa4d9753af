"""Each loader's counts equal the counts in its DATA.md (after the documented exclusions)."""

from __future__ import annotations

from collections import Counter

import pytest

from leukoscope.data.datasets import (
    DATA_ROOT_ENV,
    combine,
    groups_by_class,
    list_datasets,
    load_dataset,
)
from leukoscope.errors import DatasetNotFoundError


def test_registry_lists_every_dataset():
    assert set(list_datasets()) >= {"cnmc2019", "aria", "all_idb2", "all_idb1", "deepapl", "bccd", "folder", "manifest"}


def test_unknown_dataset_suggests_the_closest_name():
    with pytest.raises(ValueError, match=r"Unknown dataset 'ariaa'. Did you mean 'aria'\? Available: \["):
        load_dataset("ariaa")


def test_cnmc2019_counts_and_subject_groups(data_root):
    ds = load_dataset("cnmc2019")
    assert ds.class_counts() == {"healthy": 62, "leukemic": 176}
    subjects = {c: len({s.meta["subject"] for s in ds.samples if s.label == c}) for c in ds.classes}
    assert subjects == {"healthy": 22, "leukemic": 37}  # DATA.md: 22 healthy, 37 ALL subjects ('h3' is 'H3')
    # subjects sharing byte-identical images in the original release form one group
    assert {s.group for s in ds.samples if s.meta["subject"] in ("51", "78")} == {"51"}
    assert {s.group for s in ds.samples if s.meta["subject"] in ("H2", "H4", "H5", "H6")} == {"H2"}
    assert len(set(ds.groups)) == 54


def test_aria_counts_and_neighbour_blocks(data_root):
    ds = load_dataset("aria")
    assert ds.class_counts() == {"Benign": 404, "Early": 410, "Pre": 410, "Pro": 410}
    assert ds.with_target("binary").class_counts() == {"healthy": 404, "leukemic": 1230}
    by_num = {(s.label, s.meta["number"]): s.group for s in ds.samples}
    # near-duplicate pairs listed in DATA.md land in one group
    for cls, a, b in [("Benign", 291, 294), ("Benign", 316, 318), ("Early", 154, 155), ("Pre", 24, 27),
                      ("Pro", 3, 5), ("Pro", 7, 8)]:
        assert by_num[(cls, a)] == by_num[(cls, b)]
    # the 40 exact duplicates in Pro are not in this copy; none of their numbers shows up
    assert not {n for (c, n) in by_num if c == "Pro"} & {12, 18, 20, 189}


def test_all_idb2_counts_groups_and_duplicate(data_root):
    ds = load_dataset("all_idb2")
    assert ds.class_counts() == {"healthy": 129, "leukemic": 130}  # 260 minus Im257_0 (same pixels as Im223_0)
    assert [p.endswith("Im257_0.tif") for p, _ in ds.excluded] == [True]
    assert len(set(ds.groups)) == 102  # the crops come from 102 source fields
    groups = {s.path.stem: s.group for s in ds.samples}
    assert groups["Im004_1"] == groups["Im003_1"] == "Im003_1"
    sizes = Counter()
    from PIL import Image

    for s in ds.samples:
        with Image.open(s.path) as im:
            sizes[im.size != (257, 257)] += 1
    assert sizes[True] == 10  # the ten odd-sized crops cut at the field border


def test_all_idb1_fields_annotations(data_root):
    ds = load_dataset("all_idb1")
    assert ds.kind == "fields" and ds.class_counts() == {"healthy": 19, "leukemic": 35}
    blasts = {s.path.stem: len(s.meta["blasts"]) for s in ds.samples}
    assert [blasts[k] for k in ("Im001_1", "Im003_1", "Im004_1", "Im005_1", "Im006_1")] == [8, 11, 6, 23, 15]
    assert all(blasts[s.path.stem] == 0 for s in ds.samples if s.label == "healthy")
    assert sum(s.meta["wbc_mask"] is not None for s in ds.samples) == 10


def test_deepapl_counts_patients_and_diagnosis(data_root):
    ds = load_dataset("deepapl")
    assert len(ds) == 3309 and len(ds.classes) == 15
    assert len(set(ds.groups)) == 82
    diag = ds.with_target("diagnosis")
    patients = {c: len({s.group for s in diag.samples if s.label == c}) for c in diag.classes}
    assert patients == {"AML": 60, "APL": 22}
    # the cell type is the folder that holds the file, also for patients with an extra slide-id level
    assert all(s.path.parent.name == s.label for s in ds.samples)


def test_bccd_counts_and_boxes(data_root):
    ds = load_dataset("bccd")
    assert len(ds) == 364
    wbc = sum(b["name"] == "WBC" for s in ds.samples for b in s.meta["boxes"])
    rbc = sum(b["name"] == "RBC" for s in ds.samples for b in s.meta["boxes"])
    assert (wbc, rbc) == (372, 4155)
    assert Counter(s.meta["official_split"] for s in ds.samples) == {"train": 205, "val": 87, "test": 72}


def test_groups_per_class(data_root):
    assert groups_by_class(load_dataset("all_idb2")) == {"healthy": 58, "leukemic": 44}


def test_combine_prefixes_groups(data_root):
    both = combine([load_dataset("aria", target="binary"), load_dataset("all_idb2")])
    assert len(both) == 1634 + 259
    assert all(s.group.startswith(s.source + "/") for s in both.samples)


def test_root_from_environment_and_missing_root(tmp_path, monkeypatch, data_root):
    monkeypatch.setenv(DATA_ROOT_ENV, str(data_root))
    assert len(load_dataset("all_idb2")) == 259
    with pytest.raises(DatasetNotFoundError, match="does not exist"):
        load_dataset("aria", root=tmp_path / "nowhere")


def test_folder_and_manifest_loaders(tmp_path, data_root):
    import shutil

    src = load_dataset("all_idb2").samples
    for s in src[:3] + src[-3:]:
        d = tmp_path / "folder" / s.label / f"field_{s.group}"
        d.mkdir(parents=True, exist_ok=True)
        shutil.copy(s.path, d)
    ds = load_dataset("folder", root=tmp_path / "folder")
    assert ds.class_counts() == {"healthy": 3, "leukemic": 3}
    assert {s.group for s in ds.samples} == {f"field_{s.group}" for s in src[:3] + src[-3:]}

    csv_path = tmp_path / "manifest.csv"
    csv_path.write_text("path,label,patient,stain\n" + "".join(
        f"{s.path},{s.label},P{i // 2},mgg\n" for i, s in enumerate(src[:4])))
    man = load_dataset("manifest", root=csv_path)
    assert len(man) == 4 and set(man.groups) == {"P0", "P1"} and man.samples[0].labels["stain"] == "mgg"
    bad = tmp_path / "bad.csv"
    bad.write_text("path,label\nx.png,a\n")
    with pytest.raises(ValueError, match=r"lacks column\(s\) \['patient'\]"):
        load_dataset("manifest", root=bad)


def test_pbc_normal_cells_of_every_type(data_root):
    ds = load_dataset("pbc")
    assert len(ds) == 1200 and set(ds.class_counts().values()) == {150}
    assert len(set(ds.groups)) == 1200  # no donor ids: each image its own group
    binary = ds.with_target("binary")
    assert binary.classes == ["healthy", "leukemic"] and binary.class_counts() == {"healthy": 1200, "leukemic": 0}
    types = ds.with_target("cell_type")  # ig (mixed immature granulocytes) and platelets map to no DeepAPL type
    assert len(types) == 900 and len(types.excluded) == 300
    assert set(types.classes) <= set(load_dataset("deepapl").classes)


def test_deepapl_binary_labels_leave_out_ambiguous_types(data_root):
    ds = load_dataset("deepapl")
    binary = ds.with_target("binary")
    counts = Counter(s.labels["cell_type"] for s in binary.samples if s.label == "leukemic")
    assert set(counts) == {"Blast, no lineage spec", "Promonocyte"}
    left = Counter(s.labels["cell_type"] for s in ds.samples if s.labels["binary"] is None)
    assert set(left) == {"Promyelocyte", "Lymphocyte, variant", "Smudge cells", "Plasma cells"}
    assert len(binary) + sum(left.values()) == len(ds) and len(binary.excluded) == sum(left.values())
    assert all("promyelocyte" in why for p, why in binary.excluded if "Promyelocyte" in p)
