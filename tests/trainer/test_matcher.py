"""Hungarian matcher: cost terms, batched == per-image, empty targets, known optimum."""

from __future__ import annotations

import itertools

import torch
import torch.nn.functional as F

from trainer.criterion.matcher import (
    COST_WEIGHTS,
    HungarianMatcher,
    dice_cost,
    focal_class_cost,
    mask_bce_cost,
)


def random_problem(sizes: tuple[int, ...], n: int = 6, h: int = 8, classes: int = 3, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(len(sizes), n, h, h, generator=g) * 3
    cls = torch.randn(len(sizes), n, classes, generator=g)
    targets = [(torch.rand(s, h, h, generator=g) > 0.6).float() for s in sizes]
    labels = [torch.randint(0, classes, (s,), generator=g) for s in sizes]
    return logits, cls, targets, labels


def test_cost_terms_match_their_definitions():
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(4, 10, generator=g)
    targets = torch.rand(3, 10, generator=g)  # soft targets
    bce = mask_bce_cost(logits, targets)
    for n, t in itertools.product(range(4), range(3)):
        ref = F.binary_cross_entropy_with_logits(logits[n], targets[t])
        assert torch.allclose(bce[n, t], ref, atol=1e-6)
        p = logits[n].sigmoid()
        ref_dice = 1 - (2 * (p * targets[t]).sum() + 1) / (p.sum() + targets[t].sum() + 1)
        assert torch.allclose(dice_cost(logits, targets)[n, t], ref_dice, atol=1e-6)
    # A confident correct class costs less than a confident wrong one.
    cls = torch.tensor([[5.0, -5.0], [-5.0, 5.0]])
    cost = focal_class_cost(cls, torch.tensor([0, 1]))
    assert cost[0, 0] < cost[1, 0] and cost[1, 1] < cost[0, 1]


def test_batched_equals_per_image():
    logits, cls, targets, labels = random_problem((3, 0, 5, 1))
    matcher = HungarianMatcher()
    for with_cls in (False, True):
        batched = matcher(logits, targets, cls if with_cls else None, labels if with_cls else None)
        for b in range(len(targets)):
            single = matcher(
                logits[b : b + 1],
                targets[b : b + 1],
                cls[b : b + 1] if with_cls else None,
                labels[b : b + 1] if with_cls else None,
            )[0]
            assert torch.equal(batched[b][0], single[0])
            assert torch.equal(batched[b][1], single[1])
            assert len(batched[b][0]) == min(logits.shape[1], len(targets[b]))


def test_assignment_is_optimal():
    """Against brute force over every injective kernel -> target map."""
    matcher = HungarianMatcher()
    for seed in range(3):
        logits, cls, targets, labels = random_problem((3,), n=5, seed=seed)
        rows, cols = matcher(logits, targets, cls, labels)[0]
        cost = matcher.cost(logits, targets[0], cls, labels[0])[0]  # (N, T)
        found = cost[rows, cols].sum()
        best = min(
            cost[list(perm), list(range(3))].sum() for perm in itertools.permutations(range(5), 3)
        )
        assert torch.allclose(found, best)


def test_hand_made_case_beats_greedy():
    """On a 1x8 grid: t0 = cells 0-3, t1 = cells 0-5; kernel 0 predicts cells 0-4 (one cell off
    either target, slightly cheaper on t1), kernel 1 predicts cells 1-5 (good only for t1).
    Taking the cheapest pair first (k0 -> t1) would force k1 -> t0 (expensive); the optimum is
    k0 -> t0, k1 -> t1."""
    t = torch.zeros(2, 1, 8)
    t[0, 0, 0:4] = 1
    t[1, 0, 0:6] = 1
    logits = -torch.ones(1, 2, 1, 8) * 20
    logits[0, 0, 0, 0:5] = 20
    logits[0, 1, 0, 1:6] = 20
    matcher = HungarianMatcher()
    cost = matcher.cost(logits, t)[0]
    assert cost[0, 1] < cost[0, 0]  # the greedy trap: k0's cheapest target is t1
    assert cost[0, 0] + cost[1, 1] < cost[0, 1] + cost[1, 0]
    rows, cols = matcher(logits, [t])[0]
    assert rows.tolist() == [0, 1] and cols.tolist() == [0, 1]


def test_empty_targets():
    logits, cls, _, _ = random_problem((2, 2))
    matcher = HungarianMatcher()
    empty = [torch.zeros(0, 8, 8), torch.zeros(0, 8, 8)]
    labels = [torch.zeros(0, dtype=torch.int64)] * 2
    for rows, cols in matcher(logits, empty, cls, labels):
        assert rows.numel() == 0 and cols.numel() == 0 and rows.dtype == torch.int64
    one = [torch.zeros(0, 8, 8), torch.ones(1, 8, 8)]
    out = matcher(logits, one)
    assert out[0][0].numel() == 0 and out[1][1].tolist() == [0]


def test_cost_weights_live_in_one_place():
    assert COST_WEIGHTS == {"cls": 2.0, "dice": 4.0, "mask": 1.0}
    logits, cls, targets, labels = random_problem((2,))
    matcher = HungarianMatcher()
    total = matcher.cost(logits, targets[0], cls, labels[0])
    preds, flat = logits.flatten(2), targets[0].flatten(1)
    expected = (
        4.0 * dice_cost(preds, flat)
        + 1.0 * mask_bce_cost(preds, flat)
        + 2.0 * focal_class_cost(cls, labels[0])
    )
    assert torch.allclose(total, expected, atol=1e-5)
