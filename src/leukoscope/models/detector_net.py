"""The white-cell detector's network: a centre heatmap (CenterNet style) on EfficientNet-Lite0's first stages.

The trunk is EfficientNet-Lite0 up to its fifth stage (stride 16, 112 channels), with ImageNet weights; the head
fuses the stride-8 and stride-16 features and predicts, at stride 8, the logit that a white cell's centre lies in
each cell of the grid. Fields are resampled first so that a red cell measures ``work_rbc_px`` pixels (see
:mod:`leukoscope.preprocess.wbc_detector`), so the network always sees cells at one physical scale.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

TRUNK_STAGES = 5  # EfficientNet-Lite0 blocks[0:5]: stride 8 after blocks[2] (40 ch), stride 16 after blocks[4] (112)
F8_CHANNELS = 40
F16_CHANNELS = 112
STRIDE = 8
PRIOR = 0.01  # initial centre probability (CenterNet's focal-loss prior)


class Trunk(nn.Module):
    """EfficientNet-Lite0's stem and blocks[0:5]; returns the stride-8 and stride-16 feature maps."""

    def __init__(self, pretrained: str | bool = "auto") -> None:
        super().__init__()
        from leukoscope.models.backbones import create_backbone

        net, self.source = create_backbone("efficientnet_lite0", pretrained)
        self.conv_stem, self.bn1 = net.conv_stem, net.bn1
        self.blocks = nn.ModuleList(list(net.blocks)[:TRUNK_STAGES])

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = self.bn1(self.conv_stem(x))
        f8 = x
        for i, block in enumerate(self.blocks):
            x = block(x)
            if i == 2:
                f8 = x
        return f8, x


class Head(nn.Module):
    """Stride-8 and upsampled stride-16 features -> centre logits at stride 8."""

    def __init__(self, width: int = 48) -> None:
        super().__init__()
        self.lat8 = nn.Conv2d(F8_CHANNELS, width, 1)
        self.lat16 = nn.Conv2d(F16_CHANNELS, width, 1)
        self.body = nn.Sequential(
            nn.ReLU(inplace=True),
            nn.Conv2d(width, width, 3, padding=1, bias=False), nn.BatchNorm2d(width), nn.ReLU(inplace=True),
            nn.Conv2d(width, width, 3, padding=1, bias=False), nn.BatchNorm2d(width), nn.ReLU(inplace=True),
        )
        self.out = nn.Conv2d(width, 1, 1)
        nn.init.constant_(self.out.bias, -math.log((1 - PRIOR) / PRIOR))

    def forward(self, f8: torch.Tensor, f16: torch.Tensor) -> torch.Tensor:
        up = F.interpolate(self.lat16(f16), scale_factor=2.0, mode="bilinear", align_corners=False)
        up = up[..., :f8.shape[-2], :f8.shape[-1]]
        return self.out(self.body(self.lat8(f8) + up))


class DetectorNet(nn.Module):
    """Image ``(N, 3, H, W)`` normalised to [-1, 1], H and W multiples of 16 -> centre logits ``(N, 1, H/8, W/8)``."""

    def __init__(self, pretrained: str | bool = "auto", width: int = 48) -> None:
        super().__init__()
        self.trunk = Trunk(pretrained)
        self.head = Head(width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(*self.trunk(x))
