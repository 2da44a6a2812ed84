"""CutLER's DropLoss in both set criteria: which kernels lose their background class loss, the
normalisers, the no-op cases, the logged share, and short pre-trainings with DropLoss and K-Net's
criterion forms."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torchvision.ops import sigmoid_focal_loss

from tests.trainer.helpers import run_cli, train_records
from tests.trainer.test_mask2former_commands import MASK2FORMER
from tests.trainer.test_pretrain import _args, make_shards
from trainer.config import load_config
from trainer.criterion.drop_loss import dropped_kernels, max_iou
from trainer.criterion.losses import LOSS_WEIGHTS, SetCriterion
from trainer.criterion.matcher import FOCAL_ALPHA, FOCAL_GAMMA
from trainer.criterion.point_sampling import PointSampling
from trainer.model.mask2former.criterion import Mask2FormerCriterion

BIG = 20.0
CUTLER_IOU = 0.01


def cells(rows: slice, cols: slice, size: int = 8) -> torch.Tensor:
    """An (size, size) binary map with the given block set."""
    out = torch.zeros(size, size)
    out[rows, cols] = 1
    return out


def three_kernels(disjoint: bool = True):
    """One 4x4-cell target; kernel 0 predicts it exactly (matched), kernel 1 overlaps it by 2x2
    cells (IoU 4/28), kernel 2 lies in the opposite corner (IoU 0) or, with ``disjoint`` False,
    overlaps it by one cell (IoU 1/19)."""
    target = cells(slice(0, 4), slice(0, 4))
    other = cells(slice(6, 8), slice(6, 8)) if disjoint else cells(slice(3, 5), slice(3, 5))
    binary = torch.stack([target, cells(slice(2, 6), slice(2, 6)), other])
    mask_logits = ((binary * 2 - 1) * BIG)[None]  # (1, 3, 8, 8)
    class_logits = torch.tensor([[[1.5], [0.5], [2.0]]])  # (1, 3, 1)
    targets = [{"masks": target[None], "labels": torch.zeros(1, dtype=torch.int64)}]
    return mask_logits, class_logits, targets


def knet_outputs(mask_logits, class_logits):
    """One update stage (assigned on the initial masks, which are the same)."""
    n = mask_logits.shape[1]
    return {
        "init": {"masks": mask_logits, "semantic": torch.zeros(1, 1, 8, 8)},
        "stages": [{"masks": mask_logits, "logits": class_logits, "kernels": torch.zeros(1, n, 4)}],
    }


def test_max_iou_and_dropped_kernels_on_a_hand_made_case():
    mask_logits, _, targets = three_kernels()
    masks = [targets[0]["masks"]]
    torch.testing.assert_close(max_iou(mask_logits, masks), torch.tensor([[1.0, 4 / 28, 0.0]]))
    matched = [(torch.tensor([0]), torch.tensor([0]))]
    assert dropped_kernels(mask_logits, masks, matched, CUTLER_IOU).tolist() == [
        [False, False, True]
    ]
    assert dropped_kernels(mask_logits, masks, matched, 0.0) is None  # off
    # At a threshold above kernel 1's overlap it is dropped too; the matched kernel never is.
    assert dropped_kernels(mask_logits, masks, matched, 0.5).tolist() == [[False, True, True]]
    # A soft (area-downsampled) target gives the IoU with the full-resolution mask: the
    # prediction covers 1 cell, the mask half of that cell -> 0.5 / 1.
    half = torch.zeros(1, 8, 8)
    half[0, 0, 0] = 0.5
    one = ((cells(slice(0, 1), slice(0, 1)) * 2 - 1) * BIG)[None, None]
    assert max_iou(one, [half]).item() == pytest.approx(0.5)
    # An image without targets: every unmatched kernel overlaps nothing.
    empty = [torch.zeros(0, 8, 8)]
    none = [(torch.zeros(0, dtype=torch.int64),) * 2]
    assert dropped_kernels(mask_logits, empty, none, CUTLER_IOU).all()


def test_knet_class_loss_drops_only_the_disjoint_kernel():
    mask_logits, class_logits, targets = three_kernels()
    criterion = SetCriterion(1, drop_loss_iou=CUTLER_IOU)
    losses, assignments = criterion(knet_outputs(mask_logits, class_logits), targets)
    assert assignments[1][0][0].tolist() == [0]  # kernel 0 matched
    # Expected by hand: kernel 0's foreground term plus kernel 1's background term, over one
    # positive (the normaliser is unchanged); kernel 2's background term is gone.
    onehot = torch.tensor([[1.0], [0.0], [0.0]])
    terms = sigmoid_focal_loss(class_logits[0], onehot, FOCAL_ALPHA, FOCAL_GAMMA)
    expected = LOSS_WEIGHTS["cls"] * (terms[0] + terms[1]).sum() / 1
    torch.testing.assert_close(losses["loss_s1_cls"], expected)
    assert losses["stat_dropped"].item() == pytest.approx(1 / 3)
    assert not losses["stat_dropped"].requires_grad
    # Without DropLoss all three terms count, and nothing is logged.
    off, _ = SetCriterion(1)(knet_outputs(mask_logits, class_logits), targets)
    torch.testing.assert_close(off["loss_s1_cls"], LOSS_WEIGHTS["cls"] * terms.sum())
    assert "stat_dropped" not in off
    # The dropped kernel gets no class gradient; the overlapping unmatched one does.
    leaf = class_logits.clone().requires_grad_(True)
    criterion(knet_outputs(mask_logits, leaf), targets)[0]["loss_s1_cls"].backward()
    assert leaf.grad[0, 2].abs().item() == 0.0 and leaf.grad[0, 1].abs().item() > 0


@pytest.mark.parametrize("iou", [0.0, CUTLER_IOU])
def test_drop_loss_is_a_bitwise_no_op_when_nothing_is_dropped(iou):
    """Every unmatched kernel overlaps the target (or DropLoss is off): the losses are exactly
    those of the criterion without DropLoss."""
    mask_logits, class_logits, targets = three_kernels(disjoint=False)
    outputs = knet_outputs(mask_logits, class_logits)
    base, _ = SetCriterion(1)(outputs, targets)
    dropped, _ = SetCriterion(1, drop_loss_iou=iou)(outputs, targets)
    assert dropped.pop("stat_dropped", torch.tensor(0.0)).item() == 0.0
    assert dropped.keys() == base.keys()
    for name, value in base.items():
        assert torch.equal(dropped[name], value), name
    m2f_outputs = {"init": {"masks": mask_logits, "logits": torch.zeros(1, 3, 2)}, "stages": []}
    m2f_base, _ = Mask2FormerCriterion(1)(m2f_outputs, targets)
    m2f, _ = Mask2FormerCriterion(1, drop_loss_iou=iou)(m2f_outputs, targets)
    m2f.pop("stat_dropped", None)
    for name, value in m2f_base.items():
        assert torch.equal(m2f[name], value), name


@pytest.mark.parametrize("points", [None, PointSampling()])
def test_mask2former_drops_the_no_object_term_and_keeps_the_normaliser(points):
    mask_logits, _, targets = three_kernels()
    targets[0]["masks"] = F.interpolate(targets[0]["masks"][None], scale_factor=4.0)[0]  # 32x32
    class_logits = torch.tensor([[[2.0, -1.0], [0.5, 0.3], [1.0, -0.5]]])  # (1, 3, C + 1)
    pred = {"masks": mask_logits, "logits": class_logits}
    criterion = Mask2FormerCriterion(1, points, drop_loss_iou=CUTLER_IOU)
    losses, assignments = criterion({"init": pred, "stages": [pred]}, targets)
    assert [a[0][0].tolist() for a in assignments] == [[0], [0]]
    ce = F.cross_entropy(class_logits[0], torch.tensor([0, 1, 1]), reduction="none")
    # Query 0 is class 0 (weight 1), query 1 no-object (0.1), query 2's no-object term dropped;
    # the normaliser still counts all three weights.
    expected = 2.0 * (ce[0] + 0.1 * ce[1]) / (1 + 0.1 + 0.1)
    for name in ("loss_init_cls", "loss_s1_cls"):
        torch.testing.assert_close(losses[name], expected)
    assert losses["stat_dropped"].item() == pytest.approx(1 / 3)


@pytest.mark.parametrize("kind", ["knet", "mask2former"])
def test_pretraining_with_drop_loss_and_knet_forms(tmp_path, kind):
    shards = make_shards(tmp_path)
    out = tmp_path / "pretrain"
    switches = ["pretrain.drop_loss_iou=0.01", "model.criterion_form=knet"]
    if kind == "mask2former":
        switches += MASK2FORMER
    extra = [a for s in switches for a in ("--set", s)]
    code, _, stderr = run_cli(*_args(shards, out, 2, *extra))
    assert code == 0, stderr
    records = train_records(out)
    assert [r["iter"] for r in records] == [1, 2]
    for r in records:
        assert 0.0 <= r["stat_dropped"] <= 1.0
        assert all(math.isfinite(v) for k, v in r.items() if k.startswith("loss"))
    recorded = load_config(out / "config.toml")
    assert recorded.pretrain.drop_loss_iou == 0.01 and recorded.model.criterion_form == "knet"


def test_bad_switch_values_are_one_line_errors(tmp_path):
    shards = make_shards(tmp_path)
    for setting, key in (
        ("pretrain.drop_loss_iou=1.5", "drop_loss_iou"),
        ("model.criterion_form=vnet", "criterion_form"),
    ):
        code, _, stderr = run_cli(*_args(shards, tmp_path / "out", 1, "--set", setting))
        assert code == 2 and key in stderr and "Traceback" not in stderr, stderr
        assert len(stderr.strip().splitlines()) == 1, stderr
