"""Multi-scale deformable attention (Deformable DETR, Zhu et al., ICLR 2021) in plain PyTorch.

Each query attends to a few points per head and level around its reference point instead of to
every position: the offsets and the attention weights are linear functions of the query, the
values at the (fractional) sampling locations are read by bilinear interpolation
(``grid_sample``), and a head's output is the weighted sum over its levels and points. This is the
reference "pytorch" path of the CUDA kernel Deformable DETR and Mask2Former ship: slower, but it
runs anywhere and needs no compilation.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def deformable_sample(
    value: Tensor, shapes: list[tuple[int, int]], locations: Tensor, weights: Tensor
) -> Tensor:
    """The core of multi-scale deformable attention.

    value: (B, S, H, Dh) per-head values of all levels, flattened and concatenated
    (S = sum h_l w_l); shapes: (h_l, w_l) per level; locations: (B, Q, H, L, P, 2) sampling
    points (x, y) in [0, 1] of each level's extent; weights: (B, Q, H, L, P) attention weights.
    Returns (B, Q, H * Dh): per head, sum over levels and points of weight x bilinear value
    (zero outside the map, cell centres at (i + 0.5) / size).
    """
    batch, _, heads, dim = value.shape
    _, queries, _, levels, points, _ = locations.shape
    per_level = value.split([h * w for h, w in shapes], dim=1)
    grids = 2 * locations - 1  # grid_sample's [-1, 1] frame
    sampled = []
    for level, (h, w) in enumerate(shapes):
        v = per_level[level].permute(0, 2, 3, 1).reshape(batch * heads, dim, h, w)
        g = grids[:, :, :, level].transpose(1, 2).reshape(batch * heads, queries, points, 2)
        sampled.append(
            F.grid_sample(v, g, mode="bilinear", padding_mode="zeros", align_corners=False)
        )  # (B*H, Dh, Q, P)
    stacked = torch.stack(sampled, dim=-2).flatten(-2)  # (B*H, Dh, Q, L*P)
    w = weights.transpose(1, 2).reshape(batch * heads, 1, queries, levels * points)
    out = (stacked * w).sum(-1)  # (B*H, Dh, Q)
    return out.view(batch, heads * dim, queries).transpose(1, 2)


class MultiScaleDeformableAttention(nn.Module):
    """MSDeformAttn: queries (B, Q, D) with reference points -> (B, Q, D).

    Args:
        channels: D.
        levels: number of feature levels L.
        heads: attention heads H (D divisible by H).
        points: sampling points P per head and level.
    """

    def __init__(self, channels: int, levels: int, heads: int, points: int) -> None:
        super().__init__()
        if channels % heads:
            raise ValueError(f"channels {channels} not divisible by heads {heads}")
        self.levels, self.heads, self.points = levels, heads, points
        self.sampling_offsets = nn.Linear(channels, heads * levels * points * 2)
        self.attention_weights = nn.Linear(channels, heads * levels * points)
        self.value_proj = nn.Linear(channels, channels)
        self.output_proj = nn.Linear(channels, channels)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        # Deformable DETR's init: zero offset weights and biases that start head h's points on a
        # ring in direction 2 pi h / H, point p at distance p + 1 cells; uniform attention.
        nn.init.zeros_(self.sampling_offsets.weight)
        angles = torch.arange(self.heads, dtype=torch.float32) * (2 * math.pi / self.heads)
        ring = torch.stack([angles.cos(), angles.sin()], -1)
        ring = ring / ring.abs().max(-1, keepdim=True).values
        ring = ring.view(self.heads, 1, 1, 2).repeat(1, self.levels, self.points, 1)
        ring = ring * torch.arange(1, self.points + 1, dtype=torch.float32).view(1, 1, -1, 1)
        with torch.no_grad():
            self.sampling_offsets.bias.copy_(ring.flatten())
        nn.init.zeros_(self.attention_weights.weight)
        nn.init.zeros_(self.attention_weights.bias)
        for proj in (self.value_proj, self.output_proj):
            nn.init.xavier_uniform_(proj.weight)
            nn.init.zeros_(proj.bias)

    def forward(
        self,
        query: Tensor,
        reference_points: Tensor,
        value: Tensor,
        shapes: list[tuple[int, int]],
    ) -> Tensor:
        """query: (B, Q, D) (with its position added); reference_points: (B, Q, L, 2) (x, y) in
        [0, 1] per level; value: (B, S, D) the flattened levels; shapes: (h_l, w_l) per level.
        Offsets are in cells of each level (divided by that level's (w_l, h_l))."""
        batch, queries, channels = query.shape
        h, lv, p = self.heads, self.levels, self.points
        v = self.value_proj(value).view(batch, value.shape[1], h, channels // h)
        offsets = self.sampling_offsets(query).view(batch, queries, h, lv, p, 2)
        weights = self.attention_weights(query).view(batch, queries, h, lv * p)
        weights = weights.softmax(-1).view(batch, queries, h, lv, p)
        # Locations and sampling in float32 even under bf16 autocast (as the CUDA kernel does):
        # bf16's 8-bit mantissa would move a point by up to a fifth of a cell on a 40-cell map.
        sizes = torch.tensor([(w, hh) for hh, w in shapes], dtype=torch.float32, device=v.device)
        offsets = offsets.float() / sizes[None, None, None, :, None]
        locations = reference_points.float()[:, :, None, :, None, :] + offsets
        sampled = deformable_sample(v.float(), shapes, locations, weights.float())
        return self.output_proj(sampled.to(query.dtype))
