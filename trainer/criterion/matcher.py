"""Hungarian matching of kernels to target masks (K-Net's ``MaskHungarianAssigner``).

Cost of pairing kernel n with target l:
    2 x focal class cost (only when class logits are given: the update stages)
  + 4 x Dice cost  + 1 x mask BCE cost,
on the mask grid. Costs are computed for the whole batch at once (every kernel of every image
against the concatenation of all targets, DETR-style), then each image's block is solved with
scipy's ``linear_sum_assignment``. Unmatched kernels are background.

Mask2Former's matcher is the same solver with its own costs: 2 x softmax class cost (-p(class)),
5 x mask BCE and 5 x Dice, both read at 12,544 uniform points per image instead of every cell.

Two forms of the mask and Dice costs (``model.criterion_form``, docs/method.md): "mask2former"
(the default) scores masks by mean BCE and the +1-smoothed Dice; "knet" by K-Net's published
costs, the linear mask cost (minus the mean per-pixel agreement of p and t) and the V-Net Dice
with squared terms in the denominator.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from scipy.optimize import linear_sum_assignment
from torch import Tensor

from trainer.criterion.point_sampling import matching_points

# The one place the cost weights live.
COST_WEIGHTS: dict[str, float] = {"cls": 2.0, "dice": 4.0, "mask": 1.0}
FOCAL_ALPHA = 0.25
FOCAL_GAMMA = 2.0
# K-Net's Dice adds 1e-3 to each of sum p^2 and sum t^2 (cost and loss alike).
KNET_DICE_EPS = 2e-3

Assignment = tuple[Tensor, Tensor]  # (kernel indices (M,), target indices (M,)) int64


def dice_cost(pred_logits: Tensor, targets: Tensor) -> Tensor:
    """pred_logits: (..., N, P) mask logits, P flattened pixels; targets: (T, P) in [0, 1].
    Returns (..., N, T): 1 - (2 sum(p t) + 1) / (sum p + sum t + 1), p = sigmoid(logits)."""
    p = pred_logits.sigmoid()
    numerator = 2 * p @ targets.T
    denominator = p.sum(-1, keepdim=True) + targets.sum(-1)
    return 1 - (numerator + 1) / (denominator + 1)


def knet_dice_cost(pred_logits: Tensor, targets: Tensor) -> Tensor:
    """As ``dice_cost``, K-Net's V-Net form: 1 - 2 sum(p t) / (sum p^2 + sum t^2 + eps)."""
    p = pred_logits.sigmoid()
    denominator = p.square().sum(-1, keepdim=True) + targets.square().sum(-1) + KNET_DICE_EPS
    return 1 - 2 * (p @ targets.T) / denominator


def linear_mask_cost(pred_logits: Tensor, targets: Tensor) -> Tensor:
    """As ``mask_bce_cost``, K-Net's form: -(p t^T + (1 - p)(1 - t)^T) / P, minus the mean
    per-pixel agreement of p = sigmoid(logits) and the target (linear in p, no log)."""
    p = pred_logits.sigmoid()
    return -(p @ targets.T + (1 - p) @ (1 - targets).T) / pred_logits.shape[-1]


def mask_bce_cost(pred_logits: Tensor, targets: Tensor) -> Tensor:
    """pred_logits: (..., N, P); targets: (T, P) soft in [0, 1] -> (..., N, T), the mean
    per-pixel binary cross-entropy of each prediction against each target."""
    pos = F.softplus(-pred_logits)  # -log sigmoid(x): cost where the target is 1
    neg = F.softplus(pred_logits)  # -log(1 - sigmoid(x)): cost where the target is 0
    return (pos @ targets.T + neg @ (1 - targets).T) / pred_logits.shape[-1]


def focal_class_cost(class_logits: Tensor, labels: Tensor) -> Tensor:
    """class_logits: (..., N, C); labels: (T,) int64 -> (..., N, T) (mmdet's FocalLossCost)."""
    p = class_logits.sigmoid()
    eps = 1e-8
    neg = -(1 - p + eps).log() * (1 - FOCAL_ALPHA) * p.pow(FOCAL_GAMMA)
    pos = -(p + eps).log() * FOCAL_ALPHA * (1 - p).pow(FOCAL_GAMMA)
    return (pos - neg)[..., labels]


def softmax_class_cost(class_logits: Tensor, labels: Tensor) -> Tensor:
    """class_logits: (..., N, C + 1) with a no-object last column; labels: (T,) int64 ->
    (..., N, T): -p(label), Mask2Former's class cost (the constant 1 of 1 - p dropped)."""
    return -class_logits.softmax(-1)[..., labels]


