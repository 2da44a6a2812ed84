"""CutLER's DropLoss (Wang et al., "Cut and Learn", CVPR 2023) for the set criteria.

Pseudo masks miss objects. The class loss pushes every kernel the Hungarian matcher leaves
unmatched to background, also one that segments an object the pseudo masks missed. With DropLoss
(``pretrain.drop_loss_iou`` > 0; CutLER uses 0.01) an unmatched kernel whose predicted mask
overlaps no pseudo mask of its image (IoU with each below the threshold) gets no background class
loss, so the model may keep what it finds beyond its teacher. Matched kernels, and unmatched ones
that overlap a pseudo mask, are scored as before, and the class losses keep their normalisers
(CutLER likewise averages over all regions, a dropped one counting as zero).

The overlap is read on the mask grid: the prediction binarised at sigmoid > 0.5 (detached)
against the targets area-downsampled to the grid. A soft target cell holds the fraction of the cell
inside the mask, so sum(b t) and sum(t) are the intersection and the mask's area in cells: the IoU
of the cell-wise prediction with the full-resolution mask. An empty predicted mask overlaps
nothing, so an unmatched kernel that predicts no mask is dropped too, and so is every unmatched
kernel of an image without pseudo masks.
"""

from __future__ import annotations

import torch
from torch import Tensor

from trainer.criterion.matcher import Assignment


def max_iou(pred_masks: Tensor, targets: list[Tensor]) -> Tensor:
    """pred_masks: (B, N, h, w) logits; targets: B tensors (L_b, h, w) soft in [0, 1] on the same
    grid -> (B, N), each prediction's largest IoU with a target of its image (0 without any)."""
    binary = (pred_masks.detach().float().sigmoid() > 0.5).float().flatten(2)  # (B, N, P)
    best = binary.new_zeros(binary.shape[:2])
    for b, target in enumerate(targets):
        if len(target) == 0:
            continue
        t = target.detach().float().flatten(1)  # (L, P)
        inter = binary[b] @ t.T  # (N, L)
        union = binary[b].sum(-1, keepdim=True) + t.sum(-1) - inter
        best[b] = (inter / union.clamp(min=1e-6)).amax(-1)
    return best


def dropped_kernels(
    pred_masks: Tensor, targets: list[Tensor], assignments: list[Assignment], iou: float
) -> Tensor | None:
    """(B, N) bool: the unmatched kernels whose predicted mask has IoU below ``iou`` with every
    target of its image, whose background class loss is dropped; None when ``iou`` <= 0 (off)."""
    if iou <= 0:
        return None
    dropped = max_iou(pred_masks, targets) < iou
    for b, (rows, _) in enumerate(assignments):
        dropped[b, rows] = False  # matched kernels keep their (foreground) class loss
    return dropped


def dropped_share(drops: list[Tensor | None]) -> dict[str, Tensor]:
    """{"stat_dropped": the mean share of kernels dropped per stage with a class loss}, or {}
    when DropLoss is off."""
    shares = [d.float().mean() for d in drops if d is not None]
    return {"stat_dropped": torch.stack(shares).mean()} if shares else {}
