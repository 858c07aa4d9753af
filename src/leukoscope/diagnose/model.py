"""The patient-level model directory (shipped as ``apl``): AML vs APL from a patient's set of cells.

    model.safetensors   the embedding top (1x1 conv head + BN of EfficientNet-Lite0), the feature standardisation
                        and the aggregator's weights (gated-attention MIL, a cell-level linear classifier, or a
                        logistic regression on cell-type proportions); no pickle
    model.json          kind (``patient``), method, classes, threshold, which cell-type model supplies the stem and
                        the differential count, n_parameters, weights_sha256
    metrics.json        patient-level cross-validation of every compared method
    MODEL_CARD.md       data, methods, cross-validated metrics, limits

Every method reads the same per-cell inputs, computed once per cell from the cell-type model's frozen stem:
the pooled 1280-d embedding (``top`` here) and the cell-type model's calibrated probabilities.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

from leukoscope.diagnose.mil import GatedAttentionMIL
from leukoscope.models.modeldir import SHIPPED_DIR, file_sha256, shipped_models

log = logging.getLogger(__name__)

METHODS = ("mil", "mean", "proportions")
CLASSES = ("AML", "APL")
DEFAULT_PATIENT_MODEL = "apl"
FORMAT = "leukoscope-patient-model/1"


def make_top(in_channels: int = 320, out_channels: int = 1280) -> nn.Sequential:
    """EfficientNet-Lite0's conv head (1x1 conv, BN, ReLU6) as a standalone module."""
    from timm.layers import BatchNormAct2d

    return nn.Sequential(nn.Conv2d(in_channels, out_channels, 1, bias=False),
                         BatchNormAct2d(out_channels, act_layer=nn.ReLU6))


def copy_top(conv_head: nn.Module, bn2: nn.Module) -> nn.Sequential:
    """A frozen, eval-mode copy of a backbone's (conv_head, bn2)."""
    top = make_top(conv_head.in_channels, conv_head.out_channels)
    top[0].load_state_dict(conv_head.state_dict())
    top[1].load_state_dict(bn2.state_dict())
    for p in top.parameters():
        p.requires_grad_(False)
    return top.eval()


@torch.inference_mode()
def pooled(top: nn.Module, stem: torch.Tensor, batch_size: int = 256) -> np.ndarray:
    """Stem features (N, 320, 7, 7) -> pooled embeddings (N, 1280) float32."""
    out = [top(stem[i:i + batch_size].float()).mean((2, 3)) for i in range(0, len(stem), batch_size)]
    return torch.cat(out).numpy() if out else np.zeros((0, 1280), np.float32)


@dataclass
class BagScore:
    """What the patient model says about one bag of cells.

    Attributes:
        p_apl: probability of APL for the patient.
        weights: per cell, how much it weighed in the decision (MIL: attention, sums to 1; mean: 1 / n; proportions:
            the cell's share of the logit shift, normalised to sum to 1 in absolute value).
        cell_scores: per cell, how APL-like the cell looks on its own (probability in [0, 1]).
        weight_kind: what ``weights`` means, in words.
    """

    p_apl: float
    weights: np.ndarray
    cell_scores: np.ndarray
    weight_kind: str


@dataclass
class PatientModel:
    """A loaded patient-level model. ``score`` takes per-cell embeddings and cell-type probabilities."""

    name: str
    path: Path | None
    method: str
    info: dict
    top: nn.Sequential
    mean: np.ndarray
    scale: np.ndarray
    mil: GatedAttentionMIL | None = None
    linear: np.ndarray | None = None  # (d + 1,): weights then bias
    threshold: float = 0.5
    classes: tuple[str, ...] = CLASSES
    extra: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"Unknown patient-model method {self.method!r}. Available: {list(METHODS)}")

    def _standardise(self, x: np.ndarray) -> np.ndarray:
        return ((x - self.mean) / self.scale).astype(np.float32)

    def score(self, emb: np.ndarray, cell_proba: np.ndarray) -> BagScore:
        """Score one patient's bag: ``emb`` (n, 1280) pooled embeddings, ``cell_proba`` (n, C) cell-type probs."""
        n = len(emb)
        if n == 0:
            raise ValueError("a patient needs at least one readable cell")
        if self.method == "mil":
            with torch.inference_mode():
                bag = torch.from_numpy(self._standardise(emb))
                logit, att = self.mil(bag)
                inst = torch.sigmoid(self.mil.instance_logits(bag)).numpy()
            return BagScore(float(torch.sigmoid(logit)), att.numpy().copy(), inst, "attention weight")
        w, b = self.linear[:-1], float(self.linear[-1])
        if self.method == "mean":
            p_cell = _sigmoid(self._standardise(emb) @ w + b)
            return BagScore(float(p_cell.mean()), np.full(n, 1.0 / n), p_cell,
                            "how strongly the cell alone points to the label (every cell has weight 1 / n in the mean)")
        # proportions: logistic regression on the mean cell-type probability vector
        props = cell_proba.mean(0, keepdims=True)
        p = float(_sigmoid(self._standardise(props) @ w + b)[0])
        contrib = (cell_proba / self.scale) @ w  # each cell's share of the logit (up to 1 / n and a constant)
        shift = contrib - (self.mean / self.scale) @ w
        weights = np.abs(shift) / max(float(np.abs(shift).sum()), 1e-12)
        return BagScore(p, weights, _sigmoid(shift + b), "share of the logit shift by its cell type")

    def scorer_module(self, stem: nn.Module, cell_head: nn.Module | None = None, temperature: float = 1.0) -> nn.Module:
        """An image -> (AML, APL) logits module for Grad-CAM of one cell (target layer ``top.1``)."""
        return _CellScorer(self, stem, cell_head, temperature)

    @property
    def n_parameters(self) -> int:
        return int(sum(t.numel() for t in self.state_dict().values()))

    def state_dict(self) -> dict[str, torch.Tensor]:
        state = {f"top.{k}": v for k, v in self.top.state_dict().items()}
        state["norm.mean"] = torch.from_numpy(np.asarray(self.mean, np.float32))
        state["norm.scale"] = torch.from_numpy(np.asarray(self.scale, np.float32))
        if self.mil is not None:
            state.update({f"mil.{k}": v for k, v in self.mil.state_dict().items()})
        if self.linear is not None:
            state["linear"] = torch.from_numpy(np.asarray(self.linear, np.float32))
        return {k: v.detach().contiguous().clone() for k, v in state.items()}

    def save(self, out: str | Path, info: dict | None = None) -> Path:
        """Write ``model.safetensors`` and ``model.json`` into ``out``."""
        from safetensors.torch import save_file

        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        save_file(self.state_dict(), str(out / "model.safetensors"))
        doc = {"kind": "patient", **self.info, **(info or {})}  # the kind first, as in every model.json
        doc.update({"kind": "patient", "format": FORMAT, "name": self.name, "method": self.method,
                    "classes": list(self.classes), "threshold": self.threshold, "n_parameters": self.n_parameters,
                    "weights_sha256": file_sha256(out / "model.safetensors")})
        if self.mil is not None:
            doc["mil"] = {"in_features": self.mil.in_features, "hidden": self.mil.embed[0].out_features,
                          "attention": self.mil.att_v.out_features}
        (out / "model.json").write_text(json.dumps(doc, indent=1))
        self.info, self.path = doc, out
        return out


