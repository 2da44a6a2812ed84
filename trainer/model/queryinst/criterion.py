"""QueryInst's set criterion: each stage matched on its own class and box outputs, deep supervision.

Matching (mmdetection's HungarianAssigner as QueryInst configures it): cost of pairing query n
with target l = 2 x focal class cost + 5 x L1 between the boxes normalised by the padded input
size (x0, y0, x1, y1) - 2 x GIoU. No mask cost. Every stage is matched on its own detached
outputs. Losses per stage, each divided by the number of matched pairs (at least 1): sigmoid focal
class loss x2 over every query (trainer/criterion/losses.py ``class_loss``: unmatched queries are
background), L1 x5 on the normalised boxes, GIoU x2, and Dice x8 (the V-Net form, as the
published ``DiceLoss``) between the matched queries' 28 x 28 masks and their targets' masks
RoI-aligned to the same (predicted, detached) boxes and binarised at 0.5.

Box targets are the targets' "boxes": the tight boxes of the (pseudo) masks, which the loader
derives from the masks after augmentation. With DropLoss (``drop_loss_iou`` > 0) an unmatched
query whose box overlaps no target box (box IoU below the threshold) loses its background class
term; the normaliser is kept (as for the other kinds, but on boxes: QueryInst's training computes
no mask for an unmatched query).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.ops import box_iou, generalized_box_iou, generalized_box_iou_loss, roi_align

from trainer.criterion.drop_loss import dropped_share
from trainer.criterion.losses import class_loss, dice_loss
from trainer.criterion.matcher import Assignment, focal_class_cost, solve

# The published weights (mmdetection's queryinst config): matching costs ("cls", "l1", "giou")
# and losses (the same three and "dice").
QUERYINST_WEIGHTS: dict[str, float] = {"cls": 2.0, "l1": 5.0, "giou": 2.0, "dice": 8.0}
MASK_SIZE = 28


@torch.no_grad()
def box_costs(
    logits: Tensor,
    boxes: Tensor,
    labels: Tensor,
    target_boxes: Tensor,
    whwh: Tensor,
    weights: dict[str, float] = QUERYINST_WEIGHTS,
) -> Tensor:
    """logits (B, N, C), boxes (B, N, 4) input pixels; labels (T,), target_boxes (T, 4) of the
    whole batch; whwh: (4,) the padded input's width, height, width, height -> (B, N, T) costs."""
    batch, num = boxes.shape[:2]
    pred = boxes.detach().float().flatten(0, 1)  # (B N, 4)
    tgt = target_boxes.float()
    cost = weights["cls"] * focal_class_cost(logits.detach().float(), labels)
    l1 = torch.cdist(pred / whwh, tgt / whwh, p=1).view(batch, num, -1)
    giou = generalized_box_iou(pred, tgt).view(batch, num, -1)
    return cost + weights["l1"] * l1 - weights["giou"] * giou


def match_boxes(
    logits: Tensor,
    boxes: Tensor,
    labels: list[Tensor],
    target_boxes: list[Tensor],
    whwh: Tensor,
    weights: dict[str, float] = QUERYINST_WEIGHTS,
) -> list[Assignment]:
    """As ``box_costs`` with per-image labels and target boxes (B tensors (L_b,), (L_b, 4)) ->
    B assignments (query_idx, target_idx), each image solved on its own block."""
    sizes = [len(t) for t in target_boxes]
    if sum(sizes) == 0:
        empty = torch.empty(0, dtype=torch.int64, device=logits.device)
        return [(empty, empty) for _ in range(logits.shape[0])]
    costs = box_costs(logits, boxes, torch.cat(labels), torch.cat(target_boxes), whwh, weights)
    return solve(costs, sizes, logits.device)


def mask_roi_targets(masks: Tensor, boxes: Tensor) -> Tensor:
    """masks (L, H, W) {0, 1} in the padded frame, boxes (L, 4) -> (L, 28, 28) {0, 1}: each mask
    RoI-aligned to its box and binarised at 0.5 (mmdetection's mask targets)."""
    if len(boxes) == 0:
        return masks.new_zeros((0, MASK_SIZE, MASK_SIZE))
    rois = torch.cat([torch.arange(len(boxes), device=boxes.device)[:, None].float(), boxes], 1)
    crops = roi_align(masks[:, None].float(), rois.float(), MASK_SIZE, 1.0, 0, aligned=True)
    return (crops[:, 0] >= 0.5).float()


