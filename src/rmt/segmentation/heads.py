"""Decode heads: UperNet (pyramid pooling + FPN fusion), the auxiliary FCN head, Semantic FPN.

Each head takes a list of feature maps (finest first) and returns class logits at the finest
map's resolution; :class:`rmt.segmentation.models.Segmentor` upsamples them to the input size.
Conv blocks are conv + BatchNorm + ReLU (torchvision's ``Conv2dNormActivation``), as in the
reference heads (which use SyncBN: converted under DDP on CUDA).
"""
from __future__ import annotations

import math
from typing import List, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.ops import Conv2dNormActivation

__all__ = ["UPerHead", "FCNHead", "SemanticFPNHead", "upsample"]


def _conv(in_channels: int, out_channels: int, kernel_size: int) -> nn.Module:
    return Conv2dNormActivation(in_channels, out_channels, kernel_size, norm_layer=nn.BatchNorm2d,
                                activation_layer=nn.ReLU)


def upsample(x: torch.Tensor, size) -> torch.Tensor:
    """Bilinear resize to ``size`` (``align_corners=False``, as the reference)."""
    return F.interpolate(x, size=tuple(size), mode="bilinear", align_corners=False)


class _Classifier(nn.Sequential):
    """Dropout, then a 1x1 conv to the classes."""

    def __init__(self, channels: int, num_classes: int, dropout: float):
        super().__init__(nn.Dropout2d(dropout) if dropout > 0 else nn.Identity(), nn.Conv2d(channels, num_classes, 1))
        nn.init.normal_(self[1].weight, std=0.01)
        nn.init.zeros_(self[1].bias)


class PyramidPooling(nn.Module):
    """Average-pool the map to each of ``scales`` x ``scales`` grids, 1x1 conv, upsample back, concat."""

    def __init__(self, in_channels: int, channels: int, scales: Sequence[int] = (1, 2, 3, 6)):
        super().__init__()
        self.branches = nn.ModuleList(nn.Sequential(nn.AdaptiveAvgPool2d(s), _conv(in_channels, channels, 1))
                                      for s in scales)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([x] + [upsample(branch(x), x.shape[-2:]) for branch in self.branches], dim=1)


class UPerHead(nn.Module):
    """UperNet: pyramid pooling on the coarsest map, a top-down FPN over all, fusion of every level.

    ``in_channels``: channels of the maps (finest first). Output ``(B, num_classes, H0, W0)`` at the
    finest map's resolution.
    """

    def __init__(self, in_channels: Sequence[int], num_classes: int, channels: int = 512,
                 pool_scales: Sequence[int] = (1, 2, 3, 6), dropout: float = 0.1):
        super().__init__()
        self.ppm = PyramidPooling(in_channels[-1], channels, pool_scales)
        self.ppm_bottleneck = _conv(in_channels[-1] + len(pool_scales) * channels, channels, 3)
        self.lateral_convs = nn.ModuleList(_conv(c, channels, 1) for c in in_channels[:-1])
        self.fpn_convs = nn.ModuleList(_conv(channels, channels, 3) for _ in in_channels[:-1])
        self.fpn_bottleneck = _conv(len(in_channels) * channels, channels, 3)
        self.classifier = _Classifier(channels, num_classes, dropout)

    def forward(self, feats: List[torch.Tensor]) -> torch.Tensor:
        laterals = [conv(f) for conv, f in zip(self.lateral_convs, feats)]
        laterals.append(self.ppm_bottleneck(self.ppm(feats[-1])))
        for i in range(len(laterals) - 1, 0, -1):  # top-down: add each coarser level to the next finer one
            laterals[i - 1] = laterals[i - 1] + upsample(laterals[i], laterals[i - 1].shape[-2:])
        outs = [conv(x) for conv, x in zip(self.fpn_convs, laterals[:-1])] + [laterals[-1]]
        size = outs[0].shape[-2:]
        fused = self.fpn_bottleneck(torch.cat([outs[0]] + [upsample(x, size) for x in outs[1:]], dim=1))
        return self.classifier(fused)


class FCNHead(nn.Module):
    """``num_convs`` 3x3 conv blocks and a classifier: the auxiliary head on one backbone level."""

    def __init__(self, in_channels: int, num_classes: int, channels: int = 256, num_convs: int = 1,
                 dropout: float = 0.1):
        super().__init__()
        self.convs = nn.Sequential(*[_conv(in_channels if i == 0 else channels, channels, 3) for i in range(num_convs)])
        self.classifier = _Classifier(channels, num_classes, dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.convs(x))


class SemanticFPNHead(nn.Module):
    """Semantic FPN's head: each FPN level goes through 3x3 conv blocks, each followed by a 2x
    upsampling, until it reaches the finest level's stride (at least one block per level); the
    levels are summed and classified.
    """

    def __init__(self, in_channels: int, strides: Sequence[int], num_classes: int, channels: int = 128,
                 dropout: float = 0.1):
        super().__init__()
        self.scale_heads = nn.ModuleList()
        for stride in strides:
            steps = max(1, int(math.log2(stride / strides[0])))
            blocks: List[nn.Module] = []
            for k in range(steps):
                blocks.append(_conv(in_channels if k == 0 else channels, channels, 3))
                if stride != strides[0]:
                    blocks.append(nn.Upsample(scale_factor=2, mode="bilinear", align_corners=False))
            self.scale_heads.append(nn.Sequential(*blocks))
        self.classifier = _Classifier(channels, num_classes, dropout)

    def forward(self, feats: List[torch.Tensor]) -> torch.Tensor:
        out = self.scale_heads[0](feats[0])
        for head, f in zip(self.scale_heads[1:], feats[1:]):
            out = out + upsample(head(f), out.shape[-2:])
        return self.classifier(out)
