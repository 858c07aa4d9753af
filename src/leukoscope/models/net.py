"""Networks: a CNN classifier with a frozen-able stem, and the hybrid CNN-Transformer.

Every network is ``head(top(stem(x)))``. On 2 CPU cores full fine-tuning is slow (~5 images/s), so training can freeze
the stem, cache its output once per augmented view, and train only ``top`` and ``head`` on the cache. ``split`` says how
many of the backbone's last stages belong to ``top``.
"""

from __future__ import annotations

import math

import torch
from torch import nn


def _effnet_parts(bb: nn.Module, trainable_stages: int) -> tuple[list[nn.Module], list[nn.Module], str]:
    blocks = list(bb.blocks)
    k = len(blocks) - trainable_stages
    stem = [bb.conv_stem, bb.bn1, *blocks[:k]]
    top = [*blocks[k:], bb.conv_head, bb.bn2]
    return stem, top, "backbone.bn2"


def _resnet_parts(bb: nn.Module, trainable_stages: int) -> tuple[list[nn.Module], list[nn.Module], str]:
    layers = [bb.layer1, bb.layer2, bb.layer3, bb.layer4]
    k = len(layers) - trainable_stages
    stem = [bb.conv1, bb.bn1, bb.act1, bb.maxpool, *layers[:k]]
    return stem, layers[k:], "backbone.layer4"


def _vgg_parts(bb: nn.Module, trainable_stages: int) -> tuple[list[nn.Module], list[nn.Module], str]:
    feats = list(bb.features)
    pools = [i for i, m in enumerate(feats) if isinstance(m, nn.MaxPool2d)]
    # a "stage" ends at a max-pool; the top takes the last ``trainable_stages`` of them
    cut = pools[-trainable_stages - 1] + 1 if 0 < trainable_stages < len(pools) else (0 if trainable_stages else
                                                                                         len(feats))
    last_conv = max(i for i, m in enumerate(feats) if isinstance(m, nn.Conv2d))
    return feats[:cut], [*feats[cut:], bb.pre_logits], f"backbone.features.{last_conv + 1}"


def backbone_parts(bb: nn.Module, trainable_stages: int) -> tuple[nn.Module, nn.Module, str]:
    """Split a timm backbone into (stem, top, Grad-CAM target layer name)."""
    cls = type(bb).__name__
    if cls == "EfficientNet":
        stem, top, target = _effnet_parts(bb, trainable_stages)
    elif cls == "ResNet":
        stem, top, target = _resnet_parts(bb, trainable_stages)
    elif cls == "VGG":
        stem, top, target = _vgg_parts(bb, trainable_stages)
    else:
        # Unknown family: all or nothing.
        feats = _ForwardFeatures(bb)
        return (nn.Identity(), feats, "") if trainable_stages else (feats, nn.Identity(), "")
    return nn.Sequential(*stem), nn.Sequential(*top), target


class _ForwardFeatures(nn.Module):
    def __init__(self, bb: nn.Module) -> None:
        super().__init__()
        self.bb = bb

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bb.forward_features(x)


def _out_features(bb: nn.Module) -> int:
    # timm's VGG ends in a ConvMlp whose width (head_hidden_size) is not num_features
    return int(getattr(bb, "head_hidden_size", None) or bb.num_features) if type(bb).__name__ == "VGG" else int(
        bb.num_features)