def box_dropped(
    boxes: Tensor, target_boxes: list[Tensor], assign: list[Assignment], iou: float
) -> Tensor | None:
    """(B, N) bool: unmatched queries whose box has IoU below ``iou`` with every target box of
    its image (DropLoss on boxes); None when off."""
    if iou <= 0:
        return None
    best = boxes.new_zeros(boxes.shape[:2], dtype=torch.float32)
    for b, tgt in enumerate(target_boxes):
        if len(tgt):
            best[b] = box_iou(boxes[b].detach().float(), tgt.float()).amax(-1)
    dropped = best < iou
    for b, (rows, _) in enumerate(assign):
        dropped[b, rows] = False
    return dropped


class QueryInstCriterion(nn.Module):
    """QueryInst outputs + targets -> (weighted losses, assignments).

    Args:
        num_classes: C.
        weights: "cls", "l1", "giou", "dice" (default ``QUERYINST_WEIGHTS``), costs and losses.
        drop_loss_iou: DropLoss's box-IoU threshold for the class losses (0: off).
    """

    def __init__(
        self,
        num_classes: int,
        weights: dict[str, float] | None = None,
        drop_loss_iou: float = 0.0,
    ) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.weights = dict(QUERYINST_WEIGHTS if weights is None else weights)
        self.drop_loss_iou = drop_loss_iou

    def _stage_losses(
        self, stage: dict[str, Any], targets: list[dict[str, Tensor]], whwh: Tensor
    ) -> tuple[dict[str, Tensor], list[Assignment], Tensor | None]:
        w = self.weights
        labels = [t["labels"].long() for t in targets]
        target_boxes = [t["boxes"].float() for t in targets]
        assign = match_boxes(stage["logits"], stage["boxes"], labels, target_boxes, whwh, w)
        dropped = box_dropped(stage["boxes"], target_boxes, assign, self.drop_loss_iou)
        num_pos = max(sum(len(rows) for rows, _ in assign), 1)
        pred = torch.cat([stage["boxes"][b, rows] for b, (rows, _) in enumerate(assign)]).float()
        tgt = torch.cat([target_boxes[b][cols] for b, (_, cols) in enumerate(assign)])
        losses = {"cls": class_loss(stage["logits"], labels, assign, dropped)}
        if len(pred) == 0:
            zero = stage["boxes"].float().sum() * 0.0
            losses.update(l1=zero, giou=zero, dice=zero)
        else:
            losses["l1"] = F.l1_loss(pred / whwh, tgt / whwh, reduction="sum") / num_pos
            losses["giou"] = generalized_box_iou_loss(pred, tgt, reduction="sum") / num_pos
            rois = pred.detach()
            masks = torch.cat([targets[b]["masks"][cols] for b, (_, cols) in enumerate(assign)])
            mask_targets = mask_roi_targets(masks, rois)
            logits = stage["roi_masks"]([rows for rows, _ in assign]).float()
            losses["dice"] = dice_loss(logits.flatten(1), mask_targets.flatten(1), "knet").mean()
        return {k: w[k] * v for k, v in losses.items()}, assign, dropped

    def forward(
        self, outputs: dict[str, Any], targets: list[dict[str, Tensor]]
    ) -> tuple[dict[str, Tensor], list[list[Assignment]]]:
        """outputs: ``QueryInst.forward``'s dict; targets: per image {"masks": (L, H, W) in the
        padded frame, "boxes": (L, 4), "labels": (L,) int64, ...}.

        Returns losses {"loss_s{i}_{cls,l1,giou,dice}" for each stage i = 1..S} (weighted
        scalars; with DropLoss also "stat_dropped") and 1 + S assignment lists: index 0 (the
        proposals, which no loss scores) empty, index i stage i's.
        """
        height, width = targets[0]["masks"].shape[-2:]
        whwh = torch.tensor([width, height, width, height], dtype=torch.float32)
        whwh = whwh.to(outputs["stages"][0]["boxes"].device)
        empty = torch.empty(0, dtype=torch.int64, device=whwh.device)
        assignments: list[list[Assignment]] = [[(empty, empty) for _ in targets]]
        losses: dict[str, Tensor] = {}
        drops = []
        for i, stage in enumerate(outputs["stages"], start=1):
            stage_losses, assign, dropped = self._stage_losses(stage, targets, whwh)
            losses.update({f"loss_s{i}_{k}": v for k, v in stage_losses.items()})
            assignments.append(assign)
            drops.append(dropped)
        losses.update(dropped_share(drops))
        return losses, assignments
