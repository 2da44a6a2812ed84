"""QueryInst (Fang et al., ICCV 2021) for instance segmentation, in plain PyTorch.

backbone -> neck (FPN, or the ViT's simple feature pyramid, as K-Net's) -> N learnable proposal
boxes (cx, cy, w, h relative to the padded input, initialised to the whole image) and N learnable
proposal features (the queries) -> ``dii_stages`` stages (trainer/model/queryinst/stage.py), each
refining every query and its box and predicting its class logits and its mask. A stage reads its
RoI features at the previous stage's boxes (detached after the first stage, whose boxes are the
proposals themselves, so the proposal boxes learn from stage 1's box losses).

Output contract (docs/architecture.md): "init" holds the proposals: "kernels" (B, N, D) the
proposal features before ``inject`` and "boxes" (B, N, 4); each of "stages" holds "logits"
(B, N, C) sigmoid class logits, "kernels" (B, N, D) the stage's queries, "boxes" (B, N, 4)
x0, y0, x1, y1 input pixels, "roi_masks" (rows) -> (M, 28, 28) mask logits of the chosen queries
(rows: B index tensors) inside their (detached) boxes, which the criterion calls for the matched
queries alone (the published training computes masks for the positives only); and, in eval mode,
"masks" (B, N, h, w) every query's mask pasted onto the mask grid (stride ``mask_stride``).
"pyramid" holds the neck's four levels, finest first.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from trainer.config import ModelConfig
from trainer.model.kernel_head import prior_bias
from trainer.model.levels import backbone_levels, padding_divisor
from trainer.model.neck import build_neck
from trainer.model.queryinst.roi import decode_boxes, paste_masks, pyramid_roi_align
from trainer.model.queryinst.stage import BOX_ROI, MASK_ROI, DynamicMaskHead, InteractionHead

if TYPE_CHECKING:
    from pipeline.backbones.backbone import Backbone


class QueryInst(nn.Module):
    """QueryInst over a (frozen or partly frozen) backbone.

    Attributes (as K-Net's): backbone; neck; proposal_boxes, proposal_feats (nn.Embedding N x 4,
    N x D); heads (interaction heads); mask_heads; class_heads (Linear D -> C per stage);
    strides; mask_stride; size_divisor; num_classes; num_kernels (queries).
    """

    # The per-stage class layers: skipped by name when fine-tuning changes the class count.
    CLASS_LAYER_PREFIXES: tuple[str, ...] = ("class_heads.",)

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
        self.strides: tuple[float, ...] = tuple(float(s) for s in self.neck.strides)
        self.mask_stride: float = self.strides[0]
        self.size_divisor: int = padding_divisor(backbone, self.strides)
        self.proposal_boxes = nn.Embedding(cfg.num_kernels, 4)
        nn.init.constant_(self.proposal_boxes.weight[:, :2], 0.5)  # centred, whole image
        nn.init.constant_(self.proposal_boxes.weight[:, 2:], 1.0)
        self.proposal_feats = nn.Embedding(cfg.num_kernels, cfg.channels)
        stages = range(cfg.dii_stages)
        d = cfg.channels
        self.heads = nn.ModuleList(
            InteractionHead(d, cfg.num_heads, cfg.ffn_dim, cfg.dynamic_dim) for _ in stages
        )
        self.mask_heads = nn.ModuleList(
            DynamicMaskHead(d, cfg.dynamic_dim, cfg.mask_convs) for _ in stages
        )
        self.class_heads = nn.ModuleList(nn.Linear(d, num_classes) for _ in stages)
        for head in self.class_heads:
            nn.init.xavier_uniform_(head.weight)
            nn.init.constant_(head.bias, prior_bias(0.01))  # focal-loss prior

    def _mask_fn(
        self, stage: int, pyramid: list[Tensor], attended: Tensor, boxes: Tensor
    ) -> Callable[[list[Tensor]], Tensor]:
        """rows (B index tensors) -> (M, 28, 28) mask logits of those queries at stage ``stage``."""

        def roi_masks(rows: list[Tensor]) -> Tensor:
            index = torch.cat([torch.full_like(r, b) for b, r in enumerate(rows)])
            picked = torch.cat([boxes[b, r] for b, r in enumerate(rows)])
            queries = torch.cat([attended[b, r] for b, r in enumerate(rows)])
            feats = pyramid_roi_align(pyramid, self.strides, picked, index, MASK_ROI)
            return self.mask_heads[stage](queries, feats)

        return roi_masks

    def forward(
        self, images: Any, inject: Callable[[Tensor, list[Tensor]], Tensor] | None = None
    ) -> dict[str, Any]:
        """images: (B, 3, H, W) ImageNet-normalised (or cached backbone levels), H and W
        multiples of ``size_divisor``; inject(proposal features (B, N, D), pyramid) -> (B, N, D),
        applied before the first stage. Returns the contract in the module docstring."""
        levels, (height, width) = backbone_levels(self.backbone, images)
        if height % self.size_divisor or width % self.size_divisor:
            raise ValueError(
                f"input {height}x{width} is not a multiple of size_divisor {self.size_divisor}"
            )
        pyramid = self.neck(levels)
        batch = pyramid[0].shape[0]
        rel = self.proposal_boxes.weight
        whwh = rel.new_tensor([width, height, width, height])
        boxes = torch.cat([rel[:, :2] - 0.5 * rel[:, 2:], rel[:, :2] + 0.5 * rel[:, 2:]], 1) * whwh
        boxes = boxes.expand(batch, -1, -1)
        queries = self.proposal_feats.weight.expand(batch, -1, -1)
        init = {"kernels": queries, "boxes": boxes}
        if inject is not None:
            queries = inject(queries, pyramid)
        num = queries.shape[1]
        index = torch.arange(batch, device=boxes.device).repeat_interleave(num)
        # The mask grid is the finest level's own grid (stride mask_stride): read from its shape,
        # not computed from the input size, whose Python round() fails under ONNX tracing.
        grid = (pyramid[0].shape[-2], pyramid[0].shape[-1])
        stages = []
        for i, (head, class_head) in enumerate(zip(self.heads, self.class_heads)):
            roi = pyramid_roi_align(pyramid, self.strides, boxes.reshape(-1, 4), index, BOX_ROI)
            queries, attended, cls_feats, deltas = head(queries, roi)
            boxes = decode_boxes(boxes, deltas)
            detached = boxes.detach()
            stage = {
                "logits": class_head(cls_feats),
                "kernels": queries,
                "boxes": boxes,
                "roi_masks": self._mask_fn(i, pyramid, attended, detached),
            }
            if not self.training:
                rows = [torch.arange(num, device=boxes.device)] * batch
                roi_masks = stage["roi_masks"](rows)
                pasted = paste_masks(roi_masks, detached.reshape(-1, 4), grid, self.mask_stride)
                stage["masks"] = pasted.view(batch, num, *grid)
            stages.append(stage)
            boxes = detached  # later stages: the box is an input, not a path for gradients
        return {"init": init, "stages": stages, "pyramid": pyramid}
