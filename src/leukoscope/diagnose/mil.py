"""Attention-based multiple-instance learning (Ilse, Tomczak & Welling, ICML 2018, "gated attention").

A patient is a bag of cell embeddings ``H`` (n, d). Each cell gets an attention weight

    a_k = softmax_k( w^T (tanh(V h_k) * sigmoid(U h_k)) )

the bag is ``z = sum_k a_k h_k`` and a linear layer turns ``z`` into the patient's APL logit. The weights sum to one
over the cells of a bag and the output does not depend on the cells' order.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
import torch
from torch import nn


@dataclass(frozen=True)
class MILConfig:
    """Hyper-parameters of the MIL model and its training (fixed in advance, not tuned on the test folds)."""

    hidden: int = 128  # cell embedding -> hidden (one linear layer + ReLU)
    attention: int = 64  # width of the gated attention's V and U
    dropout: float = 0.25
    lr: float = 5e-4
    weight_decay: float = 1e-3
    epochs: int = 40
    keep: float = 0.8  # share of a bag's cells kept per training step (instance dropout)
    seed: int = 0

    def to_dict(self) -> dict:
        return asdict(self)


class GatedAttentionMIL(nn.Module):
    """Gated-attention MIL over one bag of instance features.

    Args:
        in_features: width of an instance (cell) embedding.
        hidden, attention, dropout: see :class:`MILConfig`.
    """

    def __init__(self, in_features: int, hidden: int = 128, attention: int = 64, dropout: float = 0.25) -> None:
        super().__init__()
        self.in_features = in_features
        self.embed = nn.Sequential(nn.Linear(in_features, hidden), nn.ReLU(), nn.Dropout(dropout))
        self.att_v = nn.Linear(hidden, attention)
        self.att_u = nn.Linear(hidden, attention)
        self.att_w = nn.Linear(attention, 1)
        self.classifier = nn.Linear(hidden, 1)

    def attention_logits(self, h: torch.Tensor) -> torch.Tensor:
        """(n, hidden) -> (n,) unnormalised attention scores."""
        return self.att_w(torch.tanh(self.att_v(h)) * torch.sigmoid(self.att_u(h))).squeeze(-1)

    def forward(self, bag: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """One bag (n, in_features) -> (APL logit (scalar tensor), attention weights (n,) summing to 1)."""
        if bag.ndim != 2 or bag.shape[1] != self.in_features or bag.shape[0] == 0:
            raise ValueError(f"a bag must be (n >= 1, {self.in_features}), got {tuple(bag.shape)}")
        h = self.embed(bag)
        a = torch.softmax(self.attention_logits(h), dim=0)
        z = (a[:, None] * h).sum(0)
        return self.classifier(z).squeeze(-1), a

    def instance_logits(self, bag: torch.Tensor) -> torch.Tensor:
        """The classifier applied to each cell on its own (n,): how APL-like one cell looks to the model."""
        return self.classifier(self.embed(bag)).squeeze(-1)


def fit_mil(bags: list[np.ndarray], y: np.ndarray, cfg: MILConfig = MILConfig(),
            views: list[np.ndarray] | None = None) -> GatedAttentionMIL:
    """Train a :class:`GatedAttentionMIL` on standardised bags, one bag per step (as in Ilse et al.).

    Args:
        bags: per patient an (n_i, d) float array.
        y: per patient 1 (APL) or 0 (AML).
        views: optional per patient an (n_i, V, d) array of augmented views of the same cells; a training step then
            draws one view per cell at random.
    """
    y = np.asarray(y).astype(np.float32)
    if len(bags) != len(y) or len(np.unique(y)) < 2:
        raise ValueError(f"fit_mil needs one label per bag and both classes; got {len(bags)} bags, labels "
                         f"{sorted(set(y.tolist()))}")
    torch.manual_seed(cfg.seed)
    rng = np.random.default_rng(cfg.seed)
    model = GatedAttentionMIL(bags[0].shape[1], cfg.hidden, cfg.attention, cfg.dropout)
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    pos_weight = torch.tensor((y == 0).sum() / max((y == 1).sum(), 1), dtype=torch.float32)
    loss_fn = nn.BCEWithLogitsLoss(pos_weight=pos_weight)
    tensors = [torch.from_numpy(np.ascontiguousarray(b, dtype=np.float32)) for b in bags]
    vtensors = None if views is None else [torch.from_numpy(np.ascontiguousarray(v, dtype=np.float32)) for v in views]
    targets = torch.from_numpy(y)
    model.train()
    for _ in range(cfg.epochs):
        for i in rng.permutation(len(bags)):
            bag = tensors[i] if vtensors is None else vtensors[i][
                torch.arange(len(tensors[i])), torch.from_numpy(rng.integers(0, vtensors[i].shape[1], len(tensors[i])))]
            n = len(bag)
            if cfg.keep < 1 and n > 2:
                bag = bag[torch.from_numpy(np.sort(rng.choice(n, max(2, round(cfg.keep * n)), replace=False)))]
            logit, _ = model(bag)
            loss = loss_fn(logit[None], targets[i:i + 1])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    model.eval()
    return model


@torch.inference_mode()
def predict_mil(model: GatedAttentionMIL, bags: list[np.ndarray]) -> tuple[np.ndarray, list[np.ndarray]]:
    """(P(APL) per bag, attention weights per bag)."""
    model.eval()
    probs, atts = [], []
    for b in bags:
        logit, a = model(torch.from_numpy(np.ascontiguousarray(b, dtype=np.float32)))
        probs.append(float(torch.sigmoid(logit)))
        atts.append(a.numpy().copy())
    return np.array(probs), atts
