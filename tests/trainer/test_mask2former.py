"""Mask2Former: output contract, gradients, masked attention, deformable sampling, class layers."""

from __future__ import annotations

import dataclasses
from types import SimpleNamespace

import pytest
import torch
from torch import Tensor

from tests.trainer.test_model import FakeResNet, FakeViT, make_targets
from trainer.config import ModelConfig
from trainer.model.factory import build_model
from trainer.model.mask2former.deformable_attention import deformable_sample
from trainer.model.mask2former.masked_attention import CrossAttentionLayer, attention_mask
from trainer.model.mask2former.model import Mask2Former
from trainer.model.mask2former.pixel_decoder import DeformablePixelDecoder, FPNPixelDecoder
from trainer.model.objective import build_objective
from trainer.model.scoring import detection_scores

# A Mask2Former small enough for CPU tests: 6 queries of width 16, 4 decoder layers (so the
# layers wrap around the three scales), one deformable encoder layer, 64 points.
TINY_M2F = ModelConfig(
    kind="mask2former",
    num_kernels=6,
    channels=16,
    num_heads=2,
    ffn_dim=32,
    decoder_layers=4,
    encoder_layers=1,
    encoder_ffn_dim=32,
    num_points=64,
)


@pytest.mark.parametrize(
    ("backbone_cls", "size", "strides", "pixel_decoder"),
    [
        (FakeResNet, 64, (4.0, 8.0, 16.0, 32.0), "deformable"),
        (FakeViT, 56, (3.5, 7.0, 14.0, 28.0), "deformable"),
        (FakeResNet, 64, (4.0, 8.0, 16.0, 32.0), "fpn"),
    ],
)
def test_output_contract(backbone_cls, size, strides, pixel_decoder):
    torch.manual_seed(0)
    cfg = dataclasses.replace(TINY_M2F, pixel_decoder=pixel_decoder)
    model = build_model(cfg, backbone_cls(), num_classes=3)
    assert isinstance(model, Mask2Former)
    decoder_cls = DeformablePixelDecoder if pixel_decoder == "deformable" else FPNPixelDecoder
    assert isinstance(model.pixel_decoder, decoder_cls)
    assert model.strides == strides and model.mask_stride == strides[0]
    out = model(torch.randn(2, 3, size, size))
    h = int(size / model.mask_stride)
    assert set(out) == {"init", "stages", "pyramid"}
    assert len(out["stages"]) == cfg.decoder_layers
    for pred in [out["init"], *out["stages"]]:
        assert set(pred) == {"masks", "logits", "kernels"}
        assert pred["masks"].shape == (2, 6, h, h)
        assert pred["logits"].shape == (2, 6, 4)  # 3 classes + no-object
        assert pred["kernels"].shape == (2, 6, 16)
    assert [tuple(p.shape[1:]) for p in out["pyramid"]] == [
        (16, int(size / s), int(size / s)) for s in strides
    ]
    scores = detection_scores(model, out["stages"][-1])
    assert scores.shape == (2, 6, 3) and bool(((scores >= 0) & (scores <= 1)).all())


def test_rejects_unpadded_input():
    model = build_model(TINY_M2F, FakeViT(), 1)
    assert model.size_divisor == 28
    with pytest.raises(ValueError, match="size_divisor 28"):
        model(torch.randn(1, 3, 42, 42))


