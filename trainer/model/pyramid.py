"""ViTDet-style simple feature pyramid: four levels from a ViT's single stride-14 map.

A plain ViT has one feature map (its last block's tokens). ViTDet (Li et al., 2022) shows that a
"simple feature pyramid" built from that one map alone, with deconvolutions for the finer levels
and pooling for the coarser one, works as well as a hierarchical FPN for dense heads. For a ViT
with patch 14 the levels sit at strides 3.5, 7, 14 and 28 (scale factors 4, 2, 1 and 1/2); every
consumer reads ``strides`` instead of assuming 4..32. ``model.pyramid_scales`` chooses other
factors, e.g. (2, 1, 1/2, 1/4) for strides 7..56 at a doubled input side.
"""

from __future__ import annotations

import math

from torch import Tensor, nn

VITDET_SCALES: tuple[float, ...] = (4.0, 2.0, 1.0, 0.5)  # strides 3.5, 7, 14, 28 for patch 14


def group_norm(channels: int) -> nn.GroupNorm:
    """GroupNorm with K-Net's 32 groups, or fewer when ``channels`` is not a multiple of 32."""
    return nn.GroupNorm(math.gcd(32, channels), channels)


def _scale_branch(in_channels: int, scale: float) -> tuple[nn.Module, int]:
    """The resampling branch for one scale factor; returns the module and its output channels.

    4: two stride-2 deconvolutions (channels /2 then /4) with norm + GELU between them (ViTDet);
    2: one deconvolution (channels /2); 1: identity; 0.5: 2x2 max pooling; 0.25: 4x4 max pooling.
    """
    if scale == 4.0:
        mid, out = in_channels // 2, in_channels // 4
        branch = nn.Sequential(
            nn.ConvTranspose2d(in_channels, mid, kernel_size=2, stride=2),
            group_norm(mid),
            nn.GELU(),
            nn.ConvTranspose2d(mid, out, kernel_size=2, stride=2),
        )
        return branch, out
    if scale == 2.0:
        out = in_channels // 2
        return nn.ConvTranspose2d(in_channels, out, kernel_size=2, stride=2), out
    if scale == 1.0:
        return nn.Identity(), in_channels
    if scale == 0.5:
        return nn.MaxPool2d(kernel_size=2, stride=2), in_channels
    if scale == 0.25:
        return nn.MaxPool2d(kernel_size=4, stride=4), in_channels
    raise ValueError(f"unsupported pyramid scale {scale}")


class SimpleFeaturePyramid(nn.Module):
    """Single-level backbone features -> ``len(scales)`` levels of ``channels`` channels.

    Each level: resampling branch, then 1x1 conv + norm and 3x3 conv + norm (ViTDet's output
    convs), so every level has the same width as an FPN output.

    Args:
        in_channels: channels of the backbone's one level (384 for ViT-S).
        in_stride: stride of that level in input pixels (14 for a /14 ViT).
        channels: output width of every level (the kernel dimension D).
        scales: resampling factors, finest first.
    """

    def __init__(
        self,
        in_channels: int,
        in_stride: float,
        channels: int,
        scales: tuple[float, ...] = VITDET_SCALES,
    ) -> None:
        super().__init__()
        scales = tuple(float(s) for s in scales)
        self.strides: tuple[float, ...] = tuple(float(in_stride) / s for s in scales)
        branches, outputs = [], []
        for scale in scales:
            branch, width = _scale_branch(in_channels, scale)
            branches.append(branch)
            outputs.append(
                nn.Sequential(
                    nn.Conv2d(width, channels, kernel_size=1, bias=False),
                    group_norm(channels),
                    nn.Conv2d(channels, channels, kernel_size=3, padding=1, bias=False),
                    group_norm(channels),
                )
            )
        self.branches = nn.ModuleList(branches)
        self.outputs = nn.ModuleList(outputs)

    def forward(self, levels: list[Tensor]) -> list[Tensor]:
        """levels: one tensor (B, in_channels, H/s, W/s) -> list of (B, channels, H/s_i, W/s_i),
        finest first, s_i = ``self.strides[i]``."""
        if len(levels) != 1:
            raise ValueError(f"simple feature pyramid expects one level, got {len(levels)}")
        x = levels[0]
        return [out(branch(x)) for branch, out in zip(self.branches, self.outputs)]
