"""Mask2Former's set criterion: every prediction matched on its own outputs, deep supervision.

Each of the 1 + L predictions (the initial one and one per decoder layer) is Hungarian-matched to
the targets on its own (detached) class and mask outputs: cost 2 x (-p(class)) + 5 x mask BCE +
5 x Dice, the masks read at 12,544 uniform points per image. Its losses: softmax cross-entropy over
C + 1 classes (unmatched queries are "no object", whose weight is 0.1), and mask BCE x5 and Dice x5
on matched queries, read at importance-sampled points (trainer/criterion/point_sampling.py).
Targets are
the masks at input resolution (sampled at the points) or, with dense losses, area-downsampled to
the mask grid as for K-Net. Normalisers are per process (not all-reduced across DDP ranks).

``form`` "knet" gives the matcher K-Net's mask and Dice costs and the Dice loss K-Net's form
(trainer/criterion/losses.py). With DropLoss (``drop_loss_iou`` > 0,
trainer/criterion/drop_loss.py) an unmatched
query whose mask overlaps no target loses its no-object cross-entropy term; the other terms keep
their class weights and the weighted mean keeps its normaliser (the sum of every query's class
weight, dropped ones included), so dropping changes no other query's share of the loss.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from trainer.criterion.drop_loss import dropped_kernels, dropped_share
from trainer.criterion.losses import mask_targets, matched_mask_losses
from trainer.criterion.matcher import Assignment, HungarianMatcher
from trainer.criterion.point_sampling import PointSampling

# The one place Mask2Former's weights live (matching costs and losses share them).
MASK2FORMER_WEIGHTS: dict[str, float] = {"cls": 2.0, "mask": 5.0, "dice": 5.0}
NO_OBJECT_WEIGHT = 0.1


def no_object_class_loss(
    class_logits: Tensor,
    labels: list[Tensor],
    assignments: list[Assignment],
    class_weight: Tensor,
    dropped: Tensor | None = None,
) -> Tensor:
    """class_logits (B, N, C + 1); matched query n of image b is labelled with its target's
    class, every other query with "no object" (index C). Weighted mean cross-entropy; dropped:
    (B, N) bool, queries whose term counts as zero (DropLoss; the normaliser is kept), or None."""
    no_object = class_logits.shape[-1] - 1
    classes = torch.full(class_logits.shape[:2], no_object, device=class_logits.device)
    for b, (rows, cols) in enumerate(assignments):
        classes[b, rows] = labels[b][cols]
    logits = class_logits.float().transpose(1, 2)
    if dropped is None or not bool(dropped.any()):  # nothing dropped: exactly the plain loss
        return F.cross_entropy(logits, classes, weight=class_weight)
    terms = F.cross_entropy(logits, classes, weight=class_weight, reduction="none")  # (B, N)
    return terms.masked_fill(dropped, 0.0).sum() / class_weight[classes].sum()


class Mask2FormerCriterion(nn.Module):
    """Mask2Former outputs + targets -> (weighted losses, assignments).

    Args:
        num_classes: C.
        points: point sampling for matching and mask losses (Mask2Former's), or None for dense
            costs and losses on every cell of the mask grid.
        weights: "cls", "mask", "dice" (default ``MASK2FORMER_WEIGHTS``).
        no_object_weight: the cross-entropy weight of the no-object class (0.1).
        form: the matcher's mask and Dice costs and the Dice loss, "mask2former" or "knet".
        drop_loss_iou: DropLoss's IoU threshold for the class losses (0: off).
    """

    def __init__(
        self,
        num_classes: int,
        points: PointSampling | None = None,
        weights: dict[str, float] | None = None,
        no_object_weight: float = NO_OBJECT_WEIGHT,
        form: str = "mask2former",
        drop_loss_iou: float = 0.0,
    ) -> None:
        super().__init__()
        self.weights = dict(MASK2FORMER_WEIGHTS if weights is None else weights)
        self.points = points
        self.form = form
        self.drop_loss_iou = drop_loss_iou
        self.matcher = HungarianMatcher(
            self.weights,
            class_cost="softmax",
            num_points=points.num_points if points else 0,
            form=form,
        )
        class_weight = torch.ones(num_classes + 1)
        class_weight[-1] = no_object_weight
        # Not persistent: a constant of the loss, not a trained or resumed state.
        self.register_buffer("class_weight", class_weight, persistent=False)

    def forward(
        self, outputs: dict[str, Any], targets: list[dict[str, Tensor]]
    ) -> tuple[dict[str, Tensor], list[list[Assignment]]]:
        """outputs: ``Mask2Former.forward``'s dict; targets: per image {"masks": (L, H, W) in
        the padded frame, "labels": (L,) int64, ...}.

        Returns losses {"loss_init_{cls,mask,dice}", "loss_s{i}_{cls,mask,dice}" for each decoder
        layer i = 1..L} (weighted scalars; with DropLoss also "stat_dropped", detached) and
        1 + L assignment lists (index 0 the initial prediction, i layer i), each B pairs
        (query_idx, target_idx).
        """
        size = tuple(outputs["init"]["masks"].shape[-2:])
        grid = None  # targets on the mask grid, for DropLoss's overlaps and dense losses
        if self.points is None or self.drop_loss_iou > 0:
            grid = [mask_targets(t["masks"], size) for t in targets]
        if self.points is not None:
            masks = [t["masks"].float() for t in targets]  # read at points at full resolution
        else:
            masks = grid
        labels = [t["labels"].long() for t in targets]
        w = self.weights
        losses: dict[str, Tensor] = {}
        assignments, drops = [], []
        named = [("init", outputs["init"])]
        named += [(f"s{i}", stage) for i, stage in enumerate(outputs["stages"], start=1)]
        for name, pred in named:
            assign = self.matcher(pred["masks"], masks, pred["logits"], labels)
            drops.append(dropped_kernels(pred["masks"], grid, assign, self.drop_loss_iou))
            cls = no_object_class_loss(pred["logits"], labels, assign, self.class_weight, drops[-1])
            bce, dice = matched_mask_losses(pred["masks"], masks, assign, self.points, self.form)
            losses[f"loss_{name}_cls"] = w["cls"] * cls
            losses[f"loss_{name}_mask"] = w["mask"] * bce
            losses[f"loss_{name}_dice"] = w["dice"] * dice
            assignments.append(assign)
        losses.update(dropped_share(drops))
        return losses, assignments
