"""Point-sampled mask costs and losses (Mask2Former's), for Mask2Former and as K-Net's switch."""

from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F

from tests.trainer.test_model import FakeResNet, make_targets, tiny_cfg
from trainer.config import ModelConfig
from trainer.criterion.losses import SetCriterion, dice_loss
from trainer.criterion.matcher import HungarianMatcher
from trainer.criterion.point_sampling import PointSampling, importance_pairs, point_sample
from trainer.model.factory import build_criterion, point_sampling
from trainer.model.mask2former.criterion import Mask2FormerCriterion
from trainer.model.objective import build_objective


def test_point_sample_reads_cell_centres_and_borders():
    maps = torch.arange(6, dtype=torch.float32).reshape(1, 2, 3)
    centres = torch.tensor([[(j + 0.5) / 3, (i + 0.5) / 2] for i in range(2) for j in range(3)])
    torch.testing.assert_close(point_sample(maps, centres)[0], torch.arange(6.0))
    # Halfway between cells 0 and 1 of the top row; the corners take the corner cells.
    mid_corners = torch.tensor([[1 / 3, 0.25], [0.0, 0.0], [1.0, 1.0]])
    torch.testing.assert_close(point_sample(maps, mid_corners)[0], torch.tensor([0.5, 0.0, 5.0]))


def test_uniform_point_losses_equal_the_dense_losses_in_expectation():
    """With uniform points only (importance 0), the point-sampled BCE and Dice estimate the
    losses over the whole (bilinearly continuous) maps: their mean over draws matches the dense
    losses computed on a 32x bilinear up-sampling of the same maps."""
    g = torch.Generator().manual_seed(0)
    logits = 3 * torch.randn(2, 6, 6, generator=g)
    targets = (torch.rand(2, 6, 6, generator=g) > 0.5).float()
    fine = 192  # 32 cells per cell: the dense losses approximate the integrals over the maps
    up_logits = F.interpolate(logits[None], size=(fine, fine), mode="bilinear")[0]
    up_targets = F.interpolate(targets[None], size=(fine, fine), mode="bilinear")[0]
    dense_bce = F.binary_cross_entropy_with_logits(up_logits, up_targets)
    dense_dice = dice_loss(up_logits.flatten(1), up_targets.flatten(1)).mean()

    uniform = PointSampling(num_points=12544, oversample=1.0, importance=0.0)
    torch.manual_seed(0)
    bces, dices = [], []
    for _ in range(16):
        preds, tgts = importance_pairs(logits, targets, uniform)
        bces.append(F.binary_cross_entropy_with_logits(preds, tgts))
        dices.append(dice_loss(preds, tgts).mean())
    assert abs(float(torch.stack(bces).mean() - dense_bce)) < 0.01 * float(dense_bce)
    assert abs(float(torch.stack(dices).mean() - dense_dice)) < 0.01 * float(dense_dice)
    # A single draw is an estimate, not the value: the draws differ.
    assert len({round(float(b), 6) for b in bces}) > 1


def test_importance_sampling_prefers_uncertain_points():
    """Half the map is uncertain (|logit| < 0.1), half confident: 75% of the points are chosen
    among the uncertain candidates, the other 25% uniformly, so 87.5% land in the uncertain half."""
    torch.manual_seed(0)
    logits = torch.full((1, 32, 32), 10.0)
    logits[0, :, :16] = 0.1 * torch.rand(32, 16) - 0.05
    sampling = PointSampling(num_points=4000)
    preds, _ = importance_pairs(logits, torch.zeros(1, 32, 32), sampling)
    share = float((preds.abs() < 5).float().mean())
    assert abs(share - 0.875) < 0.02


