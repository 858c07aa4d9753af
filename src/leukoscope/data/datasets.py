"""Dataset registry and loaders. Every sample knows its path, label(s), group and source.

The *group* is what a split must never cut: the subject (C-NMC), the patient (DeepAPL), the source field
(ALL-IDB2), blocks of neighbouring image numbers (Aria, which has no patient ids), the image itself where nothing
better is known (BCCD). Known traps in the published data are handled here, not left to the user.
"""

from __future__ import annotations

import csv
import os
import re
from collections import Counter, defaultdict
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from leukoscope._registry import Registry
from leukoscope.data._all_idb import CROP_TO_FIELD, FIELD_ALIASES
from leukoscope.data.images import is_image_path
from leukoscope.errors import DatasetNotFoundError

HEALTHY, LEUKEMIC = "healthy", "leukemic"
BINARY_CLASSES = (HEALTHY, LEUKEMIC)

DATA_ROOT_ENV = "LEUKOSCOPE_DATA_ROOT"
# Class names that mean "not abnormal" (lower case): what the field scanner and cam_mask treat as normal.
NORMAL_CLASS_NAMES = ("healthy", "normal", "hem", "benign", "non-blast", "non_blast", "no_blast", "negative")


@dataclass(frozen=True)
class Sample:
    """One image (a single cell or a whole field) with everything a split or a metric needs."""

    path: Path
    label: str
    group: str
    source: str
    labels: Mapping[str, str] = field(default_factory=dict)
    meta: Mapping[str, Any] = field(default_factory=dict)


@dataclass
class Dataset:
    """A list of samples plus what they mean.

    Attributes:
        name: registry name, e.g. ``"aria"``.
        root: the folder the files were read from.
        target: which of each sample's ``labels`` is its ``label`` (e.g. ``"binary"`` or ``"subtype"``).
        classes: class names in model order.
        kind: ``"cells"`` (one cell per image) or ``"fields"`` (whole smear fields).
        group_by: what a group is, in words.
        excluded: files left out on purpose, each with the reason (documented duplicates and the like).
    """

    name: str
    root: Path
    samples: list[Sample]
    classes: list[str]
    target: str
    kind: str = "cells"
    group_by: str = "group"
    excluded: list[tuple[str, str]] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.samples)

    @property
    def labels(self) -> list[str]:
        return [s.label for s in self.samples]

    @property
    def groups(self) -> list[str]:
        return [s.group for s in self.samples]

    @property
    def label_indices(self) -> list[int]:
        index = {c: i for i, c in enumerate(self.classes)}
        return [index[s.label] for s in self.samples]

    def relpath(self, sample: Sample) -> str:
        try:
            return sample.path.relative_to(self.root).as_posix()
        except ValueError:
            return sample.path.as_posix()

    def subset(self, samples: list[Sample]) -> Dataset:
        return replace(self, samples=list(samples), excluded=list(self.excluded))

    def class_counts(self) -> dict[str, int]:
        counts = Counter(self.labels)
        return {c: counts.get(c, 0) for c in self.classes}

    def with_target(self, target: str) -> Dataset:
        """The same samples labelled by another of their labels (e.g. ``"binary"`` instead of ``"subtype"``).

        A sample whose label for ``target`` is ``None`` has no answer for it (e.g. a smudge cell for ``binary``): it
        is left out and listed in ``excluded`` with the reason its loader gave (``meta["why_no_<target>"]``).
        """
        missing = [s for s in self.samples if target not in s.labels]
        if missing:
            have = sorted(self.samples[0].labels) if self.samples else []
            raise ValueError(f"dataset {self.name!r} has no target {target!r}; its targets are {have}")
        kept = [s for s in self.samples if s.labels[target] is not None]
        left_out = [(str(s.path), s.meta.get(f"why_no_{target}", f"no {target} label"))
                    for s in self.samples if s.labels[target] is None]
        samples = [replace(s, label=s.labels[target]) for s in kept]
        classes = _class_order(target, [s.label for s in samples])
        return replace(self, samples=samples, classes=classes, target=target, excluded=self.excluded + left_out)


_DATASETS: Registry[Callable[..., Dataset]] = Registry("dataset")
DEFAULT_FOLDERS: dict[str, str] = {}


