"""``model.criterion_form``: K-Net's linear mask cost and V-Net Dice against hand computations,
perfect predictions in both forms, and the switch reaching both criteria."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from trainer.config import ModelConfig
from trainer.config_compat import with_later_defaults
from trainer.criterion.losses import dice_loss
from trainer.criterion.matcher import HungarianMatcher, dice_cost, knet_dice_cost, linear_mask_cost
from trainer.model.factory import build_criterion

# p = sigmoid(logits) = [[0.75, 0.25], [0.5, 0.5]] on a 2x2 grid, flattened.
LOGITS = torch.tensor([[math.log(3), -math.log(3), 0.0, 0.0]])
# Two targets: the left column and the right column.
TARGETS = torch.tensor([[1.0, 0.0, 1.0, 0.0], [0.0, 1.0, 0.0, 1.0]])


def test_knet_costs_equal_a_hand_computation():
    # Agreement p t + (1 - p)(1 - t) per cell: left 0.75 + 0.75 + 0.5 + 0.5 = 2.5 of 4 cells,
    # right 0.25 + 0.25 + 0.5 + 0.5 = 1.5 of 4.
    torch.testing.assert_close(linear_mask_cost(LOGITS, TARGETS), torch.tensor([[-0.625, -0.375]]))
    # sum p^2 = 0.5625 + 0.0625 + 0.25 + 0.25 = 1.125, sum t^2 = 2, eps = 2e-3;
    # sum p t: left 0.75 + 0.5 = 1.25, right 0.25 + 0.5 = 0.75.
    expected = torch.tensor([[1 - 2.5 / 3.127, 1 - 1.5 / 3.127]])
    torch.testing.assert_close(knet_dice_cost(LOGITS, TARGETS), expected)
    # The loss is the same Dice, pair by pair.
    pairs = dice_loss(LOGITS.expand(2, -1), TARGETS, form="knet")
    torch.testing.assert_close(pairs, expected[0])
    # Mask2Former's form differs: 1 - (2 sum(p t) + 1) / (sum p + sum t + 1).
    torch.testing.assert_close(dice_cost(LOGITS, TARGETS)[0, 0], torch.tensor(1 - 3.5 / 5.0))


def test_perfect_prediction_dice_is_near_zero_in_both_forms():
    target = (torch.rand(3, 64, generator=torch.Generator().manual_seed(0)) > 0.5).float()
    logits = (target * 2 - 1) * 20.0
    for form in ("mask2former", "knet"):
        assert dice_loss(logits, target, form).max().item() < 1e-3, form
    assert knet_dice_cost(logits, target).diagonal().max().item() < 1e-3
    # The linear mask cost of a perfect prediction is -1 (full agreement), its minimum.
    torch.testing.assert_close(linear_mask_cost(logits, target).diagonal(), -torch.ones(3))


def test_matcher_uses_the_chosen_form():
    logits = LOGITS.view(1, 1, 2, 2)
    targets = TARGETS.view(2, 2, 2)
    knet = HungarianMatcher(form="knet").cost(logits, targets)
    expected = 4 * knet_dice_cost(LOGITS, TARGETS) + 1 * linear_mask_cost(LOGITS, TARGETS)
    torch.testing.assert_close(knet[0], expected)
    assert not torch.allclose(HungarianMatcher().cost(logits, targets), knet)
    with pytest.raises(ValueError, match="unknown criterion form 'vnet'"):
        HungarianMatcher(form="vnet")


@pytest.mark.parametrize("kind", ["knet", "mask2former"])
def test_config_switch_reaches_each_criterion(kind):
    cfg = ModelConfig(kind=kind)
    assert cfg.criterion_form == "mask2former"  # today's forms stay the default
    default = build_criterion(cfg, 1)
    assert default.matcher.dice_cost is dice_cost and default.drop_loss_iou == 0.0
    knet = build_criterion(dataclasses.replace(cfg, criterion_form="knet"), 1, drop_loss_iou=0.01)
    assert knet.matcher.dice_cost is knet_dice_cost and knet.matcher.mask_cost is linear_mask_cost
    assert knet.form == "knet" and knet.drop_loss_iou == 0.01


def test_older_configs_read_as_the_forms_they_were_made_with():
    recorded = with_later_defaults({"model": {}, "pretrain": {}})
    assert recorded["model"]["criterion_form"] == "mask2former"
    assert recorded["pretrain"]["drop_loss_iou"] == 0.0
