"""K-Net (Zhang et al., NeurIPS 2021), instance variant "s3", in plain PyTorch.

backbone -> neck (FPN or simple feature pyramid) -> kernel head (initial masks, K^0, semantic
logits) -> ``num_stages`` kernel-update stages (K^i, class logits, masks M^i). All masks live on the
mask grid, (H / mask_stride, W / mask_stride), mask_stride being the pyramid's finest stride
(4 for ResNet, 3.5 for a /14 ViT).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from torch import Tensor, nn

from trainer.config import ModelConfig
from trainer.data.frozen_features import BackboneLevels
from trainer.model.kernel_head import KernelHead, prior_bias
from trainer.model.kernel_update import KernelUpdateStage
from trainer.model.levels import backbone_levels, padding_divisor
from trainer.model.neck import build_neck

if TYPE_CHECKING:
    from pipeline.backbones.backbone import Backbone

# inject(K^0 (B, N, D), pyramid levels P2..P5) -> K^0' (B, N, D); applied before the update stages.
Inject = Callable[[Tensor, list[Tensor]], Tensor]


class KNet(nn.Module):
    """K-Net over a (frozen or partly frozen) backbone.

    Attributes: backbone; neck; kernel_head; stages (update stages); class_heads (one Linear D -> C
    per stage); strides (pyramid strides, finest first); mask_stride; size_divisor (inputs must be
    padded to a multiple of it: lcm of the backbone's divisor and the coarsest stride, 32 ResNet,
    28 ViT); num_classes; num_kernels.
    """

    # Parameter-name prefixes (relative to this module's state dict) of the layers whose shape
    # depends on num_classes: the semantic conv and the per-stage class heads. Fine-tuning with a
    # different class count skips exactly these when loading a pre-trained K-Net.
    CLASS_LAYER_PREFIXES: tuple[str, ...] = ("kernel_head.semantic_conv.", "class_heads.")

    def __init__(self, backbone: Backbone, cfg: ModelConfig, num_classes: int) -> None:
        super().__init__()
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        self.backbone = backbone
        self.num_classes = num_classes
        self.num_kernels = cfg.num_kernels
        self.neck = build_neck(
            tuple(backbone.level_channels),
            tuple(backbone.level_strides),
            cfg.channels,
            tuple(cfg.pyramid_scales),
        )
        self.strides: tuple[float, ...] = tuple(self.neck.strides)
        self.mask_stride: float = self.strides[0]
        self.size_divisor: int = padding_divisor(backbone, self.strides)
        self.kernel_head = KernelHead(
            cfg.channels,
            cfg.num_kernels,
            num_classes,
            num_levels=len(self.strides),
            mask_threshold=cfg.mask_threshold,
            pooling=cfg.kernel_pooling,
        )
        self.stages = nn.ModuleList(
            KernelUpdateStage(
                cfg.channels, cfg.num_heads, cfg.ffn_dim, cfg.mask_threshold, cfg.kernel_pooling
            )
            for _ in range(cfg.num_stages)
        )
        self.class_heads = nn.ModuleList(
            nn.Linear(cfg.channels, num_classes) for _ in range(cfg.num_stages)
        )
        for head in self.class_heads:
            nn.init.xavier_uniform_(head.weight)
            nn.init.constant_(head.bias, prior_bias(0.01))  # focal-loss prior

    def forward(
        self, images: Tensor | BackboneLevels, inject: Inject | None = None
    ) -> dict[str, Any]:
        """images: (B, 3, H, W), ImageNet-normalised, H and W multiples of ``size_divisor``; or
        the frozen backbone's levels of such a batch (``trainer.data.frozen_features``: from the
        feature cache), in which case the backbone is not run.

        Returns, with h = H / mask_stride, w = W / mask_stride:
          "init": {"masks": (B, N, h, w) logits, "semantic": (B, C, h, w) logits,
                   "kernels": (B, N, D) K^0 as the kernel head made it (before ``inject``)},
          "stages": [{"masks": (B, N, h, w), "logits": (B, N, C), "kernels": (B, N, D) K^i}] x S,
          "pyramid": [P2..P5] (B, D, H / s_i, W / s_i).
        """
        height, width = images.shape[-2:]
        if height % self.size_divisor or width % self.size_divisor:
            raise ValueError(
                f"input {height}x{width} is not a multiple of size_divisor {self.size_divisor}"
            )
        levels, _ = backbone_levels(self.backbone, images)
        pyramid = self.neck(levels)
        head = self.kernel_head(pyramid)
        kernels, masks = head["kernels"], head["masks"]
        if inject is not None:
            kernels = inject(kernels, pyramid)
        stages = []
        for stage, class_head in zip(self.stages, self.class_heads):
            kernels, logits, masks = stage(head["features"], kernels, masks, class_head)
            stages.append({"masks": masks, "logits": logits, "kernels": kernels})
        return {
            "init": {
                "masks": head["masks"],
                "semantic": head["semantic"],
                "kernels": head["kernels"],
            },
            "stages": stages,
            "pyramid": pyramid,
        }
