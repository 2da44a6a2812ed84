"""K-Net's set criterion: Hungarian assignment per stage; mask, Dice, class and semantic losses.

Assignment (docs/method.md stage two): the initial stage is matched on its own initial masks; update
stage i is matched on the *previous* stage's detached predictions (stage 1 on the initial masks,
without a class cost, so it reuses the initial assignment; stage i > 1 on stage i-1's masks and
class logits). Unmatched kernels are background.

Losses (weights in ``LOSS_WEIGHTS``, the one place they live):
  initial stage: mask BCE x1 and Dice x4 on matched kernels, semantic sigmoid-focal x1 on the
  per-pixel class map; each update stage: sigmoid-focal class loss x2 (gamma 2, alpha 0.25, summed
  and divided by the number of positives), mask BCE x1 and Dice x4 on matched kernels.
Targets: each mask area-downsampled from the padded input frame to the mask grid, used as a soft
target. Normalisers are per process (not all-reduced across DDP ranks).

``form`` "knet" (``model.criterion_form``) gives the matcher K-Net's linear mask cost and V-Net Dice
cost, and the Dice loss the V-Net form (trainer/criterion/matcher.py); the mask loss is BCE in both.
``drop_loss_iou`` > 0 applies CutLER's DropLoss to the update stages' class losses
(trainer/criterion/drop_loss.py).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.ops import sigmoid_focal_loss

from trainer.criterion.drop_loss import dropped_kernels, dropped_share
from trainer.criterion.matcher import (
    FOCAL_ALPHA,
    FOCAL_GAMMA,
    KNET_DICE_EPS,
    Assignment,
    HungarianMatcher,
)
from trainer.criterion.point_sampling import PointSampling, importance_pairs

# Every loss weight of stage two and three (kernel supervision's too, read by
# trainer.criterion.prompts).
LOSS_WEIGHTS: dict[str, float] = {
    "init_mask": 1.0,
    "init_dice": 4.0,
    "init_semantic": 1.0,
    "cls": 2.0,
    "mask": 1.0,
    "dice": 4.0,
    "kernel_sup": 1.0,
}


def mask_targets(masks: Tensor, size: tuple[int, int]) -> Tensor:
    """masks: (L, H, W) in {0, 1} in the padded input frame -> (L, h, w) float32 soft targets,
    each cell the fraction of its input pixels inside the mask (area downsampling)."""
    masks = masks.float()
    if masks.shape[0] == 0:
        return masks.new_zeros((0, *size))
    if tuple(masks.shape[-2:]) == tuple(size):
        return masks
    return F.interpolate(masks[None], size=size, mode="area")[0]


def semantic_targets(masks: list[Tensor], labels: list[Tensor], num_classes: int) -> Tensor:
    """masks: B tensors (L_b, h, w) soft; labels: B tensors (L_b,) -> (B, C, h, w): per pixel and
    class, the largest soft value among that class's masks (a pixel may carry several classes)."""
    h, w = masks[0].shape[-2:]
    out = masks[0].new_zeros((len(masks), num_classes, h, w))
    for b, (m, lab) in enumerate(zip(masks, labels)):
        for c in lab.unique().tolist():
            out[b, c] = m[lab == c].amax(dim=0)
    return out


def dice_loss(pred_logits: Tensor, targets: Tensor, form: str = "mask2former") -> Tensor:
    """pred_logits, targets: (M, P) -> (M,): form "mask2former" 1 - (2 sum(p t) + 1) / (sum p +
    sum t + 1); "knet" (V-Net) 1 - 2 sum(p t) / (sum p^2 + sum t^2 + eps)."""
    p = pred_logits.sigmoid()
    if form == "knet":
        denominator = p.square().sum(-1) + targets.square().sum(-1) + KNET_DICE_EPS
        return 1 - 2 * (p * targets).sum(-1) / denominator
    return 1 - (2 * (p * targets).sum(-1) + 1) / (p.sum(-1) + targets.sum(-1) + 1)


def _gather_pairs(
    pred_masks: Tensor, targets: list[Tensor], assignments: list[Assignment]
) -> tuple[Tensor, Tensor]:
    """pred_masks (B, N, h, w), targets B x (L_b, h, w) -> matched (M, h*w) preds and targets."""
    preds = torch.cat([pred_masks[b, rows] for b, (rows, _) in enumerate(assignments)])
    tgts = torch.cat([targets[b][cols] for b, (_, cols) in enumerate(assignments)])
    return preds.flatten(1).float(), tgts.flatten(1).float()


def matched_mask_losses(
    pred_masks: Tensor,
    targets: list[Tensor],
    assignments: list[Assignment],
    points: PointSampling | None = None,
    form: str = "mask2former",
) -> tuple[Tensor, Tensor]:
    """Mean per-pixel BCE and mean Dice (``dice_loss``'s ``form``) over the M matched pairs;
    (0, 0) with the graph kept when M == 0 (so every parameter still receives a (zero)
    gradient). With ``points`` both are read at each prediction's importance-sampled points
    instead of at every cell (then the targets may have another resolution than the
    predictions, e.g. the input's)."""
    preds, tgts = _gather_pairs(pred_masks, targets, assignments)
    if preds.shape[0] == 0:
        zero = pred_masks.float().sum() * 0.0
        return zero, zero
    if points is not None:
        preds, tgts = importance_pairs(
            preds.view(-1, *pred_masks.shape[-2:]), tgts.view(-1, *targets[0].shape[-2:]), points
        )
    bce = F.binary_cross_entropy_with_logits(preds, tgts)
    return bce, dice_loss(preds, tgts, form).mean()


