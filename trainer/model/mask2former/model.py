"""Mask2Former (Cheng et al., CVPR 2022) for instance segmentation, in plain PyTorch.

backbone -> (ViT only: the simple feature pyramid) -> pixel decoder (mask features at the finest
stride, three scales, the pyramid) -> masked-attention transformer decoder (initial prediction +
one per layer). A ResNet's C2..C5 go into the pixel decoder as they are (it has its own input
projections, as published); a ViT's single level first becomes four through the ViTDet simple
feature pyramid (strides 3.5..28), as for K-Net.

Output contract (docs/architecture.md; as K-Net's): "init" and "stages" hold "masks" (B, N, h, w)
logits on the mask grid (stride ``mask_stride``), "logits" (B, N, C + 1) with a last no-object
column, and "kernels" (B, N, D) query embeddings; "pyramid" holds P2..P5 (the pixel decoder's
four outputs, finest first), whose coarsest level the prompts pool from.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from torch import Tensor, nn

from trainer.config import ModelConfig
from trainer.model.levels import backbone_levels, padding_divisor
from trainer.model.mask2former.pixel_decoder import DeformablePixelDecoder, FPNPixelDecoder
from trainer.model.mask2former.transformer_decoder import MaskedTransformerDecoder
from trainer.model.pyramid import SimpleFeaturePyramid

if TYPE_CHECKING:
    from collections.abc import Callable

    from pipeline.backbones.backbone import Backbone


def build_pixel_decoder(
    cfg: ModelConfig, level_channels: tuple[int, ...]
) -> DeformablePixelDecoder | FPNPixelDecoder:
    """``model.pixel_decoder``: "deformable" (published) or "fpn"; mask features D wide."""
    if cfg.pixel_decoder == "fpn":
        return FPNPixelDecoder(level_channels, cfg.channels, cfg.channels)
    if cfg.pixel_decoder == "deformable":
        return DeformablePixelDecoder(
            level_channels,
            cfg.channels,
            cfg.channels,
            layers=cfg.encoder_layers,
            heads=cfg.num_heads,
            points=cfg.encoder_points,
            ffn_dim=cfg.encoder_ffn_dim,
        )
    raise ValueError(f"unknown pixel decoder '{cfg.pixel_decoder}' (expected deformable or fpn)")


class Mask2Former(nn.Module):
    """Mask2Former over a (frozen or partly frozen) backbone.

    Attributes (as K-Net's): backbone; neck (the ViT's simple feature pyramid, None for a
    four-level backbone); pixel_decoder; decoder; strides (finest first); mask_stride;
    size_divisor; num_classes; num_kernels (queries).
    """

    # The class layer (shared by every decoder layer): C + 1 outputs, skipped by name when
    # fine-tuning changes the class count.
    CLASS_LAYER_PREFIXES: tuple[str, ...] = ("decoder.class_embed.",)

    def __init__(self, backbone: Backbone, cfg: ModelConfig, num_classes: int) -> None:
        super().__init__()
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        self.backbone = backbone
        self.num_classes = num_classes
        self.num_kernels = cfg.num_kernels
        channels, strides = tuple(backbone.level_channels), tuple(backbone.level_strides)
        self.neck: SimpleFeaturePyramid | None = None
        if len(channels) == 1:
            self.neck = SimpleFeaturePyramid(
                channels[0], strides[0], cfg.channels, tuple(cfg.pyramid_scales)
            )
            channels, strides = (cfg.channels,) * 4, self.neck.strides
        if len(channels) != 4:
            raise ValueError(f"Mask2Former expects 4 backbone levels or 1 (ViT), got {channels}")
        self.strides: tuple[float, ...] = tuple(float(s) for s in strides)
        self.mask_stride: float = self.strides[0]
        self.size_divisor: int = padding_divisor(backbone, self.strides)
        self.pixel_decoder = build_pixel_decoder(cfg, channels)
        self.decoder = MaskedTransformerDecoder(
            cfg.channels,
            cfg.num_kernels,
            num_classes,
            heads=cfg.num_heads,
            ffn_dim=cfg.ffn_dim,
            layers=cfg.decoder_layers,
            mask_dim=cfg.channels,
        )

    def forward(
        self, images: Any, inject: Callable[[Tensor, list[Tensor]], Tensor] | None = None
    ) -> dict[str, Any]:
        """images: (B, 3, H, W) ImageNet-normalised (or cached backbone levels), H and W
        multiples of ``size_divisor``; inject(query features (B, N, D), pyramid) -> (B, N, D),
        applied before the first decoder layer. Returns the contract in the module docstring,
        one "stages" entry per decoder layer."""
        levels, (height, width) = backbone_levels(self.backbone, images)
        if height % self.size_divisor or width % self.size_divisor:
            raise ValueError(
                f"input {height}x{width} is not a multiple of size_divisor {self.size_divisor}"
            )
        if self.neck is not None:
            levels = self.neck(levels)
        mask_features, scales, pyramid = self.pixel_decoder(levels)
        hook = None
        if inject is not None:

            def hook(queries: Tensor) -> Tensor:
                return inject(queries, pyramid)

        init, stages = self.decoder(mask_features, scales, hook)
        return {"init": init, "stages": stages, "pyramid": pyramid}

    def class_probabilities(self, stage: dict[str, Tensor]) -> Tensor:
        """(B, N, C) class probabilities of a prediction, as Mask2Former's instance inference reads
        them: the softmax without the no-object column. The detection score multiplies them by
        the mask score (trainer/model/scoring.py, ``model.test_score`` "auto" = "maskness")."""
        return stage["logits"].float().softmax(-1)[..., :-1]
