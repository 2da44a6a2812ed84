"""K-Net and the Objective on two tiny fake backbones (ResNet-like and ViT-like)."""

from __future__ import annotations

import pytest
import torch
from torch import Tensor, nn

from trainer.config import ModelConfig
from trainer.model.kernel_head import mask_pool
from trainer.model.knet import KNet
from trainer.model.neck import FPNNeck
from trainer.model.objective import build_objective
from trainer.model.pyramid import SimpleFeaturePyramid


class FakeResNet(nn.Module):
    """Four levels at strides 4, 8, 16, 32 (like ResNet C2..C5), small channels, frozen."""

    name = "resnet50"
    embed_dim = 12
    saliency_stride = 32
    level_channels = (4, 6, 8, 12)
    level_strides = (4.0, 8.0, 16.0, 32.0)
    size_divisor = 32

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 4, 4, stride=4)
        self.stages = nn.ModuleList(
            nn.Conv2d(a, b, 2, stride=2) for a, b in [(4, 6), (6, 8), (8, 12)]
        )
        self.freeze()

    def freeze(self, frozen_stages: int = -1) -> None:
        for p in self.parameters():
            p.requires_grad_(False)

    def forward(self, x: Tensor) -> list[Tensor]:
        levels = [self.stem(x)]
        for stage in self.stages:
            levels.append(stage(levels[-1]))
        return levels

    def saliency_features(self, x: Tensor) -> Tensor:
        return self.forward(x)[-1]


class FakeViT(nn.Module):
    """One level at stride 14 (like a ViT/14's tokens), frozen."""

    name = "dinov2_vits14"
    embed_dim = 24
    saliency_stride = 14
    level_channels = (24,)
    level_strides = (14.0,)
    size_divisor = 14

    def __init__(self) -> None:
        super().__init__()
        self.patch = nn.Conv2d(3, 24, 14, stride=14)
        self.freeze()

    def freeze(self, frozen_stages: int = -1) -> None:
        for p in self.parameters():
            p.requires_grad_(False)

    def forward(self, x: Tensor) -> list[Tensor]:
        return [self.patch(x)]

    def saliency_features(self, x: Tensor) -> Tensor:
        return self.patch(x)


def tiny_cfg(**overrides) -> ModelConfig:
    base = dict(num_kernels=8, channels=16, num_stages=2, num_heads=8, ffn_dim=32)
    base.update(overrides)
    return ModelConfig(**base)


