"""SetCriterion: perfect predictions, empty targets, assignment per stage, targets, weights."""

from __future__ import annotations

import torch

from trainer.criterion.losses import LOSS_WEIGHTS, SetCriterion, mask_targets, semantic_targets

BIG = 20.0


def grid_masks() -> list[torch.Tensor]:
    """Masks in a 32x32 input frame aligned to 4-pixel cells (binary on the 8x8 mask grid)."""
    a = torch.zeros(2, 32, 32)
    a[0, 0:12, 0:16] = 1
    a[1, 16:32, 8:28] = 1
    b = torch.zeros(1, 32, 32)
    b[0, 4:20, 12:32] = 1
    return [a, b]


def perfect_outputs(masks: list[torch.Tensor], owners: list[list[int]], n: int, stages: int):
    """Logits +-BIG reproducing each target with kernel owners[b][l]; other kernels background."""
    grid = [mask_targets(m, (8, 8)) for m in masks]
    mask_logits = torch.full((len(masks), n, 8, 8), -BIG)
    cls = torch.full((len(masks), n, 1), -BIG)
    semantic = torch.full((len(masks), 1, 8, 8), -BIG)
    for b, (g, own) in enumerate(zip(grid, owners)):
        for t, k in enumerate(own):
            mask_logits[b, k] = (g[t] * 2 - 1) * BIG
            cls[b, k, 0] = BIG
        semantic[b, 0] = (g.amax(0) * 2 - 1) * BIG
    stage = {"masks": mask_logits, "logits": cls, "kernels": torch.randn(len(masks), n, 4)}
    return {
        "init": {"masks": mask_logits, "semantic": semantic, "kernels": torch.randn(2, n, 4)},
        "stages": [dict(stage) for _ in range(stages)],
    }


def make_targets(masks: list[torch.Tensor]) -> list[dict]:
    return [{"masks": m, "labels": torch.zeros(len(m), dtype=torch.int64)} for m in masks]


def test_perfect_prediction_gives_near_zero_losses():
    masks = grid_masks()
    outputs = perfect_outputs(masks, owners=[[3, 1], [4]], n=6, stages=3)
    losses, assignments = SetCriterion(num_classes=1)(outputs, make_targets(masks))
    assert set(losses) == {"loss_init_mask", "loss_init_dice", "loss_init_semantic"} | {
        f"loss_s{i}_{k}" for i in (1, 2, 3) for k in ("cls", "mask", "dice")
    }
    for name, value in losses.items():
        assert value.item() < 1e-4, name
    assert len(assignments) == 4
    for stage in assignments:
        assert stage[0][0].tolist() == [1, 3] and stage[0][1].tolist() == [1, 0]
        assert stage[1][0].tolist() == [4] and stage[1][1].tolist() == [0]


def test_wrong_prediction_costs_more():
    masks = grid_masks()
    good = perfect_outputs(masks, owners=[[3, 1], [4]], n=6, stages=1)
    bad = perfect_outputs(masks, owners=[[3, 1], [4]], n=6, stages=1)
    bad["stages"][0]["masks"] = -bad["stages"][0]["masks"]
    criterion = SetCriterion(1)
    good_losses, _ = criterion(good, make_targets(masks))
    bad_losses, _ = criterion(bad, make_targets(masks))
    assert bad_losses["loss_s1_mask"] > 1.0 and bad_losses["loss_s1_dice"] > 1.0
    assert good_losses["loss_s1_mask"] < 1e-4


def test_empty_targets_keep_the_graph():
    torch.manual_seed(0)
    n, stages = 4, 2
    leaves = {
        "init_masks": torch.randn(2, n, 8, 8, requires_grad=True),
        "semantic": torch.randn(2, 1, 8, 8, requires_grad=True),
        "masks": torch.randn(2, n, 8, 8, requires_grad=True),
        "logits": torch.randn(2, n, 1, requires_grad=True),
    }
    outputs = {
        "init": {"masks": leaves["init_masks"], "semantic": leaves["semantic"]},
        "stages": [
            {"masks": leaves["masks"] * (i + 1), "logits": leaves["logits"] * (i + 1)}
            for i in range(stages)
        ],
    }
    empty = [torch.zeros(0, 32, 32), torch.zeros(0, 32, 32)]
    losses, assignments = SetCriterion(1)(outputs, make_targets(empty))
    for name in ("loss_init_mask", "loss_init_dice", "loss_s1_mask", "loss_s2_dice"):
        assert losses[name].item() == 0.0 and losses[name].requires_grad
    assert losses["loss_s1_cls"].item() > 0  # every kernel is background
    assert losses["loss_init_semantic"].item() > 0
    assert all(rows.numel() == 0 for stage in assignments for rows, _ in stage)
    sum(losses.values()).backward()
    for name, leaf in leaves.items():
        assert leaf.grad is not None and torch.isfinite(leaf.grad).all(), name


