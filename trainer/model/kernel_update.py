"""One K-Net kernel-update stage: K^{i-1}, M^{i-1} -> K^i, class logits, M^i.

1. X' = 1x1 conv(X) (feature transform).
2. Group features: F_n = pool(X' under M^{i-1}_n > threshold).
3. Adaptive kernel update: a gated combination of F_n and K^{i-1}_n (``KernelUpdator``).
4. Kernel interaction: 8-head self-attention across the N kernels (+ residual, LayerNorm), then
   an FFN (+ residual, LayerNorm). The result is K^i.
5. Class branch: Linear-LayerNorm-ReLU, then the class layer -> (N, C) logits.
   Mask branch: Linear-LayerNorm-ReLU, then Linear -> one 1x1 dynamic kernel per n; M^i_n = that
   kernel convolved with X'.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from trainer.model.kernel_head import mask_pool


def _linear_norm_relu(channels: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Linear(channels, channels, bias=False), nn.LayerNorm(channels), nn.ReLU(inplace=True)
    )


class KernelUpdator(nn.Module):
    """K-Net's gated kernel updater, D -> D.

    The grouped features F and the previous kernel K each give an "in" and an "out" projection;
    their product (F_in * K_in) drives two sigmoid gates that weigh F_out against K_out:
        K~ = sigmoid(LN(W_u G)) * LN(F_out) + sigmoid(LN(W_k G)) * LN(K_out),  G = F_in * K_in
    followed by Linear-LayerNorm-ReLU. LayerNorms make the update insensitive to the scale of F
    (K-Net sums, rather than averages, the features under a mask).
    """

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.channels = channels
        self.feature_layer = nn.Linear(channels, 2 * channels)  # F -> (F_in, F_out)
        self.kernel_layer = nn.Linear(channels, 2 * channels)  # K -> (K_in, K_out)
        self.feature_gate = nn.Linear(channels, channels)
        self.kernel_gate = nn.Linear(channels, channels)
        self.feature_gate_norm = nn.LayerNorm(channels)
        self.kernel_gate_norm = nn.LayerNorm(channels)
        self.feature_out_norm = nn.LayerNorm(channels)
        self.kernel_out_norm = nn.LayerNorm(channels)
        self.out = _linear_norm_relu(channels)

    def forward(self, features: Tensor, kernels: Tensor) -> Tensor:
        """features: (B, N, D) grouped features F; kernels: (B, N, D) K^{i-1} -> (B, N, D)."""
        f_in, f_out = self.feature_layer(features).chunk(2, dim=-1)
        k_in, k_out = self.kernel_layer(kernels).chunk(2, dim=-1)
        gate = f_in * k_in
        feature_gate = self.feature_gate_norm(self.feature_gate(gate)).sigmoid()
        kernel_gate = self.kernel_gate_norm(self.kernel_gate(gate)).sigmoid()
        updated = feature_gate * self.feature_out_norm(f_out) + kernel_gate * self.kernel_out_norm(
            k_out
        )
        return self.out(updated)


class KernelUpdateStage(nn.Module):
    """One update stage (K-Net's ``KernelUpdateHead`` with 1x1 kernels).

    Args:
        channels: D.
        num_heads: heads of the self-attention across kernels (8).
        ffn_dim: FFN hidden width (2048).
        mask_threshold: binarisation of the previous masks before pooling (0.5).
        pooling: "mean" or "sum" pooling of features under a mask.
    """

    def __init__(
        self,
        channels: int,
        num_heads: int = 8,
        ffn_dim: int = 2048,
        mask_threshold: float = 0.5,
        pooling: str = "mean",
    ) -> None:
        super().__init__()
        self.mask_threshold = mask_threshold
        self.pooling = pooling
        self.feat_transform = nn.Conv2d(channels, channels, 1)
        self.updator = KernelUpdator(channels)
        self.attention = nn.MultiheadAttention(channels, num_heads, batch_first=True)
        self.attention_norm = nn.LayerNorm(channels)
        self.ffn = nn.Sequential(
            nn.Linear(channels, ffn_dim), nn.ReLU(inplace=True), nn.Linear(ffn_dim, channels)
        )
        self.ffn_norm = nn.LayerNorm(channels)
        self.cls_branch = _linear_norm_relu(channels)
        self.mask_branch = _linear_norm_relu(channels)
        self.mask_kernel = nn.Linear(channels, channels)
        # K-Net's init: Xavier-uniform for every matrix of the update head.
        for p in self.parameters():
            if p.dim() > 1:
                nn.init.xavier_uniform_(p)

    def forward(
        self, features: Tensor, kernels: Tensor, masks: Tensor, class_head: nn.Module
    ) -> tuple[Tensor, Tensor, Tensor]:
        """features: (B, D, h, w) X; kernels: (B, N, D) K^{i-1}; masks: (B, N, h, w) M^{i-1}
        logits; class_head: the stage's class layer, (.., D) -> (.., C).

        Returns K^i (B, N, D), class logits (B, N, C), M^i (B, N, h, w) logits.
        """
        x = self.feat_transform(features)
        grouped = mask_pool(masks, x, self.mask_threshold, self.pooling)
        k = self.updator(grouped, kernels)
        k = self.attention_norm(k + self.attention(k, k, k, need_weights=False)[0])
        k = self.ffn_norm(k + self.ffn(k))
        logits = class_head(self.cls_branch(k))
        mask_kernels = self.mask_kernel(self.mask_branch(k))
        new_masks = torch.einsum("bnc,bchw->bnhw", mask_kernels, x)
        return k, logits, new_masks