def register_dataset(name: str, folder: str | None = None) -> Callable:
    """Register a loader ``fn(root: Path, **options) -> Dataset`` under ``name``; ``folder`` is its default location."""

    def wrap(fn: Callable[..., Dataset]) -> Callable[..., Dataset]:
        if folder:
            DEFAULT_FOLDERS[name] = folder
        return _DATASETS.register(name)(fn)

    return wrap


def list_datasets() -> list[str]:
    return _DATASETS.names()


def project_root() -> Path:
    """The checkout this package runs from (``src/leukoscope/data/..`` up three)."""
    return Path(__file__).resolve().parents[3]


def data_root_candidates() -> list[Path]:
    """Where datasets are looked for, in order: $LEUKOSCOPE_DATA_ROOT, ../shared/data beside the project or cwd."""
    out = []
    if os.environ.get(DATA_ROOT_ENV):
        out.append(Path(os.environ[DATA_ROOT_ENV]).expanduser())
    out.append(project_root().parent / "shared" / "data")
    out.append(Path.cwd().parent / "shared" / "data")
    return out


def default_root(name: str) -> Path:
    """The folder dataset ``name`` is read from when no root is given."""
    folder = DEFAULT_FOLDERS.get(name)
    if folder is None:
        raise DatasetNotFoundError(f"dataset {name!r} has no default location; pass --root DIR")
    candidates = [base / folder for base in data_root_candidates()]
    for cand in candidates:
        if cand.is_dir():
            return cand
    looked = ", ".join(str(c) for c in candidates)
    raise DatasetNotFoundError(
        f"dataset {name!r} not found; looked in: {looked}. Pass --root DIR or set ${DATA_ROOT_ENV} to the folder "
        f"that holds '{folder}/'."
    )


def load_dataset(name: str, root: str | Path | None = None, target: str | None = None, **options: Any) -> Dataset:
    """Load a registered dataset.

    Args:
        name: one of :func:`list_datasets`.
        root: the dataset folder; defaults to ``../shared/data/<folder>`` or ``$LEUKOSCOPE_DATA_ROOT/<folder>``.
        target: which label to classify (``"binary"``, ``"subtype"``, ``"cell_type"``, ``"diagnosis"``).
        options: loader-specific options (e.g. ``path`` for ``manifest``).
    """
    loader = _DATASETS.get(name)
    if root is None and name in DEFAULT_FOLDERS:
        root = default_root(name)
    if root is None:
        raise DatasetNotFoundError(f"dataset {name!r} needs a root folder (--root DIR)")
    root = Path(root).expanduser()
    if not root.exists():
        raise DatasetNotFoundError(f"dataset {name!r}: root {root} does not exist")
    ds = loader(root, **options)
    if not ds.samples:
        raise DatasetNotFoundError(f"dataset {name!r}: no images found under {root}")
    if target is not None and target != ds.target:
        ds = ds.with_target(target)
    return ds


def _class_order(target: str, labels: list[str]) -> list[str]:
    if target == "binary":
        return list(BINARY_CLASSES)
    return sorted(set(labels))


