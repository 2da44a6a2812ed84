"""Mask2Former's transformer decoder: N learnable queries refined by masked attention over three
scales, with class and mask predictions before the first layer and after every layer.

Queries start as learnable features (``query_feat``) with learnable positions (``query_pos``).
Layer i attends to scale i mod 3 (coarsest first: strides 32, 16, 8 on a ResNet) under the
attention mask of the previous prediction resized to that scale. The prediction heads are shared
by all layers: LayerNorm, then a class layer (C classes + no-object) and a 3-layer MLP whose output
is a dynamic 1x1 kernel over the mask features (stride 4). Every prediction is supervised (deep
supervision); the last one is the model's answer.

Saliency Prompt hook: ``inject`` rewrites the query features after the initial prediction and
before the first layer, the place K-Net's prompts take between its initial masks and the update
stages. **[choice]** So the initial prediction, and the first attention mask it makes, come from
the plain learned queries, and the prompts steer every decoder layer.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from trainer.model.mask2former.masked_attention import (
    CrossAttentionLayer,
    FFNLayer,
    SelfAttentionLayer,
    attention_mask,
)
from trainer.model.semantic_fpn import sine_positional_encoding


class MaskEmbed(nn.Module):
    """Mask2Former's 3-layer MLP: query -> dynamic mask kernel (D -> D -> D -> mask_dim)."""

    def __init__(self, channels: int, mask_dim: int) -> None:
        super().__init__()
        self.layers = nn.Sequential(
            nn.Linear(channels, channels),
            nn.ReLU(inplace=True),
            nn.Linear(channels, channels),
            nn.ReLU(inplace=True),
            nn.Linear(channels, mask_dim),
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.layers(x)


class MaskedTransformerDecoder(nn.Module):
    """Args: channels: D; num_queries: N; num_classes: C (the class layer has C + 1 outputs);
    heads, ffn_dim: attention heads and FFN width; layers: decoder layers (9); mask_dim: width of
    the mask features; scales: feature scales cycled over (3)."""

    def __init__(
        self,
        channels: int,
        num_queries: int,
        num_classes: int,
        heads: int = 8,
        ffn_dim: int = 2048,
        layers: int = 9,
        mask_dim: int = 256,
        scales: int = 3,
    ) -> None:
        super().__init__()
        self.heads = heads
        self.scales = scales
        self.query_feat = nn.Embedding(num_queries, channels)
        self.query_pos = nn.Embedding(num_queries, channels)
        self.level_embed = nn.Embedding(scales, channels)
        self.cross_attention = nn.ModuleList(
            CrossAttentionLayer(channels, heads) for _ in range(layers)
        )
        self.self_attention = nn.ModuleList(
            SelfAttentionLayer(channels, heads) for _ in range(layers)
        )
        self.ffn = nn.ModuleList(FFNLayer(channels, ffn_dim) for _ in range(layers))
        self.decoder_norm = nn.LayerNorm(channels)
        self.class_embed = nn.Linear(channels, num_classes + 1)  # a class layer
        self.mask_embed = MaskEmbed(channels, mask_dim)

    def predict(self, queries: Tensor, mask_features: Tensor) -> tuple[Tensor, Tensor]:
        """queries (B, N, D), mask features (B, D_mask, h, w) -> class logits (B, N, C + 1),
        mask logits (B, N, h, w)."""
        out = self.decoder_norm(queries)
        kernels = self.mask_embed(out)
        return self.class_embed(out), torch.einsum("bnc,bchw->bnhw", kernels, mask_features)

    def _memories(self, scales: list[Tensor]) -> list[tuple[Tensor, Tensor, tuple[int, int]]]:
        """Each scale flattened to (B, S, D) with its level embedding, its sine positions and
        its (h, w)."""
        out = []
        for i, x in enumerate(scales):
            b, d, h, w = x.shape
            pos = sine_positional_encoding(b, h, w, d, x.device, x.dtype).flatten(2)
            memory = x.flatten(2) + self.level_embed.weight[i][None, :, None].to(x.dtype)
            out.append((memory.transpose(1, 2), pos.transpose(1, 2), (h, w)))
        return out

    def forward(
        self,
        mask_features: Tensor,
        scales: list[Tensor],
        inject: Callable[[Tensor], Tensor] | None = None,
    ) -> tuple[dict[str, Any], list[dict[str, Tensor]]]:
        """mask_features: (B, D_mask, h, w); scales: ``self.scales`` maps (B, D, h_i, w_i),
        coarsest first; inject: rewrites the (B, N, D) query features before the first layer.

        Returns the initial prediction {"masks", "logits", "kernels": query features before
        ``inject``} and one {"masks", "logits", "kernels": the layer's output queries} per layer.
        """
        if len(scales) != self.scales:
            raise ValueError(f"expected {self.scales} feature scales, got {len(scales)}")
        batch, dtype = mask_features.shape[0], mask_features.dtype
        memories = self._memories(scales)
        query_pos = self.query_pos.weight[None].expand(batch, -1, -1).to(dtype)
        queries = self.query_feat.weight[None].expand(batch, -1, -1).to(dtype)
        logits, masks = self.predict(queries, mask_features)
        init = {"masks": masks, "logits": logits, "kernels": queries}
        if inject is not None:
            queries = inject(queries)
        stages = []
        layers = zip(self.cross_attention, self.self_attention, self.ffn)
        for i, (cross, self_attention, ffn) in enumerate(layers):
            memory, pos, size = memories[i % self.scales]
            blocked = attention_mask(masks, size, self.heads)
            queries = cross(queries, query_pos, memory, pos, blocked)
            queries = ffn(self_attention(queries, query_pos))
            logits, masks = self.predict(queries, mask_features)
            stages.append({"masks": masks, "logits": logits, "kernels": queries})
        return init, stages
