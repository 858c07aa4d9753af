"""Diagnose a patient from many cells: read the cells, encode them once, score the bag, count the cell types."""

from __future__ import annotations

import csv
import io
import logging
import sys
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from leukoscope.data.images import is_image_path, read_image
from leukoscope.diagnose.model import PatientModel, load_patient_model
from leukoscope.errors import ImageReadError
from leukoscope.models.modeldir import LoadedModel, load_model, softmax

log = logging.getLogger(__name__)

CSV_COLUMNS = ("patient", "label", "confidence", "p_AML", "p_APL", "n_cells", "ood_share")


@dataclass
class PatientInput:
    """One patient's cells: a name and image paths (``labels``: the manifest's label per path, if any)."""

    name: str
    paths: list[Path]
    source: str
    labels: dict[str, str] = field(default_factory=dict)


def patients_from(inputs: list[str | Path]) -> list[PatientInput]:
    """Folders (one patient each, named after the folder, images searched recursively) and manifest CSVs
    (``path,label,patient``; one patient per distinct ``patient``), in the order given."""
    from leukoscope.data.datasets import load_dataset

    out: list[PatientInput] = []
    for item in inputs:
        p = Path(item).expanduser()
        if p.is_dir():
            paths = sorted(q for q in p.rglob("*") if q.is_file() and is_image_path(q))
            if not paths:
                raise ValueError(f"patient folder {p} holds no PNG, JPEG, TIFF or BMP files")
            out.append(PatientInput(p.resolve().name, paths, str(p)))
        elif p.is_file() and p.suffix.lower() == ".csv":
            ds = load_dataset("manifest", root=p)
            groups: OrderedDict[str, PatientInput] = OrderedDict()
            for s in ds.samples:
                pi = groups.setdefault(s.group, PatientInput(s.group, [], str(p)))
                pi.paths.append(s.path)
                pi.labels[str(s.path)] = s.label
            out.extend(groups.values())
        elif p.exists():
            raise ValueError(f"a patient is a folder of cell images or a manifest CSV (path,label,patient); got the "
                             f"file {p}")
        else:
            raise FileNotFoundError(f"patient input {p} does not exist")
    seen: dict[str, str] = {}
    for pi in out:
        if pi.name in seen:
            raise ValueError(f"patient {pi.name!r} is given twice ({seen[pi.name]} and {pi.source}); rename one")
        seen[pi.name] = pi.source
    return out


@dataclass
class PatientResult:
    """The diagnosis of one patient and the per-cell evidence behind it."""

    patient: str
    label: str
    p_apl: float
    paths: list[Path]
    skipped: list[tuple[str, str]]
    cell_types: list[str]  # the cell-type model's classes
    cell_proba: np.ndarray  # (n, C) calibrated cell-type probabilities
    weights: np.ndarray  # (n,) how much each cell weighed
    cell_scores: np.ndarray  # (n,) how APL-like each cell looks alone
    weight_kind: str
    method: str
    source: str = ""
    cell_ood: np.ndarray | None = None  # (n,) cells unlike the cell-type model's training cells (None: no detector)

    @property
    def ood_share(self) -> float | None:
        """The share of this patient's cells flagged as unlike the cell-type model's training cells: the higher, the
        less the diagnosis is to be trusted (None when the cell-type model has no detector)."""
        return None if self.cell_ood is None or not len(self.cell_ood) else float(np.mean(self.cell_ood))

    @property
    def n_cells(self) -> int:
        return len(self.paths)

    @property
    def p_aml(self) -> float:
        return 1.0 - self.p_apl

    @property
    def confidence(self) -> float:
        return self.p_apl if self.label == "APL" else self.p_aml

    def differential(self) -> dict[str, int]:
        """Cells per predicted type (the cell-type model's most likely class), in the model's class order."""
        counts = np.bincount(self.cell_proba.argmax(1), minlength=len(self.cell_types)) if self.n_cells else \
            np.zeros(len(self.cell_types), int)
        return {c: int(n) for c, n in zip(self.cell_types, counts, strict=True)}

    def top_cells(self, k: int = 8) -> list[int]:
        """Indices of the ``k`` cells that weighed most (ties broken by how strongly they point to the label)."""
        toward = self.cell_scores if self.label == "APL" else 1 - self.cell_scores
        order = np.lexsort((-toward, -self.weights))
        return [int(i) for i in order[:k]]

    def row(self) -> dict:
        return {"patient": self.patient, "label": self.label, "confidence": round(self.confidence, 6),
                "p_AML": round(self.p_aml, 6), "p_APL": round(self.p_apl, 6), "n_cells": self.n_cells,
                "ood_share": "" if self.ood_share is None else round(self.ood_share, 4)}