def _images_under(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*") if p.is_file() and is_image_path(p))


def _require_dir(path: Path, what: str) -> Path:
    if not path.is_dir():
        raise DatasetNotFoundError(f"{what}: expected folder {path} is missing")
    return path


# --------------------------------------------------------------------------------------------------------------
# C-NMC 2019
# --------------------------------------------------------------------------------------------------------------
# Byte-identical images exist under different subject ids in the original release (DATA.md): such subjects are
# probably one person, so they form one group.
CNMC_SUBJECT_MERGES = {"21": "20", "75": "51", "78": "51", "H4": "H2", "H5": "H2", "H6": "H2", "H3": "H10"}
_CNMC_NAME = re.compile(r"^UID_(?P<subject>[Hh]?\d+)_(?P<image>\d+)_(?P<cell>\d+)_(?P<label>all|hem)$")


@register_dataset("cnmc2019", folder="cnmc2019")
def _load_cnmc(root: Path) -> Dataset:
    samples = []
    for path in _images_under(root):
        m = _CNMC_NAME.match(path.stem)
        if not m:
            continue
        subject = m["subject"].upper()  # 'h3' and 'H3' are one subject
        label = LEUKEMIC if m["label"] == "all" else HEALTHY
        group = CNMC_SUBJECT_MERGES.get(subject, subject)
        samples.append(
            Sample(
                path, label, group, "cnmc2019",
                labels={"binary": label},
                meta={"subject": subject, "fold": path.parts[-3]},
            )
        )
    return Dataset("cnmc2019", root, samples, list(BINARY_CLASSES), "binary",
                   group_by="subject (subjects sharing byte-identical images merged)")


# --------------------------------------------------------------------------------------------------------------
# Aria et al. ALL (Benign / Early / Pre / Pro)
# --------------------------------------------------------------------------------------------------------------
ARIA_BLOCK = 10
ARIA_CLASSES = ("Benign", "Early", "Pre", "Pro")
_ARIA_NAME = re.compile(r"^WBC-(?:Benign|Malignant-(?:Early|Pre|Pro))-(\d+)$")
# Byte-identical later copies in Pro (DATA.md); a complete download still has them, this loader drops them.
ARIA_PRO_DUPLICATES = (12, 18, 20, 22, 27, 30, 38, 51, 62, 75, 78, 80, 84, 90, 92, 96, 98, 103, 105, 107, 113, 115,
                       118, 123, 129, 131, 133, 135, 137, 143, 146, 152, 155, 158, 169, 171, 173, 178, 182, 189)


@register_dataset("aria", folder="all_aria")
def _load_aria(root: Path) -> Dataset:
    base = root / "Original" if (root / "Original").is_dir() else root
    samples, excluded = [], []
    for cls in ARIA_CLASSES:
        for path in _images_under(_require_dir(base / cls, "aria")):
            m = _ARIA_NAME.match(path.stem)
            if not m:
                continue
            number = int(m[1])
            if cls == "Pro" and number in ARIA_PRO_DUPLICATES:
                excluded.append((str(path), f"byte-identical duplicate of Pro-{number - 1:03d}"))
                continue
            # No patient ids: near-duplicates sit at neighbouring numbers, so neighbouring numbers form a group.
            start = (number // ARIA_BLOCK) * ARIA_BLOCK
            group = f"{cls}:{start:03d}-{start + ARIA_BLOCK - 1:03d}"
            binary = HEALTHY if cls == "Benign" else LEUKEMIC
            # a held-out part is a contiguous range of numbers at the end of each class (splits.group_split), as
            # new images of this source would be: neighbouring numbers share patients and slides
            samples.append(Sample(path, cls, group, "aria", labels={"subtype": cls, "binary": binary},
                                  meta={"number": number, "range": (cls, number, ARIA_BLOCK)}))
    return Dataset("aria", root, samples, list(ARIA_CLASSES), "subtype", excluded=excluded,
                   group_by=f"blocks of {ARIA_BLOCK} neighbouring image numbers per class (no patient ids exist); "
                            "held out as contiguous number ranges at the end of each class")


# --------------------------------------------------------------------------------------------------------------
# ALL-IDB2 (single-cell crops) and ALL-IDB1 (whole fields)
# --------------------------------------------------------------------------------------------------------------
# Im257_0 has the same pixels as Im223_0 (DATA.md); keep the first.
ALL_IDB2_DUPLICATES = {"Im257_0": "Im223_0"}
_IDB_NAME = re.compile(r"^Im(\d+)_([01])$")


def _idb_dir(root: Path, name: str) -> Path:
    for cand in (root / name, root / name / name, root):
        if cand.is_dir() and any(c.name in ("img", "im") for c in cand.iterdir()):
            return cand
    raise DatasetNotFoundError(f"{name}: no 'img'/'im' folder under {root}")


@register_dataset("all_idb2", folder="all_idb")
def _load_all_idb2(root: Path) -> Dataset:
    base = _idb_dir(root, "ALL_IDB2")
    samples, excluded = [], []
    for path in _images_under(_require_dir(base / "img", "all_idb2")):
        m = _IDB_NAME.match(path.stem)
        if not m:
            continue
        if path.stem in ALL_IDB2_DUPLICATES:
            excluded.append((str(path), f"same pixels as {ALL_IDB2_DUPLICATES[path.stem]}"))
            continue
        label = LEUKEMIC if m[2] == "1" else HEALTHY
        field_id = CROP_TO_FIELD.get(path.stem, path.stem)
        group = FIELD_ALIASES.get(field_id, field_id)
        samples.append(Sample(path, label, group, "all_idb2", labels={"binary": label}, meta={"field": field_id}))
    return Dataset("all_idb2", root, samples, list(BINARY_CLASSES), "binary", excluded=excluded,
                   group_by="source field in ALL-IDB1 (crops are cut out of the fields; no patient ids exist)")


def read_xyc(path: Path) -> list[tuple[int, int]]:
    """Centroids from an ALL-IDB ``.xyc`` file (tab- or space-separated ``x y`` per line)."""
    if not path.exists():
        return []
    points = []
    for line in path.read_text().splitlines():
        parts = line.replace(",", " ").split()
        if len(parts) >= 2:
            points.append((int(float(parts[0])), int(float(parts[1]))))
    return points


@register_dataset("all_idb1", folder="all_idb")
def _load_all_idb1(root: Path) -> Dataset:
    base = _idb_dir(root, "ALL_IDB1")
    samples = []
    for path in _images_under(_require_dir(base / "im", "all_idb1")):
        m = _IDB_NAME.match(path.stem)
        if not m:
            continue
        label = LEUKEMIC if m[2] == "1" else HEALTHY
        mask = base / "wbc_masks" / f"{path.stem}_WBCs.tif"
        meta = {
            "blasts": read_xyc(base / "xyc" / f"{path.stem}.xyc"),
            "other": read_xyc(base / "other" / f"{path.stem}.xyc"),
            "wbc_mask": mask if mask.exists() else None,
        }
        group = FIELD_ALIASES.get(path.stem, path.stem)
        samples.append(Sample(path, label, group, "all_idb1", labels={"binary": label}, meta=meta))
    return Dataset("all_idb1", root, samples, list(BINARY_CLASSES), "binary", kind="fields",
                   group_by="field (no patient ids exist)")


# --------------------------------------------------------------------------------------------------------------
# DeepAPL (cell types, patient, AML / APL diagnosis)
# --------------------------------------------------------------------------------------------------------------
_PATIENT = re.compile(r"^Patient_\d+$")
# healthy vs leukemic for single cells of AML / APL patients. Blasts and promonocytes (blast equivalents in AML) are
# leukemic; mature and maturing normal types are healthy (as in healthy donors' blood, e.g. PBC). Left out, because a
# single cell of the type does not say which: promyelocytes (the malignant cell of APL, a normal maturing cell
# elsewhere), variant lymphocytes (reactive or atypical), smudge cells (broken cells of any kind) and plasma cells.
DEEPAPL_BINARY = {
    "Blast, no lineage spec": LEUKEMIC, "Promonocyte": LEUKEMIC,
    "Lymphocyte": HEALTHY, "Segmented neutrophils": HEALTHY, "Band neutrophils": HEALTHY, "Monocyte": HEALTHY,
    "Eosinophils": HEALTHY, "Basophil": HEALTHY, "Erythroblast": HEALTHY, "Myelocyte": HEALTHY,
    "Metamyelocyte": HEALTHY,
}
DEEPAPL_NO_BINARY = {
    "Promyelocyte": "promyelocyte: the malignant cell in APL, a normal maturing cell elsewhere",
    "Lymphocyte, variant": "variant lymphocyte: reactive or atypical, not told apart",
    "Smudge cells": "smudge cell: a broken cell of any kind",
    "Plasma cells": "plasma cell: neither a blast nor a normal blood cell",
}


@register_dataset("deepapl", folder="aml_multiclass")
def _load_deepapl(root: Path) -> Dataset:
    base = root / "Data" if (root / "Data").is_dir() else root
    master = base / "master.csv"
    if not master.exists():
        raise DatasetNotFoundError(f"deepapl: {master} is missing (it holds each patient's diagnosis)")
    with master.open(newline="") as f:
        info = {row["Patient_ID"]: row for row in csv.DictReader(f)}
    samples = []
    for path in _images_under(_require_dir(base / "All", "deepapl")):
        patient = next((p for p in path.parts if _PATIENT.match(p)), None)
        # Only 'Signed slides' images have a cell-type folder; the type is the folder holding the file.
        if patient is None or "Signed slides" not in path.parts or path.parent.name == "Signed slides":
            continue
        row = info.get(patient)
        if row is None:
            continue
        cell_type = path.parent.name
        binary = DEEPAPL_BINARY.get(cell_type)
        labels = {"cell_type": cell_type, "diagnosis": row["Diagnosis"], "binary": binary}
        meta = {"cohort": row["Cohort"], "age": row.get("Age at Diagnosis"), "gender": row.get("Gender")}
        if binary is None:
            meta["why_no_binary"] = DEEPAPL_NO_BINARY.get(cell_type, f"cell type {cell_type!r} has no binary label")
        samples.append(Sample(path, cell_type, patient, "deepapl", labels=labels, meta=meta))
    classes = sorted({s.label for s in samples})
    return Dataset("deepapl", root, samples, classes, "cell_type", group_by="patient")


# --------------------------------------------------------------------------------------------------------------
# PBC (Barcelona, CellaVision DM96): normal blood cells of healthy donors, 8 groups
# --------------------------------------------------------------------------------------------------------------
# PBC group -> DeepAPL cell type (target ``cell_type``); None: no single DeepAPL type (``ig`` holds promyelocytes,
# myelocytes and metamyelocytes not told apart; platelets are not white cells).
PBC_CELL_TYPES = {"basophil": "Basophil", "eosinophil": "Eosinophils", "erythroblast": "Erythroblast",
                  "ig": None, "lymphocyte": "Lymphocyte", "monocyte": "Monocyte",
                  "neutrophil": "Segmented neutrophils", "platelet": None}


@register_dataset("pbc", folder="pbc")
def _load_pbc(root: Path) -> Dataset:
    """Every image is a normal cell of a healthy donor, so ``binary`` is healthy for all, promyelocytes (``ig``) and
    platelets included: none of them is leukemic. No donor ids exist: each image is its own group (optimistic)."""
    samples = []
    for group_name, cell_type in PBC_CELL_TYPES.items():
        folder = root / group_name
        if not folder.is_dir():
            continue
        for path in _images_under(folder):
            meta = {} if cell_type else {"why_no_cell_type": f"PBC group {group_name!r} maps to no single cell type"}
            samples.append(Sample(path, group_name, path.stem, "pbc",
                                  labels={"pbc_group": group_name, "binary": HEALTHY, "cell_type": cell_type},
                                  meta=meta))
    if not samples:
        raise DatasetNotFoundError(f"pbc: none of the group folders {list(PBC_CELL_TYPES)} under {root}")
    return Dataset("pbc", root, samples, sorted({s.label for s in samples}), "pbc_group",
                   group_by="image (no donor ids exist)")


# --------------------------------------------------------------------------------------------------------------
# BCCD (whole fields with WBC / RBC / platelet boxes)
# --------------------------------------------------------------------------------------------------------------
def read_voc_boxes(path: Path) -> list[dict[str, Any]]:
    """Boxes from a Pascal VOC XML file as dicts with ``name, xmin, ymin, xmax, ymax``."""
    import xml.etree.ElementTree as ET

    boxes = []
    for obj in ET.parse(path).getroot().iter("object"):
        bb = obj.find("bndbox")
        box = {"name": obj.findtext("name", "").strip()}
        for k in ("xmin", "ymin", "xmax", "ymax"):
            box[k] = int(float(bb.findtext(k)))
        boxes.append(box)
    return boxes


@register_dataset("bccd", folder="bccd")
def _load_bccd(root: Path) -> Dataset:
    images = _require_dir(root / "JPEGImages", "bccd")
    official = {}
    for part in ("train", "val", "test"):
        f = root / "ImageSets" / "Main" / f"{part}.txt"
        if f.exists():
            official.update({line.strip(): part for line in f.read_text().split() if line.strip()})
    samples = []
    for path in _images_under(images):
        xml = root / "Annotations" / f"{path.stem}.xml"
        boxes = read_voc_boxes(xml) if xml.exists() else []
        n_wbc = sum(b["name"] == "WBC" for b in boxes)
        label = "wbc" if n_wbc else "no_wbc"
        samples.append(Sample(path, label, path.stem, "bccd", labels={"wbc": label},
                              meta={"boxes": boxes, "official_split": official.get(path.stem)}))
    return Dataset("bccd", root, samples, ["no_wbc", "wbc"], "wbc", kind="fields",
                   group_by="image (no patient ids exist)")


# --------------------------------------------------------------------------------------------------------------
# Users' own data
# --------------------------------------------------------------------------------------------------------------
@register_dataset("folder")
def _load_folder(root: Path) -> Dataset:
    """One sub-folder per class. A folder inside a class folder (``class/patient/img.png``) is taken as the group;
    files directly in the class folder are their own group."""
    samples = []
    for cls_dir in sorted(p for p in root.iterdir() if p.is_dir()):
        for path in _images_under(cls_dir):
            rel = path.relative_to(cls_dir).parts
            group = rel[0] if len(rel) > 1 else path.stem
            samples.append(Sample(path, cls_dir.name, group, "folder", labels={"class": cls_dir.name}))
    classes = sorted({s.label for s in samples})
    return Dataset("folder", root, samples, classes, "class",
                   group_by="first folder below the class folder, else the image itself")


@register_dataset("manifest")
def _load_manifest(root: Path, path: str | Path | None = None) -> Dataset:
    """A CSV with at least ``path,label,patient``; ``root`` is the CSV itself or the folder holding
    ``manifest.csv``. Relative paths are relative to the CSV's folder; other columns become extra labels."""
    csv_path = Path(path) if path else (root if root.is_file() else root / "manifest.csv")
    if not csv_path.is_file():
        raise DatasetNotFoundError(f"manifest: CSV file {csv_path} not found")
    with csv_path.open(newline="") as f:
        reader = csv.DictReader(f)
        cols = reader.fieldnames or []
        missing = {"path", "label", "patient"} - set(cols)
        if missing:
            raise ValueError(f"manifest {csv_path} lacks column(s) {sorted(missing)}; it has {cols}")
        samples = []
        for i, row in enumerate(reader, start=2):
            if not row["path"] or not row["label"] or not row["patient"]:
                raise ValueError(f"manifest {csv_path} line {i}: empty path, label or patient: {row}")
            p = Path(row["path"])
            p = p if p.is_absolute() else csv_path.parent / p
            extra = {k: v for k, v in row.items() if k not in ("path", "patient") and v}
            samples.append(Sample(p, row["label"], row["patient"], "manifest", labels={**extra, "label": row["label"]}))
    classes = sorted({s.label for s in samples})
    return Dataset("manifest", csv_path.parent, samples, classes, "label", group_by="patient")


def combine(datasets: list[Dataset], name: str = "combined") -> Dataset:
    """Several datasets as one (same target and classes); groups are prefixed by source so they stay distinct."""
    if not datasets:
        raise ValueError("combine() needs at least one dataset")
    targets = {d.target for d in datasets}
    if len(targets) != 1:
        raise ValueError(f"cannot combine datasets with different targets {sorted(targets)}")
    # a source may lack classes that others have (PBC has no leukemic cells): the classes are the union
    classes = _class_order(datasets[0].target, [c for d in datasets for c in d.classes])
    samples = []
    for d in datasets:
        samples += [replace(s, group=f"{s.source}/{s.group}") for s in d.samples]
    root = Path(os.path.commonpath([str(d.root) for d in datasets]))
    excluded = [e for d in datasets for e in d.excluded]
    return Dataset(name, root, samples, list(classes), datasets[0].target, excluded=excluded,
                   group_by="; ".join(f"{d.name}: {d.group_by}" for d in datasets))


def groups_by_class(ds: Dataset) -> dict[str, int]:
    groups: dict[str, set[str]] = defaultdict(set)
    for s in ds.samples:
        groups[s.label].add(s.group)
    return {c: len(groups.get(c, ())) for c in ds.classes}
