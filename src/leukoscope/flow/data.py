"""Flow cytometry cases: the FlowCAP-II AML files, the per-subject feature table, and lab manifests.

A *case* is one subject with one FCS file per tube. Everything downstream (features, CV, the model) works on cases,
so that cross-validation is by subject by construction.
"""

from __future__ import annotations

import csv
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from leukoscope.errors import DatasetNotFoundError

__all__ = [
    "CLASSES", "FlowCase", "FeatureTable", "flow_data_root", "read_flowcap_labels", "flowcap_subject_tube",
    "flowcap_fcs_cases", "load_feature_table", "read_manifest",
]

CLASSES = ("normal", "aml")
FLOW_FOLDER = "flow"


@dataclass(frozen=True)
class FlowCase:
    """One subject: label (``normal``/``aml``, or ``""`` when unknown) and FCS files keyed by tube number."""

    subject: str
    label: str
    files: dict[int, Path]
    source: str = ""
    meta: dict = field(default_factory=dict, hash=False, compare=False)

    @property
    def y(self) -> int:
        if self.label not in CLASSES:
            raise ValueError(f"case {self.subject!r} has label {self.label!r}, expected one of {list(CLASSES)}")
        return CLASSES.index(self.label)


@dataclass(frozen=True)
class FeatureTable:
    """Per-subject features (rows) with labels and subject ids."""

    X: np.ndarray
    y: np.ndarray
    subjects: list[str]
    feature_names: list[str]
    source: str = ""


def flow_data_root(root: str | Path | None = None) -> Path:
    """The FlowCAP-II folder: ``root`` if given, else ``<data root>/flow`` (``$LEUKOSCOPE_DATA_ROOT``,
    ``../shared/data``).

    Raises:
        DatasetNotFoundError: listing every place looked at.
    """
    if root is not None:
        path = Path(root).expanduser()
        if not (path / "AMLTraining.csv").is_file():
            raise DatasetNotFoundError(f"flow data not found: {path / 'AMLTraining.csv'} does not exist")
        return path
    from leukoscope.data.datasets import DATA_ROOT_ENV, data_root_candidates

    candidates = [base / FLOW_FOLDER for base in data_root_candidates()]
    for cand in candidates:
        if (cand / "AMLTraining.csv").is_file():
            return cand
    looked = ", ".join(str(c) for c in candidates)
    raise DatasetNotFoundError(
        f"FlowCAP-II flow data not found; looked for AMLTraining.csv in: {looked}. Pass --root DIR or set "
        f"${DATA_ROOT_ENV} to the folder that holds '{FLOW_FOLDER}/'."
    )


def flowcap_subject_tube(file_number: int) -> tuple[int, int]:
    """FlowCAP-II numbering: file N belongs to subject ceil(N / 8), tube ((N - 1) mod 8) + 1."""
    if file_number < 1:
        raise ValueError(f"FlowCAP file numbers start at 1, got {file_number}")
    return math.ceil(file_number / 8), (file_number - 1) % 8 + 1


def read_flowcap_labels(root: str | Path | None = None) -> dict[int, str]:
    """Subject number -> ``normal``/``aml`` from ``AMLTraining.csv`` (checked against the file numbering)."""
    path = flow_data_root(root) / "AMLTraining.csv"
    labels: dict[int, str] = {}
    with path.open(newline="") as fh:
        for row in csv.DictReader(fh):
            subject, tube = flowcap_subject_tube(int(row["FCSFileName"]))
            if subject != int(row["SampleNumber"]) or tube != int(row["TubeNumber"]):
                raise ValueError(f"{path}: file {row['FCSFileName']} is listed as subject {row['SampleNumber']} "
                                 f"tube {row['TubeNumber']}, the numbering says subject {subject} tube {tube}")
            label = row["Label"].strip().lower()
            if labels.setdefault(subject, label) != label:
                raise ValueError(f"{path}: subject {subject} has two labels")
    return labels


_NUMBER = re.compile(r"(\d{1,4})\.fcs$", re.IGNORECASE)


def _original_number(path: Path) -> int | None:
    """FlowCAP file number of a raw ``NNNN.FCS`` or of a flowCore re-write whose FILENAME/GUID names it."""
    m = _NUMBER.search(path.name)
    if m and path.name[0].isdigit():
        return int(m.group(1))
    from leukoscope.flow.fcs import _read_data_sets

    ds = _read_data_sets(path, only_text=True)[0]
    text = {k.lower().lstrip("$"): str(v) for k, v in ds.text.items()}
    for key in ("filename", "guid"):
        m = _NUMBER.search(text.get(key, "").strip())
        if m:
            return int(m.group(1))
    return None