class Diagnoser:
    """A patient-level model plus the cell-type model that supplies its stem features and the differential count.

    Args:
        model: patient model name or directory (default ``apl``).
        cell_model: cell-type model name or directory (default: the one the patient model was trained with).
    """

    def __init__(self, model: str | Path | PatientModel | None = None,
                 cell_model: str | Path | LoadedModel | None = None) -> None:
        self.model = model if isinstance(model, PatientModel) else load_patient_model(model)
        want = self.model.info.get("cell_type_model", "cell-type")
        self.cell_model = cell_model if isinstance(cell_model, LoadedModel) else load_model(cell_model or want,
                                                                                             backend="torch")
        spec, need = self.cell_model.info.get("spec", {}), self.model.info.get("stem", {})
        for key in ("backbone", "trainable_stages"):
            if key in need and spec.get(key) != need[key]:
                raise ValueError(f"patient model {self.model.name!r} needs a cell-type model whose stem is "
                                 f"{key}={need[key]!r}; {self.cell_model.path} has {spec.get(key)!r}")
        self._scorer: LoadedModel | None = None
        sha = self.model.info.get("cell_type_model_sha256")
        if sha and self.cell_model.info.get("weights_sha256") != sha and self.model.method == "proportions":
            log.warning("the cell-type model %s is not the one %s was trained with: proportions may shift",
                        self.cell_model.path, self.model.name)

    def encode(self, images: list[np.ndarray], batch_size: int = 32) -> tuple[np.ndarray, np.ndarray]:
        """RGB uint8 cells -> (cell-type probabilities (n, C), pooled embeddings (n, 1280))."""
        proba, emb, _ = self.encode_cells(images, batch_size)
        return proba, emb

    @torch.inference_mode()
    def encode_cells(self, images: list[np.ndarray], batch_size: int = 32
                     ) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
        """RGB uint8 cells -> (cell-type probabilities (n, C), the patient model's pooled embeddings (n, 1280), the
        cell-type model's out-of-distribution flags (n,) or None when it has no detector)."""
        ct = self.cell_model
        net = ct.module
        det = ct.ood
        probs, embs, flags = [], [], []
        for i in range(0, len(images), batch_size):
            s = net.stem(torch.from_numpy(ct.prepare_batch(images[i:i + batch_size])))
            f = net.top(s).flatten(1)
            z = net.coarse(net.head(f)) if hasattr(net, "coarse") else net.head(f)
            probs.append(softmax(z.float().numpy() / ct.temperature))
            embs.append(self.model.top(s).mean((2, 3)).float().numpy())
            if det is not None:
                flags.append(det.flag(det.score(f.float().numpy(), z.float().numpy())))
        if not probs:
            return (np.zeros((0, len(ct.classes)), np.float32),
                    np.zeros((0, self.model.top[0].out_channels), np.float32),
                    None if det is None else np.zeros(0, bool))
        return np.concatenate(probs), np.concatenate(embs), None if det is None else np.concatenate(flags)

    def diagnose_images(self, patient: str, images: list[np.ndarray], paths: list[Path] | None = None,
                        skipped: list[tuple[str, str]] | None = None, source: str = "") -> PatientResult:
        """Diagnose one patient from its cells as RGB uint8 arrays."""
        if not images:
            raise ValueError(f"patient {patient!r} has no readable cell images"
                             + (f" ({len(skipped)} unreadable)" if skipped else ""))
        proba, emb, ood = self.encode_cells(images)
        s = self.model.score(emb, proba)
        label = "APL" if s.p_apl >= self.model.threshold else "AML"
        return PatientResult(patient, label, s.p_apl, list(paths or [Path(f"cell_{i}") for i in range(len(images))]),
                             list(skipped or []), list(self.cell_model.classes), proba, s.weights, s.cell_scores,
                             s.weight_kind, self.model.method, source, ood)

    def diagnose(self, patient: PatientInput) -> PatientResult:
        """Diagnose one patient; unreadable cells are skipped and listed in ``result.skipped``."""
        images, ok, skipped = [], [], []
        for p in patient.paths:
            try:
                images.append(read_image(p))
                ok.append(Path(p))
            except ImageReadError as exc:
                skipped.append((str(p), exc.reason))
        return self.diagnose_images(patient.name, images, ok, skipped, patient.source)

    def heatmap(self, rgb: np.ndarray, target: str = "APL") -> np.ndarray:
        """Grad-CAM of one cell's own APL (or AML) score: ``(H, W)`` float32 in [0, 1]."""
        from leukoscope.explain import gradcam_array

        return gradcam_array(self.scorer(), rgb, target_class=target)

    def scorer(self) -> LoadedModel:
        """The cell -> (AML, APL) score network as a :class:`LoadedModel`, for the explain tools."""
        if self._scorer is None:
            ct = self.cell_model
            head = _CellTypeHead(ct.module) if self.model.method == "proportions" else None
            module = self.model.scorer_module(ct.module._stem, head, ct.temperature).eval()
            layer = "cell_head.net.backbone.bn2" if head is not None else "top.1"
            self._scorer = LoadedModel(f"{self.model.name}-cell-score", self.model.path or Path("."), module,
                                       list(self.model.classes), ct.preprocess, 1.0, {"target_layer": layer})
        return self._scorer


class _CellTypeHead(torch.nn.Module):
    def __init__(self, net: torch.nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, s: torch.Tensor) -> torch.Tensor:
        return self.net.head(self.net.top(s))


def write_csv(results: list[PatientResult], path: str | Path | None = None) -> str:
    """The results as CSV with exactly :data:`CSV_COLUMNS`; written to ``path`` (or standard output)."""
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=list(CSV_COLUMNS), lineterminator="\n")
    w.writeheader()
    for r in results:
        w.writerow(r.row())
    text = buf.getvalue()
    if path:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(text)
    else:
        sys.stdout.write(text)
    return text


def diagnose(inputs: list[str | Path], model: str | Path | None = None,
             cell_model: str | Path | None = None) -> list[PatientResult]:
    """Diagnose each patient (folder or manifest CSV) in ``inputs``."""
    d = Diagnoser(model, cell_model)
    return [d.diagnose(p) for p in patients_from(inputs)]
