"""A frozen backbone's levels for a training batch, defined per image, so they can be cached.

When the backbone is fully frozen its output for an (image, input size, flip) never changes, and
the trainer may read it from the feature cache (``trainer.data.feature_cache``) instead of recomputing
it. For the two to give the same losses, the features must not depend on the batch an image
happens to share: they are defined per image.

- Each image's levels are the backbone's output for that image alone, cropped to its own pixels
  and run as a batch of one, so they are bitwise a function of (image, size, flip). In a padded
  batch the ViT (per-image position embedding, padded tokens masked as attention keys) gives the
  same values only to float rounding: an image that fills the batch's grid takes plain attention,
  a padded one masked attention, and they differ in the last bits (up to 6e-5 on the demo). The
  cache keeps whichever batch computed an image first, so a run's results depended on the cache's
  history. Only batch-invariant backbones come here.
- In the batch, each image's cells sit top-left in the padded grid and every other cell is zero.

:class:`BackboneLevels` carries such a batch to the model in place of the image tensor; models
skip their backbone when handed one. A backbone that is not batch invariant (ResNet: border cells
read the batch padding) cannot be defined per image and is computed by the model as before.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from pipeline.backbones.backbone import Backbone
from pipeline.precision import autocast


@dataclass
class BackboneLevels:
    """Backbone levels of a padded batch, standing in for its (B, 3, H, W) image tensor.

    levels: one (B, C_k, H / s_k, W / s_k) tensor per backbone level; input_size: (H, W) of the
    padded image batch they stand for. ``shape`` and ``device`` answer as the image tensor would,
    so code that reads the batch size or the input size works unchanged.
    """

    levels: list[Tensor]
    input_size: tuple[int, int]

    @property
    def shape(self) -> tuple[int, int, int, int]:
        return (self.levels[0].shape[0], 3, *self.input_size)

    @property
    def device(self) -> torch.device:
        return self.levels[0].device


def is_fully_frozen(backbone: Backbone) -> bool:
    """No backbone parameter is trained."""
    return not any(p.requires_grad for p in backbone.parameters())


def valid_cells(size: tuple[int, int], stride: float) -> tuple[int, int]:
    """Cells of a level with ``stride`` that cover an (h, w) image: ceil(h / s), ceil(w / s)."""
    return math.ceil(size[0] / stride), math.ceil(size[1] / stride)


@torch.no_grad()
def per_image_levels(
    backbone: Backbone, images: Tensor, sizes: Sequence[tuple[int, int]]
) -> list[list[Tensor]]:
    """For each image of a padded batch, its levels cropped to its own cells (contiguous)."""
    levels = backbone(images, [tuple(s) for s in sizes])
    out = []
    for i, size in enumerate(sizes):
        crops = []
        for level, stride in zip(levels, backbone.level_strides):
            h, w = valid_cells(size, stride)
            crops.append(level[i, :, :h, :w].contiguous())
        out.append(crops)
    return out


def assemble(
    per_image: Sequence[Sequence[Tensor]],
    strides: Sequence[float],
    input_size: tuple[int, int],
) -> BackboneLevels:
    """Zero-filled padded levels with each image's cells top-left: the batch the model sees."""
    levels = []
    for k, stride in enumerate(strides):
        first = per_image[0][k]
        grid = (math.ceil(input_size[0] / stride), math.ceil(input_size[1] / stride))
        batch = first.new_zeros((len(per_image), first.shape[0], *grid))
        for i, crops in enumerate(per_image):
            h, w = crops[k].shape[-2:]
            batch[i, :, :h, :w] = crops[k]
        levels.append(batch)
    return BackboneLevels(levels, input_size)


class FrozenFeatures:
    """Batch -> :class:`BackboneLevels` for a fully frozen, batch-invariant backbone.

    ``store`` (optional, a :class:`trainer.data.feature_cache.FeatureStore`) supplies levels the data
    loader already found on disk (``info["cached_levels"]``) and keeps what is computed here;
    without it every image is computed. ``calls`` counts backbone forward passes, one per image
    not found in the cache (for tests and the benchmark: a fully cached epoch makes none).
    """

    def __init__(
        self, backbone: Backbone, store: Any | None = None, precision: str = "fp32"
    ) -> None:
        if not getattr(backbone, "batch_invariant", False):
            raise ValueError(
                f"{backbone.name} is not batch invariant: its features depend on the batch"
            )
        self.backbone = backbone
        self.store = store
        self.precision = precision  # the backbone's autocast; its levels are handed on in fp32
        self.calls = 0

    def __call__(self, images: Tensor, infos: Sequence[dict[str, Any]]) -> BackboneLevels:
        """images: the padded batch on its device; infos: the Batch's per-image infos."""
        device = images.device
        per_image: list[list[Tensor] | None] = []
        for info in infos:
            cached = info.get("cached_levels")
            per_image.append([t.to(device) for t in cached] if cached is not None else None)
        for i, levels in enumerate(per_image):
            if levels is not None:
                continue
            self.calls += 1
            h, w = (int(v) for v in infos[i]["image_size"])
            alone = images[i : i + 1, :, :h, :w]
            with autocast(self.precision, device):
                levels = per_image_levels(self.backbone, alone, [(h, w)])[0]
            per_image[i] = [t.float() for t in levels]
            if self.store is not None:
                self.store.put(infos[i], per_image[i])
        return assemble(per_image, self.backbone.level_strides, tuple(images.shape[-2:]))


InputsFn = Callable[[Tensor, Sequence[dict[str, Any]]], Any]