def flowcap_fcs_cases(
    root: str | Path | None = None, tubes: tuple[int, ...] = (4,), sources: tuple[str, ...] = ("raw", "cytodx"),
) -> list[FlowCase]:
    """FlowCAP-II subjects that have FCS event files for all ``tubes``, one case per subject.

    ``raw`` files (30,000 events) are preferred over ``cytodx`` re-writes (500 events) when a subject has both
    (subject 9). Subjects come from the file number (raw) or the FILENAME keyword (CytoDx), labels from
    ``AMLTraining.csv``.
    """
    base = flow_data_root(root)
    labels = read_flowcap_labels(base)
    folders = {"raw": base / "flowcap2_aml_raw_fcs", "cytodx": base / "flowcap2_aml_cytodx_fcs"}
    unknown = set(sources) - set(folders)
    if unknown:
        raise ValueError(f"unknown FlowCAP-II sources {sorted(unknown)}; available: {sorted(folders)}")
    by_subject: dict[int, FlowCase] = {}
    for source in sources:
        folder = folders[source]
        if not folder.is_dir():
            raise DatasetNotFoundError(f"FlowCAP-II folder {folder} does not exist")
        files: dict[int, dict[int, tuple[Path, int]]] = {}
        for path in sorted(folder.iterdir()):
            if path.suffix.lower() != ".fcs":
                continue
            number = _original_number(path)
            if number is None:
                raise ValueError(f"{path}: cannot tell which FlowCAP-II file this is (no number in name or FILENAME)")
            subject, tube = flowcap_subject_tube(number)
            if tube in tubes:
                files.setdefault(subject, {})[tube] = (path, number)
        for subject, per_tube in sorted(files.items()):
            if subject in by_subject or set(per_tube) != set(tubes):
                continue
            by_subject[subject] = FlowCase(
                subject=f"{subject:04d}", label=labels[subject], files={t: p for t, (p, _) in per_tube.items()},
                source=source, meta={"flowcap_files": {t: n for t, (_, n) in per_tube.items()}},
            )
    return [by_subject[s] for s in sorted(by_subject)]


def load_feature_table(path: str | Path | None = None, root: str | Path | None = None) -> FeatureTable:
    """The third-party per-subject table ``features/AML_features.csv`` (359 subjects x 80 features).

    Labels are checked against ``AMLTraining.csv`` when the table is the FlowCAP-II one. Columns other than
    ``label``, ``fcs_file``, ``split``, ``subject`` are features.
    """
    if path is None:
        base = flow_data_root(root)
        path = base / "features" / "AML_features.csv"
        labels = read_flowcap_labels(base)
    else:
        labels = None
    path = Path(path)
    if not path.is_file():
        raise DatasetNotFoundError(f"feature table {path} does not exist")
    with path.open(newline="") as fh:
        reader = csv.DictReader(fh)
        header = list(reader.fieldnames or [])
        rows = list(reader)
    meta_cols = {"label", "fcs_file", "split", "subject"}
    if "label" not in header:
        raise ValueError(f"{path}: a feature table needs a 'label' column; it has {header[:8]}...")
    names = [c for c in header if c not in meta_cols]
    X = np.array([[float(r[c]) for c in names] for r in rows], dtype=np.float64)
    y = np.array([_label_to_int(r["label"], path) for r in rows], dtype=np.int64)
    id_col = "subject" if "subject" in header else ("fcs_file" if "fcs_file" in header else None)
    subjects = [str(Path(r[id_col]).stem) if id_col else str(i) for i, r in enumerate(rows)]
    if len(set(subjects)) != len(subjects):
        raise ValueError(f"{path}: subject ids are not unique; a feature table has one row per subject")
    if labels is not None:
        bad = [s for s, t in zip(subjects, y, strict=True) if CLASSES[t] != labels.get(int(s))]
        if bad:
            raise ValueError(f"{path}: labels disagree with AMLTraining.csv for subjects {bad[:5]}")
    if not np.isfinite(X).all():
        raise ValueError(f"{path}: the feature table holds NaN or infinite values")
    return FeatureTable(X=X, y=y, subjects=subjects, feature_names=names, source=str(path))


def _label_to_int(value: str, source: object) -> int:
    v = str(value).strip().lower()
    if v in ("1", "aml"):
        return 1
    if v in ("0", "normal"):
        return 0
    raise ValueError(f"{source}: label {value!r} is neither aml/1 nor normal/0")


def read_manifest(path: str | Path, require_labels: bool = True) -> list[FlowCase]:
    """Cases from a CSV with columns ``path,subject[,label][,tube]`` (paths relative to the CSV's folder).

    Several rows of one subject (one per tube) form one case; a subject with two files for one tube is an error.
    """
    path = Path(path)
    if not path.is_file():
        raise DatasetNotFoundError(f"manifest {path} does not exist")
    with path.open(newline="") as fh:
        reader = csv.DictReader(fh)
        header = list(reader.fieldnames or [])
        rows = list(reader)
    need = {"path", "subject"} | ({"label"} if require_labels else set())
    if not need <= set(header):
        raise ValueError(f"manifest {path} needs columns {sorted(need)}, it has {header}")
    cases: dict[str, dict] = {}
    for i, row in enumerate(rows, start=2):
        fpath = Path(row["path"])
        if not fpath.is_absolute():
            fpath = path.parent / fpath
        tube = int(row["tube"]) if row.get("tube", "").strip() else 0
        label = str(row.get("label", "") or "").strip().lower()
        if label in ("1", "0"):
            label = CLASSES[int(label)]
        if label and label not in CLASSES:
            raise ValueError(f"manifest {path} line {i}: label {row['label']!r} is not one of {list(CLASSES)}")
        entry = cases.setdefault(row["subject"], {"label": label, "files": {}})
        if entry["label"] != label:
            raise ValueError(f"manifest {path} line {i}: subject {row['subject']!r} has two labels")
        if tube in entry["files"]:
            raise ValueError(f"manifest {path} line {i}: subject {row['subject']!r} has two files for tube {tube}")
        entry["files"][tube] = fpath
    return [FlowCase(subject=s, label=c["label"], files=c["files"], source=str(path)) for s, c in cases.items()]