def test_update_stage_is_matched_on_previous_predictions():
    """Init masks pair k0-t0, k1-t1; stage 1 predicts them swapped. Stage 1 uses the init
    pairing; stage 2 uses stage 1's (swapped) predictions."""
    masks = [grid_masks()[0]]
    grid = mask_targets(masks[0], (8, 8))
    straight = ((grid * 2 - 1) * BIG)[None]  # (1, 2, 8, 8): kernel l predicts target l
    swapped = straight.flip(1)
    logits = torch.zeros(1, 2, 1)
    outputs = {
        "init": {"masks": straight, "semantic": torch.zeros(1, 1, 8, 8)},
        "stages": [
            {"masks": swapped, "logits": logits},
            {"masks": straight, "logits": logits},
        ],
    }
    losses, assignments = SetCriterion(1)(outputs, make_targets(masks))
    assert assignments[0][0][1].tolist() == [0, 1]  # init: k0-t0, k1-t1
    assert assignments[1][0][1].tolist() == [0, 1]  # stage 1: from the init masks
    assert assignments[2][0][1].tolist() == [1, 0]  # stage 2: from stage 1's swapped masks
    # Both update stages are therefore scored against the "wrong" targets.
    assert losses["loss_s1_dice"] > 1.0 and losses["loss_s2_dice"] > 1.0
    assert losses["loss_init_dice"] < 1e-4


def test_mask_targets_area_downsampling():
    m = torch.zeros(1, 8, 8)
    m[0, :, :2] = 1  # half of the first 4-pixel column of cells
    out = mask_targets(m, (2, 2))
    assert torch.allclose(out, torch.tensor([[[0.5, 0.0], [0.5, 0.0]]]))
    vit = mask_targets(torch.ones(3, 56, 56), (16, 16))  # stride 3.5
    assert vit.shape == (3, 16, 16) and torch.allclose(vit, torch.ones_like(vit))
    assert mask_targets(torch.zeros(0, 56, 56), (16, 16)).shape == (0, 16, 16)


def test_semantic_targets_per_class():
    masks = [torch.tensor([[[1.0, 0.0]], [[0.0, 0.5]], [[0.25, 1.0]]])]  # (3, 1, 2)
    labels = [torch.tensor([0, 0, 2])]
    sem = semantic_targets(masks, labels, num_classes=3)
    assert sem.shape == (1, 3, 1, 2)
    assert torch.allclose(sem[0, 0], torch.tensor([[1.0, 0.5]]))
    assert torch.equal(sem[0, 1], torch.zeros(1, 2))
    assert torch.allclose(sem[0, 2], torch.tensor([[0.25, 1.0]]))


def test_weights_come_from_one_dict():
    torch.manual_seed(0)
    masks = grid_masks()
    outputs = {
        "init": {"masks": torch.randn(2, 4, 8, 8), "semantic": torch.randn(2, 1, 8, 8)},
        "stages": [{"masks": torch.randn(2, 4, 8, 8), "logits": torch.randn(2, 4, 1)}],
    }
    base, _ = SetCriterion(1)(outputs, make_targets(masks))
    doubled, _ = SetCriterion(1, weights={k: 2 * v for k, v in LOSS_WEIGHTS.items()})(
        outputs, make_targets(masks)
    )
    for name in base:
        assert torch.allclose(doubled[name], 2 * base[name])
    assert LOSS_WEIGHTS["dice"] == 4.0 and LOSS_WEIGHTS["cls"] == 2.0