class _CellScorer(nn.Module):
    def __init__(self, pm: PatientModel, stem: nn.Module, cell_head: nn.Module | None, temperature: float) -> None:
        super().__init__()
        self.stem = stem
        self.top = pm.top
        self.cell_head = cell_head
        self.temperature = temperature
        self.method = pm.method
        self.mil = pm.mil
        self.register_buffer("mean", torch.from_numpy(np.asarray(pm.mean, np.float32)))
        self.register_buffer("scale", torch.from_numpy(np.asarray(pm.scale, np.float32)))
        if pm.linear is not None:
            self.register_buffer("w", torch.from_numpy(np.asarray(pm.linear[:-1], np.float32)))
            self.b = float(pm.linear[-1])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = self.stem(x)
        if self.method == "proportions":
            if self.cell_head is None:
                raise ValueError("the proportions method needs the cell-type model's head")
            p = torch.softmax(self.cell_head(s) / self.temperature, dim=1)
            logit = (p / self.scale) @ self.w - (self.mean / self.scale) @ self.w + self.b
        else:
            e = (self.top(s).mean((2, 3)) - self.mean) / self.scale
            logit = self.mil.instance_logits(e) if self.method == "mil" else e @ self.w + self.b
        # symmetric logits: softmax gives sigmoid(logit), and both classes have a gradient to explain
        return torch.stack([-logit / 2, logit / 2], dim=1)


def _sigmoid(z: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-np.asarray(z, dtype=np.float64)))


def shipped_patient_models() -> list[str]:
    """Names of the shipped patient-level models (model directories in this format)."""
    out = []
    for name in shipped_models():
        try:
            if json.loads((SHIPPED_DIR / name / "model.json").read_text()).get("format") == FORMAT:
                out.append(name)
        except (OSError, ValueError) as exc:
            log.warning("shipped model %s: unreadable model.json (%s)", name, exc)
            continue
    return out


def resolve_patient_model_dir(name_or_dir: str | Path | None) -> Path:
    """A patient-model directory from a path or a shipped name (default ``apl``)."""
    from leukoscope.models.modeldir import resolve_model_dir

    return resolve_model_dir(name_or_dir, DEFAULT_PATIENT_MODEL, "patient model", shipped_patient_models())


def load_patient_model(name_or_dir: str | Path | None = None) -> PatientModel:
    """Load a patient-level model directory or a shipped one by name (default ``apl``)."""
    from safetensors.torch import load_file

    path = resolve_patient_model_dir(name_or_dir)
    info = json.loads((path / "model.json").read_text())
    if info.get("format") != FORMAT:
        raise ValueError(f"{path} is not a patient-level model (format {info.get('format')!r}, expected {FORMAT!r}); "
                         "cell-level models go to `leukoscope predict`")
    state = load_file(str(path / "model.safetensors"))
    top = make_top(int(state["top.0.weight"].shape[1]), int(state["top.0.weight"].shape[0]))
    top.load_state_dict({k[4:]: v for k, v in state.items() if k.startswith("top.")})
    for p in top.parameters():
        p.requires_grad_(False)
    top.eval()
    mil = None
    if info["method"] == "mil":
        m = info["mil"]
        mil = GatedAttentionMIL(m["in_features"], m["hidden"], m["attention"])
        mil.load_state_dict({k[4:]: v for k, v in state.items() if k.startswith("mil.")})
        mil.eval()
    linear = state["linear"].numpy().astype(np.float64) if "linear" in state else None
    return PatientModel(info.get("name", path.name), path, info["method"], info, top,
                        state["norm.mean"].numpy().astype(np.float64), state["norm.scale"].numpy().astype(np.float64),
                        mil=mil, linear=linear, threshold=float(info.get("threshold", 0.5)),
                        classes=tuple(info.get("classes", CLASSES)))
