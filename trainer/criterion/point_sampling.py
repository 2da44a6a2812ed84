"""Point-sampled mask costs and losses (Mask2Former, Cheng et al., CVPR 2022; PointRend's sampling).

Instead of scoring a predicted mask against its target at every cell, Mask2Former scores both at
K random points (12,544 = 112 x 112), reading each map by bilinear interpolation at the points:
  - matching: the same K uniformly random points for every prediction and target of an image;
  - BCE and Dice losses: K importance-sampled points per matched prediction: draw
    ``oversample`` x K uniform candidates, keep the ``importance`` x K whose predicted logit is
    closest to 0 (most uncertain), and fill the rest with fresh uniform points.
At paper scale this cuts the mask-loss memory several-fold (Mask2Former's ablation: no AP lost).

Points are (x, y) in [0, 1] of the map's extent, so a prediction on the mask grid and a target at
input resolution are read at the same image positions. **[choice]** Maps are read with border
padding (a point within half a cell of the edge takes the edge value); detectron2's
``point_sample`` pads with zeros, which pulls every border reading toward 0 and makes a uniformly
sampled loss differ from the dense one on a map that is constant up to its edge.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor


@dataclass(frozen=True)
class PointSampling:
    """Mask2Former's point settings: K points, uniform oversampling and the uncertain share."""

    num_points: int = 12544
    oversample: float = 3.0
    importance: float = 0.75

    def __post_init__(self) -> None:
        if self.num_points < 1 or self.oversample < 1.0 or not 0.0 <= self.importance <= 1.0:
            raise ValueError(
                f"bad point sampling: num_points={self.num_points}, "
                f"oversample={self.oversample}, importance={self.importance}"
            )


def point_sample(maps: Tensor, points: Tensor) -> Tensor:
    """maps: (M, h, w); points: (M, P, 2) or (P, 2) shared, (x, y) in [0, 1] -> (M, P) readings,
    bilinear between cell centres, border values beyond them."""
    if points.dim() == 2:
        points = points[None].expand(maps.shape[0], -1, -1)
    grid = (2.0 * points - 1.0)[:, :, None, :].to(maps.dtype)  # (M, P, 1, 2) in [-1, 1]
    out = F.grid_sample(
        maps[:, None], grid, mode="bilinear", padding_mode="border", align_corners=False
    )
    return out[:, 0, :, 0]


def uniform_points(count: int, num_points: int, device: torch.device) -> Tensor:
    """(count, num_points, 2) uniform points in [0, 1]^2 (global torch RNG, so resumable)."""
    return torch.rand(count, num_points, 2, device=device)


@torch.no_grad()
def uncertain_points(logits: Tensor, sampling: PointSampling) -> Tensor:
    """logits: (M, h, w) -> (M, K, 2): the importance x K most uncertain (|logit| smallest) of
    oversample x K uniform candidates, then (1 - importance) x K uniform points."""
    m, k = logits.shape[0], sampling.num_points
    candidates = uniform_points(m, int(k * sampling.oversample), logits.device)
    uncertainty = -point_sample(logits.detach().float(), candidates).abs()
    num_uncertain = int(sampling.importance * k)
    chosen = uncertainty.topk(num_uncertain, dim=1).indices  # (M, k_u)
    picked = torch.gather(candidates, 1, chosen[..., None].expand(-1, -1, 2))
    return torch.cat([picked, uniform_points(m, k - num_uncertain, logits.device)], dim=1)


def importance_pairs(
    pred_masks: Tensor, target_masks: Tensor, sampling: PointSampling
) -> tuple[Tensor, Tensor]:
    """pred_masks: (M, h, w) logits of matched predictions; target_masks: (M, H, W) their targets
    in [0, 1] at any resolution -> (M, K) prediction logits and (M, K) targets read at each
    prediction's importance-sampled points (what the BCE and Dice losses score)."""
    if pred_masks.shape[0] == 0:
        return pred_masks.float().flatten(1)[:, :0], target_masks.float().flatten(1)[:, :0]
    points = uncertain_points(pred_masks, sampling)
    with torch.no_grad():
        targets = point_sample(target_masks.float(), points)
    return point_sample(pred_masks.float(), points), targets


@torch.no_grad()
def matching_points(
    mask_logits: Tensor, target_masks: list[Tensor], num_points: int
) -> tuple[Tensor, list[Tensor]]:
    """Read predictions and targets at the same K uniform points per image (for matching).

    mask_logits: (B, N, h, w); target_masks: B tensors (L_b, H, W) in [0, 1].
    Returns (B, N, K, 1) predictions and B tensors (L_b, K, 1): shaped as (h, w) = (K, 1) maps,
    so the dense matcher's costs apply to them unchanged.
    """
    batch, n = mask_logits.shape[:2]
    points = uniform_points(batch, num_points, mask_logits.device)
    preds = torch.stack(
        [point_sample(mask_logits[b].float(), points[b]) for b in range(batch)]
    )  # (B, N, K)
    targets = [
        point_sample(t.float(), points[b]) if len(t) else t.new_zeros((0, num_points))
        for b, t in enumerate(target_masks)
    ]
    return preds.reshape(batch, n, num_points, 1), [t[..., None] for t in targets]
