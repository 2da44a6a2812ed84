"""The neck: backbone levels -> a four-level pyramid P2..P5 of ``channels`` channels.

A hierarchical backbone (ResNet C2..C5 at strides 4..32) goes through torchvision's
``FeaturePyramidNetwork`` (K-Net's FPN: 4 outputs, no extra levels). A plain ViT (one stride-14
level) goes through the ViTDet simple feature pyramid (strides 3.5..28). Either way the neck
exposes ``strides`` (finest first), which is what every pixel <-> grid mapping reads.
"""

from __future__ import annotations

from collections import OrderedDict

from torch import Tensor, nn
from torchvision.ops import FeaturePyramidNetwork

from trainer.model.pyramid import VITDET_SCALES, SimpleFeaturePyramid


class FPNNeck(nn.Module):
    """torchvision FPN over all backbone levels; list in, list out (same strides)."""

    def __init__(
        self, in_channels: tuple[int, ...], in_strides: tuple[float, ...], channels: int
    ) -> None:
        super().__init__()
        self.fpn = FeaturePyramidNetwork(list(in_channels), channels)
        self.strides: tuple[float, ...] = tuple(float(s) for s in in_strides)

    def forward(self, levels: list[Tensor]) -> list[Tensor]:
        """levels: (B, C_i, H/s_i, W/s_i) finest first -> (B, channels, H/s_i, W/s_i)."""
        named = OrderedDict((str(i), x) for i, x in enumerate(levels))
        return list(self.fpn(named).values())


def build_neck(
    level_channels: tuple[int, ...],
    level_strides: tuple[float, ...],
    channels: int,
    pyramid_scales: tuple[float, ...] = VITDET_SCALES,
) -> FPNNeck | SimpleFeaturePyramid:
    """FPN for a multi-level backbone, simple feature pyramid (``pyramid_scales``, finest first)
    for a single-level (ViT) one."""
    if len(level_channels) != len(level_strides):
        raise ValueError("backbone level_channels and level_strides differ in length")
    if len(level_channels) == 1:
        return SimpleFeaturePyramid(level_channels[0], level_strides[0], channels, pyramid_scales)
    if len(level_channels) != 4:
        raise ValueError(f"K-Net expects 4 backbone levels (C2..C5), got {len(level_channels)}")
    return FPNNeck(tuple(level_channels), tuple(level_strides), channels)
