"""QueryInst: output contract, gradients through the dynamic convolution, the box matcher's costs,
a perfect prediction's losses, RoI geometry, and the class layers fine-tuning skips."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
from torch import Tensor

from tests.trainer.test_model import FakeResNet, FakeViT, make_targets
from trainer.config import ModelConfig
from trainer.criterion.losses import class_loss
from trainer.model.factory import build_criterion, build_model
from trainer.model.objective import build_objective
from trainer.model.queryinst.criterion import (
    QUERYINST_WEIGHTS,
    QueryInstCriterion,
    box_costs,
    mask_roi_targets,
)
from trainer.model.queryinst.dynamic_conv import DynamicConv
from trainer.model.queryinst.model import QueryInst
from trainer.model.queryinst.roi import decode_boxes, level_of, paste_masks

# A QueryInst small enough for CPU tests: 6 queries of width 16, 2 stages, one mask convolution.
TINY_QI = ModelConfig(
    kind="queryinst",
    num_kernels=6,
    channels=16,
    num_heads=2,
    ffn_dim=32,
    dii_stages=2,
    dynamic_dim=8,
    mask_convs=1,
)


@pytest.mark.parametrize(
    ("backbone_cls", "size", "strides"),
    [(FakeResNet, 64, (4.0, 8.0, 16.0, 32.0)), (FakeViT, 56, (3.5, 7.0, 14.0, 28.0))],
)
def test_output_contract(backbone_cls, size, strides):
    torch.manual_seed(0)
    model = build_model(TINY_QI, backbone_cls(), num_classes=3)
    assert isinstance(model, QueryInst)
    assert model.strides == strides and model.mask_stride == strides[0]
    images = torch.randn(2, 3, size, size)
    out = model.train()(images)
    assert set(out) == {"init", "stages", "pyramid"} and len(out["stages"]) == 2
    assert out["init"]["kernels"].shape == (2, 6, 16)
    whole = torch.tensor([0.0, 0.0, size, size])  # proposals start as the whole image
    torch.testing.assert_close(out["init"]["boxes"], whole.expand(2, 6, 4))
    for stage in out["stages"]:  # training: masks only on demand, for the chosen queries
        assert set(stage) == {"logits", "kernels", "boxes", "roi_masks"}
        assert stage["logits"].shape == (2, 6, 3) and stage["kernels"].shape == (2, 6, 16)
        assert stage["boxes"].shape == (2, 6, 4)
        rows = [torch.tensor([0, 4]), torch.tensor([5])]
        assert stage["roi_masks"](rows).shape == (3, 28, 28)
    with torch.no_grad():
        out = model.eval()(images)
    h = int(size / model.mask_stride)
    for stage in out["stages"]:
        assert stage["masks"].shape == (2, 6, h, h)


def test_rejects_unpadded_input():
    model = build_model(TINY_QI, FakeViT(), 1)
    assert model.size_divisor == 28
    with pytest.raises(ValueError, match="size_divisor 28"):
        model(torch.randn(1, 3, 42, 42))


@pytest.mark.parametrize(("backbone_cls", "size"), [(FakeResNet, 64), (FakeViT, 56)])
def test_every_head_parameter_gets_a_finite_gradient(backbone_cls, size):
    torch.manual_seed(0)
    backbone = backbone_cls()
    objective = build_objective(backbone, TINY_QI, 1, prompts=True, kernel_supervision=True)
    # The last box layers start at zero (no gradient reaches the layers before them then);
    # perturb them to check the path.
    for head in objective.knet.heads:
        torch.nn.init.normal_(head.fc_reg.weight, std=0.01)
    out = objective(torch.randn(2, 3, size, size), make_targets(size, backbone.embed_dim, (3, 2)))
    losses = {k: v for k, v in out.items() if k.startswith("loss_")}
    expected = {f"loss_s{i}_{t}" for i in (1, 2) for t in ("cls", "l1", "giou", "dice", "kernel")}
    assert set(losses) == expected
    assert all(torch.isfinite(v) and v.dim() == 0 for v in losses.values())
    sum(losses.values()).backward()
    # The neck's coarser levels are read only by boxes above 112 pixels (none at this size).
    trainable = [
        (n, p)
        for n, p in objective.named_parameters()
        if p.requires_grad and not n.startswith("knet.neck.")
    ]
    zero = [n for n, p in trainable if p.grad is None or not torch.isfinite(p.grad).all()]
    zero += [n for n, p in trainable if p.grad is not None and p.grad.abs().sum() == 0]
    assert not zero, zero
    # The proposal boxes learn through stage 1's box losses, the dynamic convolutions' generators
    # through the RoI features they convolve.
    assert objective.knet.proposal_boxes.weight.grad.abs().sum() > 0
    assert objective.knet.heads[0].interaction.params.weight.grad.abs().sum() > 0
    assert objective.knet.mask_heads[1].interaction.params.weight.grad.abs().sum() > 0
    assert all(p.grad is None for p in backbone.parameters())


def test_dynamic_convolution_is_generated_by_each_query():
    """Each query's output depends on its own query and RoI features alone, with gradients to
    both and to the generator."""
    torch.manual_seed(0)
    conv = DynamicConv(8, 4, flatten_size=9)
    queries = torch.randn(3, 8, requires_grad=True)
    feats = torch.randn(3, 9, 8, requires_grad=True)
    out = conv(queries, feats)
    assert out.shape == (3, 8)
    out[1].sum().backward()
    assert queries.grad[1].abs().sum() > 0 and feats.grad[1].abs().sum() > 0
    assert queries.grad[[0, 2]].abs().sum() == 0 and feats.grad[[0, 2]].abs().sum() == 0
    assert conv.params.weight.grad.abs().sum() > 0
    other = queries.detach().clone()
    other[1] += 1.0
    assert not torch.allclose(conv(other, feats)[1], out[1])
    assert DynamicConv(8, 4)(queries, feats).shape == (3, 9, 8)  # the mask head keeps positions


def test_box_costs_on_a_hand_made_case():
    """cost = 2 focal - 2 GIoU + 5 L1 on boxes normalised by the input size, computed here by
    hand for two queries and two targets."""
    logits = torch.tensor([[[2.0], [-1.0]]])  # (B=1, N=2, C=1)
    boxes = torch.tensor([[[0.0, 0.0, 10.0, 10.0], [20.0, 20.0, 40.0, 30.0]]])
    targets = torch.tensor([[0.0, 0.0, 10.0, 10.0], [10.0, 0.0, 20.0, 10.0]])
    whwh = torch.tensor([40.0, 40.0, 40.0, 40.0])
    cost = box_costs(logits, boxes, torch.tensor([0, 0]), targets, whwh)

    def focal(x: float) -> float:
        p = 1 / (1 + math.exp(-x))
        pos = -math.log(p + 1e-8) * 0.25 * (1 - p) ** 2
        neg = -math.log(1 - p + 1e-8) * 0.75 * p**2
        return pos - neg

    # query 0 vs target 0: identical boxes, L1 0, GIoU 1.
    assert cost[0, 0, 0].item() == pytest.approx(2 * focal(2.0) - 2.0, abs=1e-5)
    # query 0 vs target 1: touching squares; IoU 0, enclosing box 20 x 10 holds both: GIoU 0;
    # L1 = (10 + 0 + 10 + 0) / 40.
    assert cost[0, 0, 1].item() == pytest.approx(2 * focal(2.0) + 5 * 0.5, abs=1e-5)
    # query 1 vs target 1: IoU 0, enclosing (10, 0, 40, 30) = 900, union 300: GIoU -2/3;
    # L1 = (10 + 20 + 20 + 20) / 40.
    expected = 2 * focal(-1.0) + 5 * 70 / 40 + 2 * (2 / 3)
    assert cost[0, 1, 1].item() == pytest.approx(expected, abs=1e-5)
    weights = dict(QUERYINST_WEIGHTS)
    assert (weights["cls"], weights["l1"], weights["giou"], weights["dice"]) == (2, 5, 2, 8)


def _perfect_stage(targets: list[dict[str, Tensor]], num: int) -> dict:
    """Stage outputs that predict every target exactly with query l (and background elsewhere)."""
    batch = len(targets)
    logits = torch.full((batch, num, 1), -30.0)
    boxes = torch.tensor([0.0, 0.0, 8.0, 8.0]).repeat(batch, num, 1)
    for b, t in enumerate(targets):
        logits[b, : len(t["boxes"]), 0] = 30.0
        boxes[b, : len(t["boxes"])] = t["boxes"]

    def roi_masks(rows: list[Tensor]) -> Tensor:
        crops = [mask_roi_targets(targets[b]["masks"][r], boxes[b, r]) for b, r in enumerate(rows)]
        return (torch.cat(crops) * 2 - 1) * 30.0  # +30 inside, -30 outside

    return {"logits": logits, "boxes": boxes, "roi_masks": roi_masks}


def test_a_perfect_prediction_has_near_minimal_losses():
    targets = make_targets(64, 4, (3, 2))
    criterion = QueryInstCriterion(1)
    outputs = {"stages": [_perfect_stage(targets, 6)]}
    losses, assignments = criterion(outputs, targets)
    assert set(losses) == {"loss_s1_cls", "loss_s1_l1", "loss_s1_giou", "loss_s1_dice"}
    assert all(v.item() < 1e-3 for v in losses.values()), losses
    for (rows, cols), t in zip(assignments[1], targets):  # query l found target l
        assert rows.tolist() == cols.tolist() == list(range(len(t["boxes"])))
    assert [len(r) for r, _ in assignments[0]] == [0, 0]  # the proposals: no loss, no pairs
    # Shifting the boxes raises the box losses, a wrong class the class loss.
    worse = _perfect_stage(targets, 6)
    worse["boxes"] = worse["boxes"] + 3.0
    shifted, _ = criterion({"stages": [worse]}, targets)
    assert shifted["loss_s1_l1"] > 0.05 and shifted["loss_s1_giou"] > 0.05
    labels = [t["labels"] for t in targets]
    flipped = -_perfect_stage(targets, 6)["logits"]
    assert class_loss(flipped, labels, assignments[1]) > 1.0


def test_roi_geometry():
    boxes = torch.tensor([[0.0, 0.0, 40.0, 40.0], [0.0, 0.0, 120.0, 120.0], [0, 0, 900, 900.0]])
    assert level_of(boxes, 4, 4.0).tolist() == [0, 1, 3]
    # Zero deltas keep a box; dx = 1 moves it by half its width (std 0.5); dw = log 2 doubles it.
    box = torch.tensor([[10.0, 20.0, 30.0, 60.0]])
    torch.testing.assert_close(decode_boxes(box, torch.zeros(1, 4)), box)
    moved = decode_boxes(box, torch.tensor([[1.0, 0.0, math.log(2.0), 0.0]]))
    torch.testing.assert_close(moved, torch.tensor([[10.0, 20.0, 50.0, 60.0]]))
    # A mask that fills its RoI is pasted as its box on the mask grid (stride 4), background
    # outside it.
    pasted = paste_masks(
        torch.full((1, 28, 28), 10.0), torch.tensor([[8.0, 16.0, 24.0, 32.0]]), (10, 10), 4.0
    )
    inside = torch.zeros(10, 10, dtype=torch.bool)
    inside[4:8, 2:6] = True
    assert torch.equal(pasted[0] > 0, inside)
    assert pasted[0][~inside].max() < -5


def test_class_layer_prefixes_are_exactly_the_class_dependent_tensors():
    torch.manual_seed(0)
    one = build_model(TINY_QI, FakeResNet(), 1).state_dict()
    many = build_model(TINY_QI, FakeResNet(), 5).state_dict()
    assert one.keys() == many.keys()
    differ = {k for k in one if one[k].shape != many[k].shape}
    prefixed = {k for k in one if k.startswith(QueryInst.CLASS_LAYER_PREFIXES)}
    expected = {f"class_heads.{i}.{p}" for i in (0, 1) for p in ("weight", "bias")}
    assert differ == prefixed == expected


def test_inject_rewrites_the_proposal_features_before_the_first_stage():
    torch.manual_seed(0)
    model = build_model(TINY_QI, FakeResNet(), 1).eval()
    images = torch.randn(1, 3, 64, 64)
    plain = model(images)
    injected = model(images, lambda queries, pyramid: queries + 5.0)
    torch.testing.assert_close(plain["init"]["kernels"][0], model.proposal_feats.weight)
    assert torch.equal(plain["init"]["kernels"], injected["init"]["kernels"])
    assert not torch.allclose(plain["stages"][0]["kernels"], injected["stages"][0]["kernels"])


def test_drop_loss_on_boxes():
    """An unmatched query whose box overlaps no target loses its background term; the criterion
    then reports the dropped share."""
    targets = make_targets(64, 4, (1,))
    stage = _perfect_stage(targets, 3)
    stage["logits"][0, 1:, 0] = 2.0  # two confident unmatched queries, far from the target
    stage["boxes"][0, 1:] = torch.tensor([56.0, 56.0, 64.0, 64.0])
    plain, _ = QueryInstCriterion(1)({"stages": [stage]}, targets)
    dropped, _ = QueryInstCriterion(1, drop_loss_iou=0.01)({"stages": [stage]}, targets)
    assert plain["loss_s1_cls"] > 1.0 and dropped["loss_s1_cls"] < 1e-3
    assert dropped["stat_dropped"].item() == pytest.approx(2 / 3)


def test_factory_builds_the_box_criterion():
    assert isinstance(build_criterion(TINY_QI, 2), QueryInstCriterion)
    cfg = dataclasses.replace(TINY_QI, kind="knet")
    assert not isinstance(build_criterion(cfg, 2), QueryInstCriterion)


def test_queryinst_keys_stay_out_of_other_kinds_comparisons():
    """Older runs (recorded before the keys existed) compare equal to new ones of any kind; the
    QueryInst sizes never make another kind's runs differ, and QueryInst's score form counts."""
    from trainer.config_compat import comparable

    def tree(kind: str, **model) -> dict:
        return {"model": {"kind": kind, "test_score": "auto", **model}}

    sizes = {"dii_stages": 3, "dynamic_dim": 32, "mask_convs": 2}
    assert comparable(tree("knet", **sizes)) == comparable(tree("knet"))
    assert comparable(tree("queryinst", **sizes)) != comparable(tree("queryinst"))
    published = {"dii_stages": 6, "dynamic_dim": 64, "mask_convs": 4}
    assert comparable(tree("queryinst", **published)) == comparable(tree("queryinst"))
    assert comparable(tree("queryinst", test_score="maskness")) != comparable(tree("queryinst"))