CLASS_COSTS = {"focal": focal_class_cost, "softmax": softmax_class_cost}
# (Dice cost, mask cost) of each criterion form.
MASK_COSTS = {"mask2former": (dice_cost, mask_bce_cost), "knet": (knet_dice_cost, linear_mask_cost)}


class HungarianMatcher:
    """Callable: predictions + targets -> one assignment per image (no gradient)."""

    def __init__(
        self,
        weights: dict[str, float] | None = None,
        *,
        class_cost: str = "focal",
        num_points: int = 0,
        form: str = "mask2former",
    ) -> None:
        """weights: "cls", "dice", "mask" cost weights; class_cost: "focal" (K-Net, sigmoid
        logits) or "softmax" (Mask2Former: -p(class), logits with a last no-object column);
        num_points: > 0 scores masks at that many uniform points per image (Mask2Former)
        instead of every cell (trainer/criterion/point_sampling.py); form: the mask and Dice costs,
        "mask2former" (BCE, +1-smoothed Dice) or "knet" (linear, V-Net Dice)."""
        if class_cost not in CLASS_COSTS:
            raise ValueError(f"unknown class cost '{class_cost}' (expected focal or softmax)")
        if form not in MASK_COSTS:
            raise ValueError(
                f"unknown criterion form '{form}' (expected one of {tuple(MASK_COSTS)})"
            )
        self.weights = dict(COST_WEIGHTS if weights is None else weights)
        self.class_cost = CLASS_COSTS[class_cost]
        self.num_points = num_points
        self.dice_cost, self.mask_cost = MASK_COSTS[form]

    @torch.no_grad()
    def cost(
        self,
        mask_logits: Tensor,
        target_masks: Tensor,
        class_logits: Tensor | None = None,
        labels: Tensor | None = None,
    ) -> Tensor:
        """mask_logits: (B, N, h, w); target_masks: (T, h, w) soft targets; class_logits:
        (B, N, C) or None; labels: (T,) int64 (needed with class_logits).
        Returns the weighted cost (B, N, T), float32."""
        preds = mask_logits.detach().float().flatten(2)  # (B, N, P)
        targets = target_masks.detach().float().flatten(1)  # (T, P)
        total = self.weights["dice"] * self.dice_cost(preds, targets)
        total = total + self.weights["mask"] * self.mask_cost(preds, targets)
        if class_logits is not None:
            if labels is None:
                raise ValueError("class_logits given without labels")
            total = total + self.weights["cls"] * self.class_cost(
                class_logits.detach().float(), labels
            )
        return total

    @torch.no_grad()
    def __call__(
        self,
        mask_logits: Tensor,
        target_masks: list[Tensor],
        class_logits: Tensor | None = None,
        labels: list[Tensor] | None = None,
    ) -> list[Assignment]:
        """mask_logits: (B, N, h, w) logits; target_masks: B tensors (L_b, h, w) in [0, 1];
        class_logits: (B, N, C) or None (initial stage: no class cost); labels: B tensors (L_b,).

        Returns B pairs (kernel_idx, target_idx), each (min(N, L_b),) int64 on mask_logits'
        device, sorted by kernel index.
        """
        if len(target_masks) != len(mask_logits):
            raise ValueError(f"{len(target_masks)} target sets for a batch of {len(mask_logits)}")
        if self.num_points > 0:  # every map read at the same points: (h, w) becomes (K, 1)
            mask_logits, target_masks = matching_points(mask_logits, target_masks, self.num_points)
        batch, _, h, w = mask_logits.shape
        sizes = [len(t) for t in target_masks]
        device = mask_logits.device
        empty = torch.empty(0, dtype=torch.int64, device=device)
        if sum(sizes) == 0:
            return [(empty, empty) for _ in range(batch)]
        all_targets = torch.cat([t.reshape(-1, h, w) for t in target_masks])
        all_labels = torch.cat(labels) if labels is not None else None
        costs = self.cost(mask_logits, all_targets, class_logits, all_labels)  # (B, N, T)
        return solve(costs, sizes, device)


def solve(costs: Tensor, sizes: list[int], device: torch.device) -> list[Assignment]:
    """costs (B, N, T) of every prediction of every image against the T = sum(sizes) targets of
    the batch -> each image's optimal assignment on its own block (scipy), sorted by prediction."""
    empty = torch.empty(0, dtype=torch.int64, device=device)
    costs = torch.nan_to_num(costs, nan=1e6, posinf=1e6, neginf=-1e6).cpu()
    assignments = []
    for b, block in enumerate(costs.split(sizes, dim=-1)):
        if sizes[b] == 0:
            assignments.append((empty, empty))
            continue
        rows, cols = linear_sum_assignment(block[b].numpy())
        assignments.append(
            (
                torch.as_tensor(rows, dtype=torch.int64, device=device),
                torch.as_tensor(cols, dtype=torch.int64, device=device),
            )
        )
    return assignments