def class_loss(
    class_logits: Tensor,
    labels: list[Tensor],
    assignments: list[Assignment],
    dropped: Tensor | None = None,
) -> Tensor:
    """class_logits (B, N, C); matched kernel n of image b gets the one-hot of its target's label,
    every other kernel all zeros (background). Focal loss summed, divided by max(#positives, 1).
    dropped: (B, N) bool, kernels whose (background) terms are left out (DropLoss), or None."""
    logits = class_logits.float()
    onehot = torch.zeros_like(logits)
    num_pos = 0
    for b, (rows, cols) in enumerate(assignments):
        onehot[b, rows, labels[b][cols]] = 1.0
        num_pos += len(rows)
    if dropped is None:
        loss = sigmoid_focal_loss(logits, onehot, FOCAL_ALPHA, FOCAL_GAMMA, reduction="sum")
    else:
        terms = sigmoid_focal_loss(logits, onehot, FOCAL_ALPHA, FOCAL_GAMMA, reduction="none")
        loss = terms.masked_fill(dropped[..., None], 0.0).sum()
    return loss / max(num_pos, 1)


def semantic_loss(semantic_logits: Tensor, targets: Tensor) -> Tensor:
    """semantic_logits, targets: (B, C, h, w). Focal loss summed, divided by the number of
    foreground pixels (any class target > 0.5), at least 1."""
    loss = sigmoid_focal_loss(
        semantic_logits.float(), targets, FOCAL_ALPHA, FOCAL_GAMMA, reduction="sum"
    )
    return loss / (targets.amax(dim=1) > 0.5).sum().clamp(min=1)


class SetCriterion(nn.Module):
    """KNet outputs + targets -> (weighted losses, assignments).

    Args:
        num_classes: C.
        matcher: the Hungarian matcher (default: ``HungarianMatcher()``).
        weights: loss weights (default ``LOSS_WEIGHTS``).
        points: Mask2Former's point sampling (trainer/criterion/point_sampling.py) for the
        matcher's mask
            costs (uniform points) and the BCE and Dice losses (importance-sampled points), or
            None for K-Net's dense costs and losses on every cell of the mask grid.
        form: the matcher's mask and Dice costs and the Dice loss, "mask2former" or "knet"
            (used when ``matcher`` is None; the Dice loss always).
        drop_loss_iou: DropLoss's IoU threshold for the class losses (0: off).
    """

    def __init__(
        self,
        num_classes: int,
        matcher: HungarianMatcher | None = None,
        weights: dict[str, float] | None = None,
        points: PointSampling | None = None,
        form: str = "mask2former",
        drop_loss_iou: float = 0.0,
    ) -> None:
        super().__init__()
        self.num_classes = num_classes
        if matcher is None:
            matcher = HungarianMatcher(num_points=points.num_points if points else 0, form=form)
        self.matcher = matcher
        self.weights = dict(LOSS_WEIGHTS if weights is None else weights)
        self.points = points
        self.form = form
        self.drop_loss_iou = drop_loss_iou

    def forward(
        self, outputs: dict[str, Any], targets: list[dict[str, Tensor]]
    ) -> tuple[dict[str, Tensor], list[list[Assignment]]]:
        """outputs: ``KNet.forward``'s dict; targets: per image {"masks": (L, H, W) {0,1} in the
        padded frame, "labels": (L,) int64, ...}.

        Returns:
          losses: {"loss_init_mask", "loss_init_dice", "loss_init_semantic",
                   "loss_s{i}_cls", "loss_s{i}_mask", "loss_s{i}_dice" for i = 1..S}, weighted
                   scalars, and with DropLoss "stat_dropped" (detached, ``dropped_share``);
          assignments: S + 1 lists (index 0 the initial stage, i the update stage i) of B pairs
                   (kernel_idx, target_idx), the pairs each stage's losses used.
        """
        init = outputs["init"]
        size = tuple(init["masks"].shape[-2:])
        masks = [mask_targets(t["masks"], size) for t in targets]
        labels = [t["labels"].long() for t in targets]
        w = self.weights
        losses: dict[str, Tensor] = {}

        init_assign = self.matcher(init["masks"], masks)
        bce, dice = matched_mask_losses(init["masks"], masks, init_assign, self.points, self.form)
        losses["loss_init_mask"] = w["init_mask"] * bce
        losses["loss_init_dice"] = w["init_dice"] * dice
        sem_targets = semantic_targets(masks, labels, self.num_classes)
        losses["loss_init_semantic"] = w["init_semantic"] * semantic_loss(
            init["semantic"], sem_targets
        )

        assignments = [init_assign]
        drops = []
        prev_masks, prev_logits = init["masks"], None
        for i, stage in enumerate(outputs["stages"], start=1):
            if prev_logits is None:  # matched on the initial masks: same as the initial stage
                assign = init_assign
            else:
                assign = self.matcher(prev_masks, masks, prev_logits, labels)
            # DropLoss reads the stage's own masks: the prediction its class logits score.
            drops.append(dropped_kernels(stage["masks"], masks, assign, self.drop_loss_iou))
            cls = class_loss(stage["logits"], labels, assign, drops[-1])
            losses[f"loss_s{i}_cls"] = w["cls"] * cls
            bce, dice = matched_mask_losses(stage["masks"], masks, assign, self.points, self.form)
            losses[f"loss_s{i}_mask"] = w["mask"] * bce
            losses[f"loss_s{i}_dice"] = w["dice"] * dice
            assignments.append(assign)
            prev_masks, prev_logits = stage["masks"], stage["logits"]
        losses.update(dropped_share(drops))
        return losses, assignments