def make_targets(size: int, seed_dim: int, counts: tuple[int, ...] = (3, 1)) -> list[dict]:
    """Rectangular masks with their boxes, labels 0 and random seeds, one dict per image."""
    g = torch.Generator().manual_seed(0)
    targets = []
    for count in counts:
        masks = torch.zeros(count, size, size)
        boxes = torch.zeros(count, 4)
        for i in range(count):
            x0, y0 = torch.randint(0, size // 2, (2,), generator=g).tolist()
            x1, y1 = x0 + size // 4 + 4 * i, y0 + size // 3
            masks[i, y0:y1, x0:x1] = 1
            boxes[i] = torch.tensor([x0, y0, x1, y1], dtype=torch.float32)
        targets.append(
            {
                "masks": masks,
                "boxes": boxes,
                "labels": torch.zeros(count, dtype=torch.int64),
                "seeds": torch.randn(count, seed_dim, generator=g),
            }
        )
    return targets


@pytest.mark.parametrize(
    ("backbone_cls", "size", "strides", "divisor", "neck_cls", "scales"),
    [
        (FakeResNet, 64, (4.0, 8.0, 16.0, 32.0), 32, FPNNeck, None),
        (FakeViT, 56, (3.5, 7.0, 14.0, 28.0), 28, SimpleFeaturePyramid, None),
        # model.pyramid_scales: a coarser pyramid (strides 7..56) for a doubled input side
        (FakeViT, 112, (7.0, 14.0, 28.0, 56.0), 56, SimpleFeaturePyramid, [2, 1, 0.5, 0.25]),
    ],
)
def test_output_shapes(backbone_cls, size, strides, divisor, neck_cls, scales):
    torch.manual_seed(0)
    cfg = tiny_cfg()
    if scales is not None:
        cfg.pyramid_scales = scales
    knet = KNet(backbone_cls(), cfg, num_classes=3)
    assert isinstance(knet.neck, neck_cls)
    assert knet.strides == strides and knet.mask_stride == strides[0]
    assert knet.size_divisor == divisor
    out = knet(torch.randn(2, 3, size, size))
    h = int(size / knet.mask_stride)
    assert out["init"]["masks"].shape == (2, 8, h, h)
    assert out["init"]["semantic"].shape == (2, 3, h, h)
    assert out["init"]["kernels"].shape == (2, 8, 16)
    assert len(out["stages"]) == cfg.num_stages
    for stage in out["stages"]:
        assert stage["masks"].shape == (2, 8, h, h)
        assert stage["logits"].shape == (2, 8, 3)
        assert stage["kernels"].shape == (2, 8, 16)
    assert [tuple(p.shape[-2:]) for p in out["pyramid"]] == [
        (int(size / s), int(size / s)) for s in strides
    ]


def test_rejects_unpadded_input():
    knet = KNet(FakeViT(), tiny_cfg(), 1)
    with pytest.raises(ValueError, match="size_divisor 28"):
        knet(torch.randn(1, 3, 42, 42))  # a multiple of 14 but not of 28


def test_class_layer_prefixes_are_exactly_the_class_dependent_tensors():
    torch.manual_seed(0)
    one = KNet(FakeResNet(), tiny_cfg(), 1).state_dict()
    many = KNet(FakeResNet(), tiny_cfg(), 5).state_dict()
    assert one.keys() == many.keys()
    differ = {k for k in one if one[k].shape != many[k].shape}
    prefixed = {k for k in one if k.startswith(KNet.CLASS_LAYER_PREFIXES)}
    assert differ == prefixed
    assert len(prefixed) == 2 + 2 * tiny_cfg().num_stages  # semantic conv + class heads (w, b)


def test_mask_pool_mean_and_sum():
    masks = torch.full((1, 2, 2, 2), -10.0)
    masks[0, 0, 0, :] = 10.0  # kernel 0 covers the top row; kernel 1 nothing
    feats = torch.arange(8, dtype=torch.float32).reshape(1, 2, 2, 2)
    summed = mask_pool(masks, feats, 0.5, "sum")
    mean = mask_pool(masks, feats, 0.5, "mean")
    assert torch.allclose(summed[0, 0], torch.tensor([0.0 + 1.0, 4.0 + 5.0]))
    assert torch.allclose(mean[0, 0], torch.tensor([0.5, 4.5]))
    assert torch.equal(mean[0, 1], torch.zeros(2))  # an empty mask pools to zero


def test_inject_feeds_the_update_stages_only():
    torch.manual_seed(0)
    knet = KNet(FakeResNet(), tiny_cfg(), 1).eval()
    images = torch.randn(1, 3, 64, 64)
    seen = {}

    def inject(kernels: Tensor, pyramid: list[Tensor]) -> Tensor:
        seen["levels"] = len(pyramid)
        return kernels + 5.0

    plain, injected = knet(images), knet(images, inject)
    assert seen["levels"] == 4
    assert torch.equal(plain["init"]["kernels"], injected["init"]["kernels"])
    assert torch.equal(plain["init"]["masks"], injected["init"]["masks"])
    assert not torch.allclose(plain["stages"][0]["kernels"], injected["stages"][0]["kernels"])


@pytest.mark.parametrize(("backbone_cls", "size"), [(FakeResNet, 64), (FakeViT, 56)])
def test_every_trainable_parameter_gets_a_finite_gradient(backbone_cls, size):
    torch.manual_seed(0)
    backbone = backbone_cls()
    objective = build_objective(
        backbone, tiny_cfg(), 1, prompts=True, kernel_supervision=True, prompt_keep=0.9
    )
    targets = make_targets(size, backbone.embed_dim, counts=(3, 2))
    out = objective(torch.randn(2, 3, size, size), targets)
    losses = {k: v for k, v in out.items() if k.startswith("loss_")}
    assert all(torch.isfinite(v) and v.dim() == 0 for v in losses.values())
    sum(losses.values()).backward()
    trainable = [(n, p) for n, p in objective.named_parameters() if p.requires_grad]
    assert any(n.startswith("kernel_supervision.") for n, _ in trainable)
    missing = [n for n, p in trainable if p.grad is None]
    assert not missing, missing
    bad = [n for n, p in trainable if not torch.isfinite(p.grad).all()]
    assert not bad, bad
    zero = [n for n, p in trainable if p.grad.abs().sum() == 0]
    assert not zero, zero
    assert all(p.grad is None for p in backbone.parameters())


def test_empty_batch_keeps_graph():
    torch.manual_seed(0)
    backbone = FakeResNet()
    objective = build_objective(backbone, tiny_cfg(), 1, prompts=True, kernel_supervision=True)
    targets = make_targets(64, backbone.embed_dim, counts=(0, 0))
    out = objective(torch.randn(2, 3, 64, 64), targets)
    assert out["loss_s1_mask"].item() == 0.0 and out["loss_s1_kernel"].item() == 0.0
    assert "stat_prompt_cos" not in out  # no image had prompts
    sum(v for k, v in out.items() if k.startswith("loss_")).backward()
    grads = [p.grad for p in objective.parameters() if p.requires_grad]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)


