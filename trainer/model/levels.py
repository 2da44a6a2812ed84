"""What every model kind reads from its backbone: the levels of a batch (run without a graph when
the backbone is wholly frozen, or taken from the feature cache), and the size its inputs must be
padded to."""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor, nn


def padding_divisor(backbone: Any, strides: tuple[float, ...]) -> int:
    """Inputs are padded to a multiple of this: the lcm of the backbone's divisor and the
    coarsest pyramid stride (ValueError when that stride is not an integer)."""
    coarsest = strides[-1]
    if coarsest != int(coarsest):
        raise ValueError(f"coarsest pyramid stride {coarsest} is not an integer")
    return math.lcm(int(backbone.size_divisor), int(coarsest))


def run_backbone(backbone: nn.Module, images: Tensor) -> list[Tensor]:
    """The backbone's levels of ``images``; a fully frozen backbone needs no graph, so it runs
    without one (saves activation memory)."""
    if any(p.requires_grad for p in backbone.parameters()):
        return list(backbone(images))
    with torch.no_grad():
        return list(backbone(images))


def backbone_levels(backbone: nn.Module, images: Any) -> tuple[list[Tensor], tuple[int, int]]:
    """Backbone levels and the padded input size, from images (B, 3, H, W) or from a batch of
    cached levels (``trainer.data.frozen_features.BackboneLevels``: "levels", "input_size")."""
    if hasattr(images, "levels"):
        return list(images.levels), tuple(images.input_size)
    return run_backbone(backbone, images), tuple(images.shape[-2:])
