"""Masked attention and the three sub-layers of a Mask2Former decoder layer.

Masked attention (Mask2Former's key idea): query n's cross-attention to the image features is
restricted to the positions inside its own mask predicted by the previous layer (sigmoid >= 0.5,
resized to the attended scale). A query whose previous mask is empty would attend to nothing (a
softmax over no position is undefined), so it attends to every position instead, as the reference
implementation does. The mask is computed without gradient.

Each decoder layer is: masked cross-attention, then self-attention across queries, then an FFN,
each with a residual and a LayerNorm after it (Mask2Former's post-norm, dropout 0). Queries carry
learned positions and features carry sine positions; both are added to queries and keys only.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


@torch.no_grad()
def attention_mask(mask_logits: Tensor, size: tuple[int, int], heads: int) -> Tensor:
    """mask_logits: (B, N, h, w) -> (B * heads, N, size[0] * size[1]) bool, True where query n
    may NOT attend (outside its mask), all False for a query whose resized mask is empty."""
    resized = F.interpolate(mask_logits.float(), size=size, mode="bilinear", align_corners=False)
    blocked = resized.flatten(2).sigmoid() < 0.5  # (B, N, S)
    # Empty mask: attend everywhere. A logical and, not an indexed write, so the ONNX graph has
    # no Where on booleans (onnxruntime has no kernel for it).
    blocked = blocked & ~blocked.all(dim=-1, keepdim=True)
    return blocked.repeat_interleave(heads, dim=0)


def _xavier(module: nn.Module) -> None:
    for p in module.parameters():
        if p.dim() > 1:
            nn.init.xavier_uniform_(p)


class CrossAttentionLayer(nn.Module):
    """Queries attend to one scale's features, under the attention mask."""

    def __init__(self, channels: int, heads: int) -> None:
        super().__init__()
        self.attention = nn.MultiheadAttention(channels, heads, batch_first=True)
        self.norm = nn.LayerNorm(channels)
        _xavier(self)

    def forward(
        self,
        queries: Tensor,
        query_pos: Tensor,
        memory: Tensor,
        memory_pos: Tensor,
        mask: Tensor | None,
    ) -> Tensor:
        """queries, query_pos: (B, N, D); memory, memory_pos: (B, S, D); mask: (B*H, N, S) bool
        (True = blocked) or None."""
        out = self.attention(
            queries + query_pos, memory + memory_pos, memory, attn_mask=mask, need_weights=False
        )[0]
        return self.norm(queries + out)


class SelfAttentionLayer(nn.Module):
    """Queries attend to each other (positions on queries and keys)."""

    def __init__(self, channels: int, heads: int) -> None:
        super().__init__()
        self.attention = nn.MultiheadAttention(channels, heads, batch_first=True)
        self.norm = nn.LayerNorm(channels)
        _xavier(self)

    def forward(self, queries: Tensor, query_pos: Tensor) -> Tensor:
        q = queries + query_pos
        return self.norm(queries + self.attention(q, q, queries, need_weights=False)[0])


class FFNLayer(nn.Module):
    """Linear-ReLU-Linear (+ residual, LayerNorm)."""

    def __init__(self, channels: int, ffn_dim: int) -> None:
        super().__init__()
        self.ffn = nn.Sequential(
            nn.Linear(channels, ffn_dim), nn.ReLU(inplace=True), nn.Linear(ffn_dim, channels)
        )
        self.norm = nn.LayerNorm(channels)
        _xavier(self)

    def forward(self, queries: Tensor) -> Tensor:
        return self.norm(queries + self.ffn(queries))
