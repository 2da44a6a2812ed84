"""K-Net's kernel head: N learned kernels, their initial masks, K^0 and the semantic logits.

The pyramid is fused by the semantic FPN into localisation features F_loc and semantic features
F_sem at the mask stride. Kernel n (D-d, initialised N(0, 1)) is a 1x1 convolution over F_loc: its
initial mask M^0_n. The features the update stages see are X = F_loc + F_sem, and the initial kernel
is K^0_n = kernel_n + pool(X under the binarised M^0_n) (K-Net's ``proposal_feats_with_obj``).
A 1x1 conv over F_sem gives per-pixel class logits (the semantic loss, a class-layer).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from trainer.model.pyramid import group_norm
from trainer.model.semantic_fpn import SemanticFPN


def prior_bias(prob: float) -> float:
    """Bias whose sigmoid is ``prob`` (focal-loss initialisation: rare positives at start)."""
    return -math.log((1 - prob) / prob)


def mask_pool(masks: Tensor, features: Tensor, threshold: float, mode: str) -> Tensor:
    """Pool features under binarised masks.

    masks: (B, N, h, w) logits; features: (B, C, h, w) -> (B, N, C).
    A mask is ``sigmoid(logit) > threshold``; no gradient flows through the binarisation.
    mode "sum": K-Net's sum over the mask; "mean": divided by the mask's cell count (0 if empty).
    """
    binary = (masks.detach().sigmoid() > threshold).to(features.dtype)
    pooled = torch.einsum("bnhw,bchw->bnc", binary, features)
    if mode == "sum":
        return pooled
    if mode == "mean":
        return pooled / binary.sum(dim=(2, 3)).clamp(min=1.0)[..., None]
    raise ValueError(f"unknown kernel pooling '{mode}' (expected 'mean' or 'sum')")


def _conv_norm_relu(channels: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(channels, channels, 1, bias=False), group_norm(channels), nn.ReLU(inplace=True)
    )


class KernelHead(nn.Module):
    """Pyramid -> initial masks, semantic logits and K^0.

    Args:
        channels: D, the pyramid width and kernel dimension.
        num_kernels: N.
        num_classes: C (1 in pre-training).
        num_levels: pyramid levels fused by the semantic FPN.
        mask_threshold: binarisation of the initial masks before pooling.
        pooling: "mean" or "sum" (see ``ModelConfig.kernel_pooling``).
    """

    def __init__(
        self,
        channels: int,
        num_kernels: int,
        num_classes: int,
        num_levels: int = 4,
        mask_threshold: float = 0.5,
        pooling: str = "mean",
    ) -> None:
        super().__init__()
        if pooling not in ("mean", "sum"):
            raise ValueError(f"unknown kernel pooling '{pooling}' (expected 'mean' or 'sum')")
        self.mask_threshold = mask_threshold
        self.pooling = pooling
        self.semantic_fpn = SemanticFPN(channels, num_levels)
        self.loc_conv = _conv_norm_relu(channels)
        self.seg_conv = _conv_norm_relu(channels)
        # The N learned kernels; N(0, 1) as in K-Net (kernel_init_std=1).
        self.kernels = nn.Parameter(torch.randn(num_kernels, channels))
        # Class layer (fine-tuning re-initialises it when the class count changes).
        self.semantic_conv = nn.Conv2d(channels, num_classes, 1)
        for conv in (self.loc_conv[0], self.seg_conv[0], self.semantic_conv):
            nn.init.normal_(conv.weight, std=0.01)
        nn.init.constant_(self.semantic_conv.bias, prior_bias(0.01))

    def forward(self, levels: list[Tensor]) -> dict[str, Tensor]:
        """levels: P2..P5 (B, D, h_i, w_i) finest first. Returns, with (h, w) the finest grid:
        masks (B, N, h, w) initial mask logits; semantic (B, C, h, w) logits;
        kernels (B, N, D) K^0; features (B, D, h, w) X for the update stages."""
        loc, sem = self.semantic_fpn(levels)
        loc = self.loc_conv(loc)
        sem = self.seg_conv(sem)
        masks = torch.einsum("nc,bchw->bnhw", self.kernels.to(loc.dtype), loc)
        features = loc + sem
        pooled = mask_pool(masks, features, self.mask_threshold, self.pooling)
        kernels = self.kernels[None].to(pooled.dtype) + pooled
        return {
            "masks": masks,
            "semantic": self.semantic_conv(sem),
            "kernels": kernels,
            "features": features,
        }
