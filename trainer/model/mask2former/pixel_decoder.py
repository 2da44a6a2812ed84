"""Mask2Former's pixel decoders: backbone levels -> mask features and three scales for the decoder.

Deformable (Mask2Former's ``MSDeformAttnPixelDecoder``): the three coarsest levels (strides 8, 16,
32 on a ResNet) are projected to D channels (1x1 conv + GroupNorm), flattened together and refined
by ``encoder_layers`` multi-scale deformable self-attention layers (each query attends to 4 points
per head on every level, around its own position); the finest level (stride 4) joins through an
FPN step (lateral 1x1 conv + the upsampled stride-8 output, 3x3 conv). FPN (``BasePixelDecoder``,
the plain option): a top-down FPN over all levels.

Both return the mask features (B, D_mask, H/4, W/4), the decoder's three scales (coarsest first)
and the four-level pyramid P2..P5 (finest first) that prompts pool from.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from trainer.model.mask2former.deformable_attention import MultiScaleDeformableAttention
from trainer.model.pyramid import group_norm
from trainer.model.semantic_fpn import sine_positional_encoding

DECODER_SCALES = 3  # the transformer decoder cycles over the three coarsest levels


def _conv_norm(in_channels: int, out_channels: int, kernel: int, relu: bool) -> nn.Sequential:
    layers: list[nn.Module] = [
        nn.Conv2d(in_channels, out_channels, kernel, padding=kernel // 2, bias=False),
        group_norm(out_channels),
    ]
    if relu:
        layers.append(nn.ReLU(inplace=True))
    for m in layers:
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_uniform_(m.weight, a=1)  # detectron2's c2_xavier_fill
    return nn.Sequential(*layers)


class DeformableEncoderLayer(nn.Module):
    """Deformable self-attention over all levels (+ residual, LayerNorm), FFN (+ residual, LN)."""

    def __init__(self, channels: int, levels: int, heads: int, points: int, ffn_dim: int) -> None:
        super().__init__()
        self.attention = MultiScaleDeformableAttention(channels, levels, heads, points)
        self.norm1 = nn.LayerNorm(channels)
        self.ffn = nn.Sequential(
            nn.Linear(channels, ffn_dim), nn.ReLU(inplace=True), nn.Linear(ffn_dim, channels)
        )
        self.norm2 = nn.LayerNorm(channels)
        for linear in (self.ffn[0], self.ffn[2]):
            nn.init.xavier_uniform_(linear.weight)

    def forward(
        self, src: Tensor, pos: Tensor, reference_points: Tensor, shapes: list[tuple[int, int]]
    ) -> Tensor:
        src = self.norm1(src + self.attention(src + pos, reference_points, src, shapes))
        return self.norm2(src + self.ffn(src))


def reference_points(
    shapes: list[tuple[int, int]], batch: int, device: torch.device, dtype: torch.dtype
) -> Tensor:
    """(B, S, L, 2): every cell centre of every level, (x, y) in [0, 1], repeated per level
    (no padding mask: every cell of the padded batch is valid, as in the image-only decoder)."""
    points = []
    for h, w in shapes:
        y, x = torch.meshgrid(
            (torch.arange(h, device=device, dtype=dtype) + 0.5) / h,
            (torch.arange(w, device=device, dtype=dtype) + 0.5) / w,
            indexing="ij",
        )
        points.append(torch.stack([x.flatten(), y.flatten()], -1))
    flat = torch.cat(points)  # (S, 2)
    return flat[None, :, None].expand(batch, -1, len(shapes), -1)


class DeformablePixelDecoder(nn.Module):
    """Args: level_channels: backbone (or simple-pyramid) channels, finest first (4 levels);
    channels: D (conv_dim); mask_dim: mask feature width; layers, heads, points, ffn_dim: the
    deformable encoder (6, 8, 4, 1024 published)."""

    def __init__(
        self,
        level_channels: tuple[int, ...],
        channels: int,
        mask_dim: int,
        layers: int = 6,
        heads: int = 8,
        points: int = 4,
        ffn_dim: int = 1024,
    ) -> None:
        super().__init__()
        if len(level_channels) != DECODER_SCALES + 1:
            raise ValueError(f"the pixel decoder needs 4 levels, got {len(level_channels)}")
        coarse = level_channels[1:][::-1]  # strides 32, 16, 8
        self.input_proj = nn.ModuleList(
            nn.Sequential(nn.Conv2d(c, channels, 1), group_norm(channels)) for c in coarse
        )
        for proj in self.input_proj:
            nn.init.xavier_uniform_(proj[0].weight, gain=1)
            nn.init.zeros_(proj[0].bias)
        self.level_embed = nn.Parameter(torch.randn(DECODER_SCALES, channels))
        self.encoder = nn.ModuleList(
            DeformableEncoderLayer(channels, DECODER_SCALES, heads, points, ffn_dim)
            for _ in range(layers)
        )
        self.lateral = _conv_norm(level_channels[0], channels, 1, relu=False)
        self.output = _conv_norm(channels, channels, 3, relu=True)
        self.mask_features = nn.Conv2d(channels, mask_dim, 1)
        nn.init.kaiming_uniform_(self.mask_features.weight, a=1)
        nn.init.zeros_(self.mask_features.bias)

    def forward(self, levels: list[Tensor]) -> tuple[Tensor, list[Tensor], list[Tensor]]:
        """levels: 4 tensors (B, C_i, H/s_i, W/s_i) finest first -> (mask features (B, D_mask,
        H/s_0, W/s_0), decoder scales [s_3, s_2, s_1] (B, D, ...), pyramid [s_0..s_3])."""
        coarse = [proj(x) for proj, x in zip(self.input_proj, levels[1:][::-1])]
        shapes = [(int(x.shape[-2]), int(x.shape[-1])) for x in coarse]
        batch, channels = coarse[0].shape[:2]
        src = torch.cat([x.flatten(2) for x in coarse], 2).transpose(1, 2)  # (B, S, D)
        pos = torch.cat(
            [
                sine_positional_encoding(batch, h, w, channels, x.device, x.dtype).flatten(2)
                + self.level_embed[i][None, :, None].to(x.dtype)
                for i, (x, (h, w)) in enumerate(zip(coarse, shapes))
            ],
            2,
        ).transpose(1, 2)
        ref = reference_points(shapes, batch, src.device, src.dtype)
        for layer in self.encoder:
            src = layer(src, pos, ref, shapes)
        outs = [
            part.transpose(1, 2).reshape(batch, channels, h, w)
            for part, (h, w) in zip(src.split([h * w for h, w in shapes], 1), shapes)
        ]
        finest = self.lateral(levels[0])
        up = F.interpolate(outs[-1], size=finest.shape[-2:], mode="bilinear", align_corners=False)
        finest = self.output(finest + up)
        return self.mask_features(finest), outs, [finest, *outs[::-1]]


class FPNPixelDecoder(nn.Module):
    """A plain top-down FPN over the four levels (Mask2Former's ``BasePixelDecoder``): the
    coarsest level through a 3x3 conv, each finer one a lateral 1x1 conv plus the nearest-
    upsampled coarser output through a 3x3 conv; mask features by a 3x3 conv."""

    def __init__(self, level_channels: tuple[int, ...], channels: int, mask_dim: int) -> None:
        super().__init__()
        if len(level_channels) != DECODER_SCALES + 1:
            raise ValueError(f"the pixel decoder needs 4 levels, got {len(level_channels)}")
        coarse_first = level_channels[::-1]
        self.lateral = nn.ModuleList(
            [nn.Identity()] + [_conv_norm(c, channels, 1, relu=False) for c in coarse_first[1:]]
        )
        self.output = nn.ModuleList(
            _conv_norm(c if i == 0 else channels, channels, 3, relu=True)
            for i, c in enumerate(coarse_first)
        )
        self.mask_features = nn.Conv2d(channels, mask_dim, 3, padding=1)
        nn.init.kaiming_uniform_(self.mask_features.weight, a=1)
        nn.init.zeros_(self.mask_features.bias)

    def forward(self, levels: list[Tensor]) -> tuple[Tensor, list[Tensor], list[Tensor]]:
        """Same contract as :meth:`DeformablePixelDecoder.forward`."""
        outs: list[Tensor] = []
        for i, x in enumerate(levels[::-1]):
            if i == 0:
                y = self.output[0](x)
            else:
                up = F.interpolate(outs[-1], size=x.shape[-2:], mode="nearest")
                y = self.output[i](self.lateral[i](x) + up)
            outs.append(y)
        return self.mask_features(outs[-1]), outs[:DECODER_SCALES], outs[::-1]