def test_switches_remove_their_losses_and_stats():
    torch.manual_seed(0)
    backbone = FakeResNet()
    targets = make_targets(64, backbone.embed_dim)
    images = torch.randn(2, 3, 64, 64)
    on = build_objective(backbone, tiny_cfg(), 1, prompts=True, kernel_supervision=True)(
        images, targets
    )
    off = build_objective(backbone, tiny_cfg(), 1, prompts=False, kernel_supervision=False)
    assert off.prompt_matching is None and off.kernel_supervision is None
    off_out = off(images, [{k: v for k, v in t.items() if k != "seeds"} for t in targets])
    kernel_keys = {f"loss_s{i}_kernel" for i in (1, 2)}
    prompt_keys = {"stat_prompt_cos", "stat_prompt_drop", "stat_prompt_distinct"}
    assert kernel_keys | prompt_keys | {"stat_target_spread"} <= on.keys()
    assert not (kernel_keys | prompt_keys | {"stat_target_spread"}) & off_out.keys()
    assert {k for k in on if k.startswith("loss_")} - kernel_keys == {
        k for k in off_out if k.startswith("loss_")
    }
    only_prompts = build_objective(backbone, tiny_cfg(), 1, prompts=True, kernel_supervision=False)
    keys = only_prompts(images, targets).keys()
    assert prompt_keys <= keys and not kernel_keys & keys


def test_prompts_change_the_update_stages():
    """With keep = 1 every kernel gets a prompt, so the update stages see a different K^0."""
    torch.manual_seed(0)
    backbone = FakeResNet()
    objective = build_objective(
        backbone, tiny_cfg(), 1, prompts=True, kernel_supervision=False, prompt_keep=1.0
    ).eval()
    targets = make_targets(64, backbone.embed_dim)
    images = torch.randn(2, 3, 64, 64)
    plain = objective.knet(images)
    out = objective(images, targets)
    assert float(out["stat_prompt_drop"]) == 0.0
    boxes = [t["boxes"] for t in targets]
    prompted = objective.knet(
        images,
        lambda k, pyr: objective.prompt_matching(k, pyr[-1], boxes, objective.knet.strides[-1])[0],
    )
    assert torch.equal(plain["init"]["masks"], prompted["init"]["masks"])
    assert not torch.allclose(plain["stages"][0]["masks"], prompted["stages"][0]["masks"])


def test_real_backbone_smoke():
    """B's DINOv2 ViT-S/14 with random weights at 56x56 through the whole objective."""
    backbones = pytest.importorskip("pipeline.backbones.build")
    from pipeline.config import BackboneConfig

    torch.manual_seed(0)
    backbone = backbones.build_backbone(BackboneConfig(kind="dinov2_vits14", weights="random"))
    objective = build_objective(backbone, tiny_cfg(), 1, prompts=True, kernel_supervision=True)
    assert objective.knet.size_divisor == 28 and objective.knet.mask_stride == 3.5
    out = objective(torch.randn(1, 3, 56, 56), make_targets(56, backbone.embed_dim, (2,)))
    assert out["loss_s2_dice"].isfinite()
    sum(v for k, v in out.items() if k.startswith("loss_")).backward()
    assert all(p.grad is None for p in backbone.parameters())
    assert objective.knet.stages[0].updator.feature_layer.weight.grad is not None