class CellClassifier(nn.Module):
    """CNN backbone (timm) + global pooling + dropout + linear head.

    Args:
        backbone: a timm model built with ``num_classes=0``.
        num_classes: number of output classes.
        dropout: dropout before the linear layer.
        trainable_stages: how many of the backbone's last stages form ``top`` (trained); the rest is ``stem``.
    """

    def __init__(self, backbone: nn.Module, num_classes: int, dropout: float = 0.3, trainable_stages: int = 1,
                 subclass_groups: list[int] | None = None) -> None:
        super().__init__()
        self.backbone = backbone
        stem, top, self.target_layer = backbone_parts(backbone, trainable_stages)
        # stem/top reference the backbone's own modules (no copies): the state dict stays the backbone's.
        object.__setattr__(self, "_stem", stem)
        object.__setattr__(self, "_top", top)
        self.pool = nn.AdaptiveAvgPool2d(1)
        n_out = len(subclass_groups) if subclass_groups else num_classes
        self.head = nn.Sequential(nn.Flatten(), nn.Dropout(dropout), nn.Linear(_out_features(backbone), n_out))
        self.subclasses = SubclassPooling(subclass_groups, num_classes) if subclass_groups else None

    def stem(self, x: torch.Tensor) -> torch.Tensor:
        return self._stem(x)

    def top(self, f: torch.Tensor) -> torch.Tensor:
        f = self._top(f)
        return self.pool(f) if f.ndim == 4 else f

    def trainable_modules(self) -> list[nn.Module]:
        return [self._top, self.head]

    def coarse(self, z: torch.Tensor) -> torch.Tensor:
        """Class logits from the head's output (the head's subclass logits pooled per class, when it has them)."""
        return z if self.subclasses is None else self.subclasses(z)

    def from_stem(self, f: torch.Tensor) -> torch.Tensor:
        """Class logits from the stem's output."""
        return self.coarse(self.head(self.top(f)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.from_stem(self.stem(x))


class SubclassPooling(nn.Module):
    """Class logits from subclass logits: ``logit(c) = log sum_{s in c} exp(logit(s))``, so that ``P(c)`` is the sum
    of its subclasses' probabilities under the softmax over subclasses.

    The network is trained on subclasses (e.g. the ALL subtypes of one dataset, plain classes elsewhere) and answers
    with the classes; written with exp / matmul / log (stable: the batch's largest logit is taken out) so that it
    exports to ONNX as plain operators.
    """

    def __init__(self, groups: list[int], num_classes: int) -> None:
        super().__init__()
        if sorted(set(groups)) != list(range(num_classes)):
            raise ValueError(f"every one of the {num_classes} classes needs a subclass; groups were {groups}")
        m = torch.zeros(len(groups), num_classes)
        m[torch.arange(len(groups)), torch.as_tensor(groups)] = 1.0
        self.register_buffer("membership", m)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        top = z.max(dim=1, keepdim=True).values
        return torch.log((z - top).exp() @ self.membership + 1e-30) + top


class HybridCNNTransformer(nn.Module):
    """A CNN feature map becomes tokens (1x1 projection, learned position embeddings, a class token); a few
    Transformer encoder layers attend over them; a head classifies the class token.

    The CNN part is ``stem`` (frozen, cacheable); the projection, encoder and head are ``top`` + ``head``.
    """

    def __init__(self, backbone: nn.Module, num_classes: int, grid: int, dim: int = 192, depth: int = 2,
                 heads: int = 4, dropout: float = 0.1, cnn_stages_frozen_until: int = 1) -> None:
        super().__init__()
        self.backbone = backbone
        stem, _, _ = backbone_parts(backbone, cnn_stages_frozen_until)
        object.__setattr__(self, "_stem", stem)
        with torch.no_grad():
            channels = stem(torch.zeros(1, 3, grid * 32, grid * 32)).shape[1]
        self.grid = grid
        self.proj = nn.Conv2d(channels, dim, 1)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos = nn.Parameter(torch.randn(1, grid * grid + 1, dim) * 0.02)
        layer = nn.TransformerEncoderLayer(dim, heads, dim * 2, dropout, batch_first=True, norm_first=True,
                                           activation="gelu")
        self.encoder = nn.TransformerEncoder(layer, depth, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Sequential(nn.Dropout(dropout), nn.Linear(dim, num_classes))
        self.target_layer = f"encoder.layers.{depth - 1}.norm1"

    def stem(self, x: torch.Tensor) -> torch.Tensor:
        return self._stem(x)

    def tokens(self, f: torch.Tensor) -> torch.Tensor:
        t = self.proj(f).flatten(2).transpose(1, 2)  # (B, N, dim)
        n = t.shape[1]
        pos = self.pos
        if n != pos.shape[1] - 1:  # other input size: interpolate the position grid
            g = int(math.isqrt(n))
            grid = pos[:, 1:].reshape(1, self.grid, self.grid, -1).permute(0, 3, 1, 2)
            grid = nn.functional.interpolate(grid, size=(g, g), mode="bilinear", align_corners=False)
            pos = torch.cat([pos[:, :1], grid.permute(0, 2, 3, 1).reshape(1, g * g, -1)], 1)
        return torch.cat([self.cls_token.expand(t.shape[0], -1, -1), t], 1) + pos

    def top(self, f: torch.Tensor) -> torch.Tensor:
        return self.norm(self.encoder(self.tokens(f)))[:, 0]

    def trainable_modules(self) -> list[nn.Module]:
        return [self.proj, self.encoder, self.norm, self.head, _ParamHolder(self.cls_token, self.pos)]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.top(self.stem(x)))


class _ParamHolder(nn.Module):
    def __init__(self, *params: nn.Parameter) -> None:
        super().__init__()
        self.params = nn.ParameterList(params)
