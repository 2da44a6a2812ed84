"""Prompts, slots, prompt-kernel matching and kernel supervision."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from trainer.criterion.prompts import (
    KernelSupervision,
    PromptKernelMatching,
    box_prompts,
    fill_slots,
    grid_boxes,
    slot_indices,
)


def test_repeat_rule_fewer_than_slots():
    idx = slot_indices(3, 20)  # floor(20/3) = 6 each, then the first 20 mod 3 = 2 once more
    assert idx.tolist() == [0] * 6 + [1] * 6 + [2] * 6 + [0, 1]
    assert slot_indices(1, 20).tolist() == [0] * 20
    assert slot_indices(7, 20).bincount().tolist() == [3] * 6 + [2]


def test_repeat_rule_equal_and_more_than_slots():
    assert slot_indices(20, 20).tolist() == list(range(20))
    assert slot_indices(27, 20).tolist() == list(range(20))  # the first 20 (highest scores)
    assert slot_indices(0, 20).numel() == 0


def test_fill_slots_marks_invalid_slots():
    prompts = [torch.arange(6.0).reshape(3, 2), torch.zeros(0, 2)]
    slots, source = fill_slots(prompts, 5)
    assert source.tolist() == [[0, 1, 2, 0, 1], [-1] * 5]  # 1 each, then 2 more
    assert torch.equal(slots[0, 4], prompts[0][1])
    assert torch.equal(slots[1], torch.zeros(5, 2))


def test_grid_boxes_tight_degenerate_and_clipped():
    boxes = torch.tensor(
        [
            [5.0, 3.0, 40.0, 30.0],  # ordinary: floor / ceil on a stride-14 grid
            [28.0, 20.0, 28.0, 30.0],  # zero width on a cell edge: widened to 2 cells
            [20.0, 20.0, 20.0, 30.0],  # zero width inside a cell: that one cell
            [0.0, 0.0, 0.0, 0.0],  # zero-size at the corner: widened, then clipped
            [50.0, 10.0, 60.0, 60.0],  # reaches past the grid: clipped
        ]
    )
    cells = grid_boxes(boxes, 14.0, height=4, width=4)
    assert cells[0].tolist() == [0, 0, 3, 3]
    assert cells[1].tolist() == [1, 1, 3, 3]  # x: 28/14 = 2 -> [1, 3)
    assert cells[2].tolist() == [1, 1, 2, 3]
    assert cells[3].tolist() == [0, 0, 1, 1]
    assert cells[4].tolist() == [3, 0, 4, 4]


def test_box_prompts_are_box_means_and_detached():
    g = torch.Generator().manual_seed(0)
    level = torch.randn(1, 5, 4, 6, generator=g, requires_grad=True)
    boxes = [torch.tensor([[28.0, 0.0, 84.0, 56.0], [0.0, 28.0, 28.0, 112.0]])]
    (p,) = box_prompts(level, boxes, stride=28.0)
    assert p.shape == (2, 5) and not p.requires_grad
    assert torch.allclose(p[0], level[0, :, 0:2, 1:3].mean(dim=(1, 2)), atol=1e-6)
    assert torch.allclose(p[1], level[0, :, 1:4, 0:1].mean(dim=(1, 2)), atol=1e-6)


def one_hot_setup(num_kernels: int = 6):
    """P5 whose three boxes average to three orthogonal directions e0, e1, e2 (D = 4)."""
    level = torch.zeros(2, 4, 2, 4)
    for i in range(3):
        level[0, i, :, i] = 2.0  # column i of image 0 holds 2 * e_i
    boxes = [
        torch.tensor([[float(i), 0.0, i + 1.0, 2.0] for i in range(3)]),  # stride 1: columns
        torch.zeros(0, 4),  # image 1 has no prompt
    ]
    g = torch.Generator().manual_seed(1)
    kernels = torch.randn(2, num_kernels, 4, generator=g)
    return level, boxes, kernels


def test_matching_adds_the_argmax_prompt():
    level, boxes, kernels = one_hot_setup()
    matching = PromptKernelMatching(slots=20, keep=1.0)
    out, stats = matching(kernels, level, boxes, stride=1.0)
    prompts = 2.0 * torch.eye(4)[:3]  # P_l = 2 e_l
    cos = F.normalize(kernels[0], dim=-1) @ F.normalize(prompts, dim=-1).T
    expected = kernels[0] + prompts[cos.argmax(dim=1)]
    assert torch.allclose(out[0], expected)
    assert torch.equal(out[1], kernels[1])  # no prompts: untouched
    assert stats["prompt_drop"].item() == 0.0
    assert torch.allclose(stats["prompt_cos"], cos.max(dim=1).values.mean())
    assert stats["prompt_distinct"].item() == cos.argmax(dim=1).unique().numel()


def test_matching_never_picks_the_zero_coordinate_of_invalid_slots():
    level, boxes, kernels = one_hot_setup()
    kernels[0] = -kernels[0].abs()  # negative cosine with every prompt; invalid slots are 0
    boxes = [boxes[0][:1], boxes[1]]  # one prompt -> every valid slot holds it
    out, _ = PromptKernelMatching(slots=4, keep=1.0)(kernels, level, boxes, stride=1.0)
    assert torch.allclose(out[0] - kernels[0], (2.0 * torch.eye(4)[0]).expand(6, 4))


def test_matching_drops_about_ten_percent():
    level, boxes, _ = one_hot_setup()
    kernels = torch.randn(2, 2000, 4, generator=torch.Generator().manual_seed(2))
    gen = torch.Generator().manual_seed(3)
    out, stats = PromptKernelMatching(keep=0.9, generator=gen)(kernels, level, boxes, 1.0)
    dropped = (out[0] == kernels[0]).all(dim=1).float().mean().item()
    assert abs(dropped - 0.1) < 0.025
    assert stats["prompt_drop"].item() == pytest.approx(dropped)
    assert torch.equal(out[1], kernels[1])


def test_no_gradient_through_prompts():
    level, boxes, kernels = one_hot_setup()
    level.requires_grad_(True)
    kernels.requires_grad_(True)
    out, _ = PromptKernelMatching(keep=1.0)(kernels, level, boxes, 1.0)
    (out * torch.arange(4.0)).sum().backward()
    assert level.grad is None
    assert torch.equal(kernels.grad, torch.arange(4.0).expand_as(kernels))


def supervision_setup():
    torch.manual_seed(0)
    sup = KernelSupervision(seed_dim=3, kernel_dim=3)
    with torch.no_grad():  # t_l = S_l, so the expected values are plain cosines
        sup.proj.weight.copy_(torch.eye(3))
        sup.proj.bias.zero_()
    seeds = [torch.eye(3)[:2]]  # t_0 = e0, t_1 = e1
    kernels = torch.zeros(1, 4, 3)
    kernels[0, 1] = torch.tensor([0.0, 1.0, 0.0])  # aligned with t_1
    kernels[0, 3] = torch.tensor([1.0, 0.0, 0.0])  # aligned with t_0
    kernels[0, 0] = torch.tensor([0.0, 0.0, 1.0])
    kernels[0, 2] = torch.tensor([0.0, 0.0, 1.0])
    return sup, seeds, kernels


def test_kernel_supervision_pairs_through_the_assignment():
    sup, seeds, kernels = supervision_setup()
    # Assignment: kernel 1 -> mask 1, kernel 3 -> mask 0 (sorted by kernel index).
    assign = [[(torch.tensor([1, 3]), torch.tensor([1, 0]))]]
    losses, _ = sup([kernels], assign, seeds)
    assert losses["loss_s1_kernel"].item() == pytest.approx(0.0, abs=1e-6)
    # Index order (kernel 1 with t_0, kernel 3 with t_1) would have given 1 - 0 = 1.
    wrong = [[(torch.tensor([1, 3]), torch.tensor([0, 1]))]]
    assert sup([kernels], wrong, seeds)[0]["loss_s1_kernel"].item() == pytest.approx(1.0)
    # One pair per stage; stages are reported separately (the engine sums them).
    two, _ = sup([kernels, kernels], [assign[0], wrong[0]], seeds)
    assert set(two) == {"loss_s1_kernel", "loss_s2_kernel"}


def test_kernel_supervision_gradients_and_empty_stage():
    sup, seeds, kernels = supervision_setup()
    kernels.requires_grad_(True)
    empty = torch.empty(0, dtype=torch.int64)
    losses, stats = sup([kernels], [[(empty, empty)]], seeds)
    assert losses["loss_s1_kernel"].item() == 0.0
    losses["loss_s1_kernel"].backward()
    assert sup.proj.weight.grad is not None and kernels.grad is not None
    assert stats["target_spread"].item() == pytest.approx(0.0)  # e0 and e1 are orthogonal


def test_target_spread_detects_collapse():
    sup = KernelSupervision(seed_dim=2, kernel_dim=4)
    same = [torch.ones(3, 2), torch.ones(1, 2)]
    _, stats = sup([torch.zeros(2, 5, 4)], [[(torch.tensor([0]), torch.tensor([0]))] * 2], same)
    assert stats["target_spread"].item() == pytest.approx(1.0, abs=1e-5)
    _, none = sup([torch.zeros(1, 5, 4)], [[(torch.tensor([0]), torch.tensor([0]))]], [same[1]])
    assert "target_spread" not in none