@pytest.mark.parametrize(("backbone_cls", "size"), [(FakeResNet, 64), (FakeViT, 56)])
def test_every_trainable_parameter_gets_a_finite_gradient(backbone_cls, size):
    torch.manual_seed(0)
    backbone = backbone_cls()
    objective = build_objective(
        backbone, TINY_M2F, 1, prompts=True, kernel_supervision=True, prompt_keep=0.95
    )
    # Deformable DETR zero-initialises the offset and attention-weight projections, so at
    # initialisation no gradient reaches the encoder's positions; perturb them to check the path.
    for layer in objective.knet.pixel_decoder.encoder:
        for linear in (layer.attention.sampling_offsets, layer.attention.attention_weights):
            torch.nn.init.normal_(linear.weight, std=0.1)
    out = objective(torch.randn(2, 3, size, size), make_targets(size, backbone.embed_dim, (3, 2)))
    losses = {k: v for k, v in out.items() if k.startswith("loss_")}
    layers = TINY_M2F.decoder_layers
    expected = {f"loss_init_{t}" for t in ("cls", "mask", "dice")}
    expected |= {f"loss_s{i}_{t}" for i in range(1, layers + 1) for t in ("cls", "mask", "dice")}
    expected |= {f"loss_s{i}_kernel" for i in range(1, layers + 1)}  # query supervision
    assert set(losses) == expected
    assert all(torch.isfinite(v) and v.dim() == 0 for v in losses.values())
    sum(losses.values()).backward()
    trainable = [(n, p) for n, p in objective.named_parameters() if p.requires_grad]
    missing = [n for n, p in trainable if p.grad is None]
    assert not missing, missing
    zero = [n for n, p in trainable if not torch.isfinite(p.grad).all() or p.grad.abs().sum() == 0]
    assert not zero, zero
    assert all(p.grad is None for p in backbone.parameters())


def test_attention_mask_rules():
    logits = torch.full((1, 3, 4, 4), -5.0)
    logits[0, 1, :2, :2] = 5.0  # query 1: the top-left quarter; query 0 and 2: empty
    logits[0, 2, 0, 0] = 0.0  # sigmoid 0.5 exactly: inside
    blocked = attention_mask(logits, (4, 4), heads=2)
    assert blocked.shape == (2, 3, 16) and torch.equal(blocked[0], blocked[1])
    assert not blocked[0, 0].any()  # empty mask: attends everywhere
    inside = torch.zeros(4, 4, dtype=torch.bool)
    inside[:2, :2] = True
    assert torch.equal(~blocked[0, 1], inside.flatten())
    assert (~blocked[0, 2]).sum() == 1 and not blocked[0, 2, 0]


def test_masked_cross_attention_sees_only_its_mask():
    """Changing the features outside query 1's mask leaves it unchanged; query 0, whose mask
    is empty, sees every position, so it changes."""
    torch.manual_seed(0)
    layer = CrossAttentionLayer(8, heads=2).eval()
    queries, query_pos = torch.randn(1, 2, 8), torch.randn(1, 2, 8)
    memory, pos = torch.randn(1, 16, 8), torch.randn(1, 16, 8)
    logits = torch.full((1, 2, 4, 4), -5.0)
    logits[0, 1, 1:3, 1:3] = 5.0
    blocked = attention_mask(logits, (4, 4), heads=2)
    before = layer(queries, query_pos, memory, pos, blocked)
    outside = blocked[0, 1]  # positions query 1 may not see
    changed = memory.clone()
    changed[0, outside] += 3.0
    after = layer(queries, query_pos, changed, pos, blocked)
    torch.testing.assert_close(after[0, 1], before[0, 1], rtol=0, atol=1e-6)
    assert not torch.allclose(after[0, 0], before[0, 0], atol=1e-3)
    inside = memory.clone()
    inside[0, ~outside] += 3.0
    assert not torch.allclose(layer(queries, query_pos, inside, pos, blocked)[0, 1], before[0, 1])


def _bilinear(value: Tensor, x: float, y: float) -> Tensor:
    """value: (D, h, w); (x, y) in [0, 1] of the map, cell centres at (i + 0.5) / size, zero
    outside: the direct formula."""
    _, h, w = value.shape
    px, py = x * w - 0.5, y * h - 0.5
    x0, y0 = int(torch.floor(torch.tensor(px))), int(torch.floor(torch.tensor(py)))
    out = torch.zeros(value.shape[0])
    for xi, wx in ((x0, 1 - (px - x0)), (x0 + 1, px - x0)):
        for yi, wy in ((y0, 1 - (py - y0)), (y0 + 1, py - y0)):
            if 0 <= xi < w and 0 <= yi < h:
                out += wx * wy * value[:, yi, xi]
    return out


