"""ONNX export with the backbone: onnxruntime matches PyTorch on two images of different shapes,
for K-Net (dynamic input size), Mask2Former and QueryInst (a fixed padded size where the tracer
froze a shape-dependent value, see trainer/inference/export.py)."""

from __future__ import annotations

import pytest
import torch

from pipeline.backbones.build import build_backbone
from pipeline.config import BackboneConfig
from tests.trainer.test_queryinst import TINY_QI
from trainer.config import ModelConfig
from trainer.inference.export import TOLERANCE, export_checked, synthetic_images
from trainer.inference.predictor import Predictor, Settings
from trainer.model.factory import build_model

# Stated tolerance of the check (max absolute difference of scores and mask logits).
assert TOLERANCE == 1e-3

MODELS = {
    "knet": ModelConfig(num_kernels=6, channels=16, num_stages=2, num_heads=2, ffn_dim=32),
    "mask2former": ModelConfig(
        kind="mask2former",
        num_kernels=6,
        channels=16,
        num_heads=2,
        ffn_dim=32,
        decoder_layers=2,
        encoder_layers=1,
        encoder_ffn_dim=32,
        num_points=64,
    ),
    "queryinst": TINY_QI,
}


@pytest.mark.parametrize("kind", sorted(MODELS))
def test_exported_model_matches_pytorch_on_two_images(kind, tmp_path):
    torch.manual_seed(0)
    backbone = build_backbone(BackboneConfig(kind="resnet50", weights="random"))
    model = build_model(MODELS[kind], backbone, num_classes=2).eval()
    predictor = Predictor(model, [(1, "a"), (2, "b")], Settings(short_side=64, max_side=96))
    images = synthetic_images()
    rows, note = export_checked(predictor, tmp_path / "model.onnx", images, TOLERANCE)
    assert len(rows) == 2 and rows[0]["shape"] != rows[1]["shape"] or "fixed" in note
    for row in rows:
        assert row["scores"] <= TOLERANCE and row["masks"] <= TOLERANCE, row
    assert (tmp_path / "model.onnx").stat().st_size > 1_000_000  # the backbone is inside
    if kind == "knet":
        assert "dynamic" in note