def _perfect_case(size: int = 512, stride: int = 2):
    """Two square objects: full-resolution binary targets, and predictions on a grid of the
    given stride that are confident (+-40) and right everywhere, with perfect classes."""
    masks = torch.zeros(2, size, size)
    masks[0, size // 8 : size // 2, size // 16 : size // 2] = 1
    masks[1, size // 2 : size - size // 16, size // 2 : size - size // 8] = 1
    grid = size // stride
    queries = 4
    pred = torch.full((1, queries, grid, grid), -40.0)
    pred[0, 1] = 80 * F.avg_pool2d(masks[0][None], stride)[0] - 40
    pred[0, 3] = 80 * F.avg_pool2d(masks[1][None], stride)[0] - 40
    logits = torch.full((1, queries, 3), -20.0)
    logits[0, :, 2] = 20.0  # no object ...
    logits[0, 1] = torch.tensor([20.0, -20.0, -20.0])  # ... except query 1 (class 0)
    logits[0, 3] = torch.tensor([-20.0, 20.0, -20.0])  # and query 3 (class 1)
    targets = [{"masks": masks, "labels": torch.tensor([0, 1])}]
    return pred, logits, targets


def test_perfect_prediction_gives_near_zero_point_sampled_loss():
    torch.manual_seed(0)
    pred, logits, targets = _perfect_case()
    stage = {"masks": pred, "logits": logits, "kernels": torch.zeros(1, 4, 8)}
    criterion = Mask2FormerCriterion(num_classes=2, points=PointSampling())
    losses, assignments = criterion({"init": stage, "stages": [stage]}, targets)
    assert set(losses) == {f"loss_{p}_{t}" for p in ("init", "s1") for t in ("cls", "mask", "dice")}
    for rows, cols in assignments[0] + assignments[1]:  # the right query for each object
        assert rows.tolist() == [1, 3] and cols.tolist() == [0, 1]
    # The only imperfection: a reading within a cell of a mask's edge interpolates the binary
    # target to a fraction, and importance sampling deliberately puts its points there. Per
    # unweighted term that costs < 0.02 (an untrained prediction costs ~0.7 BCE, ~0.5 Dice).
    assert float(losses["loss_init_cls"]) < 1e-6
    for name in ("loss_init_mask", "loss_init_dice", "loss_s1_mask", "loss_s1_dice"):
        assert float(losses[name]) < 0.02 * 5, (name, losses)
    # A prediction that misses both objects costs far more.
    empty = {**stage, "masks": torch.full_like(pred, -40.0)}
    bad, _ = criterion({"init": empty, "stages": []}, targets)
    assert float(bad["loss_init_dice"]) > 0.9 * 5 and float(bad["loss_init_mask"]) > 1.0


def test_no_object_weight_and_class_cost():
    criterion = Mask2FormerCriterion(num_classes=2)
    torch.testing.assert_close(criterion.class_weight, torch.tensor([1.0, 1.0, 0.1]))
    assert "class_weight" not in criterion.state_dict()  # a constant, not checkpointed
    matcher = criterion.matcher
    assert matcher.weights == {"cls": 2.0, "mask": 5.0, "dice": 5.0}
    logits = torch.log(torch.tensor([[[0.7, 0.2, 0.1], [0.1, 0.1, 0.8]]]))
    cost = matcher.class_cost(logits, torch.tensor([0, 1]))
    torch.testing.assert_close(cost, -torch.tensor([[[0.7, 0.2], [0.1, 0.1]]]))


def test_point_matching_agrees_with_dense_matching_on_a_clear_case():
    torch.manual_seed(0)
    pred, logits, targets = _perfect_case(size=64, stride=1)
    masks = [targets[0]["masks"]]
    dense = HungarianMatcher()(pred, masks)
    points = HungarianMatcher(num_points=500)(pred, masks)
    assert [r.tolist() for r in dense[0]] == [r.tolist() for r in points[0]] == [[1, 3], [0, 1]]


def test_mask_loss_switch_picks_each_models_default():
    knet, m2f = ModelConfig(), ModelConfig(kind="mask2former")
    assert point_sampling(knet) is None
    assert point_sampling(m2f) == PointSampling(12544, 3.0, 0.75)
    assert point_sampling(dataclasses.replace(knet, mask_loss="points")) is not None
    assert point_sampling(dataclasses.replace(m2f, mask_loss="dense")) is None
    criterion = build_criterion(dataclasses.replace(knet, mask_loss="points"), 1)
    assert isinstance(criterion, SetCriterion) and criterion.matcher.num_points == 12544


def test_knet_trains_with_point_sampled_losses():
    torch.manual_seed(0)
    backbone = FakeResNet()
    cfg = tiny_cfg(mask_loss="points", num_points=200)
    objective = build_objective(backbone, cfg, 1, prompts=True, kernel_supervision=True)
    assert objective.criterion.points == PointSampling(200, 3.0, 0.75)
    out = objective(torch.randn(2, 3, 64, 64), make_targets(64, backbone.embed_dim))
    losses = [v for k, v in out.items() if k.startswith("loss_")]
    assert all(torch.isfinite(v) for v in losses)
    sum(losses).backward()
    head = objective.knet.stages[-1].mask_kernel.weight
    assert head.grad is not None and head.grad.abs().sum() > 0