def test_deformable_sampling_matches_direct_bilinear():
    torch.manual_seed(0)
    shapes = [(3, 4), (2, 2)]
    batch, heads, dim, queries, points = 1, 2, 3, 2, 2
    value = torch.randn(batch, sum(h * w for h, w in shapes), heads, dim)
    # Some points fall outside the maps (< 0 or > 1) and read zeros there.
    locations = torch.rand(batch, queries, heads, len(shapes), points, 2) * 1.4 - 0.2
    weights = torch.rand(batch, queries, heads, len(shapes), points)
    out = deformable_sample(value, shapes, locations, weights)
    assert out.shape == (batch, queries, heads * dim)
    per_level = value.split([h * w for h, w in shapes], dim=1)
    for q in range(queries):
        for m in range(heads):
            expected = torch.zeros(dim)
            for lvl, (h, w) in enumerate(shapes):
                v = per_level[lvl][0, :, m].T.reshape(dim, h, w)
                for p in range(points):
                    x, y = locations[0, q, m, lvl, p].tolist()
                    expected += weights[0, q, m, lvl, p] * _bilinear(v, x, y)
            torch.testing.assert_close(out[0, q, m * dim : (m + 1) * dim], expected)


def test_class_layer_prefixes_are_exactly_the_class_dependent_tensors():
    torch.manual_seed(0)
    one = build_model(TINY_M2F, FakeResNet(), 1).state_dict()
    many = build_model(TINY_M2F, FakeResNet(), 5).state_dict()
    assert one.keys() == many.keys()
    differ = {k for k in one if one[k].shape != many[k].shape}
    prefixed = {k for k in one if k.startswith(Mask2Former.CLASS_LAYER_PREFIXES)}
    assert differ == prefixed == {"decoder.class_embed.weight", "decoder.class_embed.bias"}


def test_inject_rewrites_the_queries_before_the_first_layer():
    torch.manual_seed(0)
    model = build_model(TINY_M2F, FakeResNet(), 1).eval()
    images = torch.randn(1, 3, 64, 64)
    seen = {}

    def inject(queries: Tensor, pyramid: list[Tensor]) -> Tensor:
        seen["levels"] = len(pyramid)
        return queries + 5.0

    plain, injected = model(images), model(images, inject)
    assert seen["levels"] == 4
    for key in ("masks", "logits", "kernels"):  # the initial prediction is made before
        assert torch.equal(plain["init"][key], injected["init"][key])
    torch.testing.assert_close(
        plain["init"]["kernels"][0], model.decoder.query_feat.weight, rtol=0, atol=0
    )
    assert not torch.allclose(plain["stages"][0]["kernels"], injected["stages"][0]["kernels"])


def test_detection_scores_multiply_class_and_mask_scores():
    model = build_model(TINY_M2F, FakeResNet(), 2)
    logits = torch.log(torch.tensor([[[0.6, 0.3, 0.1]]]))  # 2 classes + no-object
    masks = torch.full((1, 1, 2, 2), -20.0)
    masks[0, 0, 0, :] = torch.logit(torch.tensor(0.8))  # two cells at 0.8, two at ~0
    scores = detection_scores(model, {"logits": logits, "masks": masks})
    torch.testing.assert_close(scores[0, 0], torch.tensor([0.6 * 0.8, 0.3 * 0.8]))


def test_ablation_switches_remove_their_losses_and_stats():
    torch.manual_seed(0)
    backbone = FakeResNet()
    images, targets = torch.randn(2, 3, 64, 64), make_targets(64, backbone.embed_dim)
    kernel_keys = {f"loss_s{i}_kernel" for i in range(1, TINY_M2F.decoder_layers + 1)}
    for prompts, supervision in ((True, False), (False, True), (False, False)):
        objective = build_objective(
            backbone, TINY_M2F, 1, prompts=prompts, kernel_supervision=supervision
        )
        keys = objective(images, targets).keys()
        assert ("stat_prompt_cos" in keys) == prompts
        assert (kernel_keys <= keys) == supervision
        assert supervision or not kernel_keys & keys


def test_cached_backbone_levels_give_the_same_outputs():
    """Handed the frozen backbone's levels (the feature cache's batch), the model skips its
    backbone and computes exactly what it computes from the images."""
    torch.manual_seed(0)
    model = build_model(TINY_M2F, FakeResNet(), 1).eval()
    images = torch.randn(1, 3, 64, 64)
    cached = SimpleNamespace(levels=model.backbone(images), input_size=(64, 64))
    with torch.no_grad():
        a, b = model(images), model(cached)
    torch.testing.assert_close(a["stages"][-1]["masks"], b["stages"][-1]["masks"], rtol=0, atol=0)
