"""The seed embedding S_l of a mask that no seed produced: a self-training round's predictions.

Stage one's masks each grow from one seed, a cell of the frozen backbone's feature map, and the
shards store that seed (S_l, L2-normalised) and its position. A pre-trained model's predicted
mask has no such seed, so a self-training round (``trainer pseudo-label``) gives it:

- ``seed``: the L2-normalised mean of the stage-one seeds of the cells under the mask, each cell's
  seed being its feature L2-normalised exactly as stage one's scale-1.0 seeds are (the same
  ``saliency_features`` map, input size and precision: pipeline/executors/worker.py). Averaging
  unit vectors weighs every cell alike, whatever its feature norm, so the mean is the mask's
  direction in the space that kernel supervision compares kernels with.
- ``seed_pos``: ``(0, row, col)``, the cell under the mask whose seed is most similar (cosine) to
  that mean. Scale index 0 is the feature map itself (scale 1.0, stage one's first scale).

A cell is under the mask when the mask covers at least half of its footprint in the resized
input (``stride`` x ``stride`` pixels; the padding beyond the image counts as uncovered). A mask
too small or thin to cover half of any cell takes the cells it covers most.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

# Share of a cell's footprint the mask must cover for the cell to count as under it.
MIN_COVER = 0.5


def cell_coverage(
    masks: Tensor, resized: tuple[int, int], valid: tuple[int, int], stride: int
) -> Tensor:
    """(K, hv, wv) share of each valid cell's footprint that (K, H, W) original-size masks cover.

    The masks are area-resampled to the resized input the backbone saw (``resized`` (h, w)),
    zero-padded to whole cells and averaged per ``stride`` x ``stride`` cell."""
    hv, wv = valid
    x = F.interpolate(masks[:, None].float(), size=tuple(resized), mode="area")
    x = F.pad(x, (0, wv * stride - resized[1], 0, hv * stride - resized[0]))
    return F.avg_pool2d(x, stride)[:, 0]


@torch.no_grad()
def mask_seeds(
    features: Tensor, valid: tuple[int, int], resized: tuple[int, int], stride: int, masks: Tensor
) -> tuple[Tensor, Tensor]:
    """Seeds (K, C) float32, unit norm, and seed_pos (K, 3) int64 of (K, H, W) non-empty masks.

    ``features``: one image's (C, h, w) raw ``saliency_features`` (fp32) of a padded batch, its
    top-left ``valid`` (rows, cols) cells covering the image resized to ``resized``."""
    hv, wv = valid
    c = features.shape[0]
    if masks.shape[0] == 0:
        return features.new_zeros((0, c)), torch.zeros((0, 3), dtype=torch.long)
    cells = F.normalize(features[:, :hv, :wv].float().reshape(c, -1), dim=0)  # (C, L)
    cover = cell_coverage(masks.to(features.device), resized, valid, stride).flatten(1)  # (K, L)
    under = cover >= MIN_COVER
    most = cover >= cover.amax(1, keepdim=True)  # the best-covered cells (ties kept)
    under = torch.where(under.any(1, keepdim=True), under, most)
    weights = under.float()
    mean = (weights @ cells.T) / weights.sum(1, keepdim=True)  # (K, C)
    seeds = F.normalize(mean, dim=1)
    similarity = (seeds @ cells).masked_fill(~under, float("-inf"))
    best = similarity.argmax(1).cpu()
    pos = torch.stack([torch.zeros_like(best), best // wv, best % wv], 1)
    return seeds, pos
