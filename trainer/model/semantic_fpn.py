"""Semantic-FPN fusion of the pyramid levels into one map at the mask stride (K-Net's
``SemanticFPNWrapper``, Panoptic FPN's semantic branch).

Level i (0 = finest) passes through i blocks of [3x3 conv, GroupNorm, ReLU, 2x bilinear upsampling],
level 0 through one block without upsampling, so every level lands on the finest grid; the sum is
projected twice by 1x1 conv + GroupNorm + ReLU: once into the localisation features (initial masks)
and once into the semantic features (semantic logits). A sine positional encoding is added to the
coarsest level before its blocks, so the kernels can tell positions apart (K-Net's choice).

**[choice]** K-Net's instance model fuses to stride 8 and upsamples its mask predictions 2x; this
project fuses directly to the pyramid's finest stride (4 ResNet, 3.5 ViT), which is the mask stride.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from trainer.model.pyramid import group_norm


def sine_positional_encoding(
    batch: int, height: int, width: int, channels: int, device: torch.device, dtype: torch.dtype
) -> Tensor:
    """DETR's normalised 2-D sine encoding, (B, channels, H, W): first half y, second half x.

    Positions are normalised to (0, 2*pi] over the map (padding is not masked, as in K-Net).
    """
    if channels % 2:
        raise ValueError(f"positional encoding needs an even channel count, got {channels}")
    num_feats = channels // 2
    scale, eps, temperature = 2 * math.pi, 1e-6, 10000.0
    y = torch.arange(1, height + 1, device=device, dtype=torch.float32)
    x = torch.arange(1, width + 1, device=device, dtype=torch.float32)
    y = y / (height + eps) * scale
    x = x / (width + eps) * scale
    dim_t = torch.arange(num_feats, device=device, dtype=torch.float32)
    dim_t = temperature ** (2 * torch.div(dim_t, 2, rounding_mode="floor") / num_feats)

    def encode(pos: Tensor) -> Tensor:  # (L,) -> (L, num_feats): sin on even, cos on odd dims
        p = pos[:, None] / dim_t
        return torch.stack((p[:, 0::2].sin(), p[:, 1::2].cos()), dim=2).flatten(1)

    pos_y = encode(y).T[:, :, None].expand(num_feats, height, width)
    pos_x = encode(x).T[:, None, :].expand(num_feats, height, width)
    pos = torch.cat((pos_y, pos_x), dim=0).to(dtype)
    return pos[None].expand(batch, channels, height, width)


def _conv_block(in_channels: int, out_channels: int, kernel_size: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, kernel_size, padding=kernel_size // 2, bias=False),
        group_norm(out_channels),
        nn.ReLU(inplace=True),
    )


class SemanticFPN(nn.Module):
    """Pyramid levels -> (localisation features, semantic features) at the finest level's grid.

    Args:
        channels: width of the pyramid levels and of both outputs.
        num_levels: number of pyramid levels (4).
    """

    def __init__(self, channels: int, num_levels: int = 4) -> None:
        super().__init__()
        self.channels = channels
        self.towers = nn.ModuleList(
            nn.ModuleList(_conv_block(channels, channels, 3) for _ in range(max(i, 1)))
            for i in range(num_levels)
        )
        self.loc_out = _conv_block(channels, channels, 1)
        self.sem_out = _conv_block(channels, channels, 1)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):  # K-Net initialises these convs N(0, 0.01)
                nn.init.normal_(m.weight, std=0.01)

    def forward(self, levels: list[Tensor]) -> tuple[Tensor, Tensor]:
        """levels: P2..P5, (B, D, h_i, w_i) finest first -> two (B, D, h_0, w_0) maps."""
        if len(levels) != len(self.towers):
            raise ValueError(f"expected {len(self.towers)} levels, got {len(levels)}")
        sizes = [x.shape[-2:] for x in levels]
        fused = None
        last = len(levels) - 1
        for i, (x, tower) in enumerate(zip(levels, self.towers)):
            if i == last:
                b, c, h, w = x.shape
                x = x + sine_positional_encoding(b, h, w, c, x.device, x.dtype)
            for j, block in enumerate(tower):
                x = block(x)
                if i > 0:  # block j of level i upsamples to level i-1-j's grid
                    size = sizes[i - 1 - j]
                    x = F.interpolate(x, size=size, mode="bilinear", align_corners=False)
            fused = x if fused is None else fused + x
        return self.loc_out(fused), self.sem_out(fused)
