"""Mask R-CNN (He et al., ICCV 2017) as the CNN-based reference: torchvision's own model on the
project's backbones.

The paper's Figure 1 compares query-based K-Net with Mask R-CNN at few labels. Here
``torchvision.models.detection.MaskRCNN`` (its RPN, RoI heads, losses and post-processing, used
as they are) sits on the same frozen backbone and the same neck as the other kinds: the ViT's
simple feature pyramid (strides 3.5..28) or the ResNet FPN (4..32), plus torchvision's extra P6
level (max pooling, stride 2) that its FPN gives the RPN. Three small adapters make torchvision
take levels whose strides need not be powers of two (the heads are torchvision's classes, sized
to the pyramid's width, see :class:`MaskRCNNReference`):

- :class:`PyramidLevels`, the detector's "backbone": pyramid levels -> OrderedDict with
  ``out_channels``, as torchvision expects;
- :class:`FixedStrideAnchors`: torchvision's AnchorGenerator infers a level's stride as
  input // grid with integer division (3 instead of 3.5 for a /14 ViT); this one is told them;
- :class:`FixedStrideRoIAlign`: torchvision's MultiScaleRoIAlign rounds each level's scale to a
  power of two (1/4 instead of 1/3.5); this one uses the true scales and maps box sizes to levels
  as the FPN paper does, a level k = round(log2(stride)).

**[choice] The detector's transform is not run on inputs.** The project's data path already
resizes (finetune.short_side / max_side), ImageNet-normalises and pads to ``size_divisor``, and with
the frozen-feature cache the model receives backbone levels, not pixels. So :meth:`forward` builds
torchvision's ImageList itself and calls the RPN and RoI heads directly; the transform
(constructed with identity mean and std, so it could not normalise twice even if called) serves
only its ``postprocess``: boxes back to the original image size and masks pasted into it.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.faster_rcnn import FastRCNNPredictor, TwoMLPHead
from torchvision.models.detection.image_list import ImageList
from torchvision.models.detection.mask_rcnn import MaskRCNN, MaskRCNNHeads, MaskRCNNPredictor
from torchvision.ops import MultiScaleRoIAlign
from torchvision.ops.poolers import initLevelMapper

from trainer.config import ModelConfig
from trainer.data.frozen_features import BackboneLevels
from trainer.model.levels import backbone_levels
from trainer.model.neck import build_neck

if TYPE_CHECKING:
    from pipeline.backbones.backbone import Backbone

# torchvision's anchors are 32..512 px on strides 4..64: eight times the stride. Kept as that
# ratio so a ViT's levels (3.5..56) get 28..448 px anchors, each level the objects it resolves.
ANCHOR_PER_STRIDE = 8
ASPECT_RATIOS = (0.5, 1.0, 2.0)
# torchvision's (and Detectron's) test-time mask binarisation of the pasted mask probabilities.
MASK_THRESHOLD = 0.5


class PyramidLevels(nn.Module):
    """The detector's backbone: backbone levels -> the neck's levels "0".."3" and "pool" (P6).

    Takes the backbone's levels (a list), not images: the wrapper runs or reads the backbone.
    """

    def __init__(self, neck: nn.Module, channels: int) -> None:
        super().__init__()
        self.neck = neck
        self.out_channels = channels
        neck_strides = tuple(float(s) for s in neck.strides)
        self.strides: tuple[float, ...] = (*neck_strides, 2 * neck_strides[-1])

    def forward(self, levels: list[Tensor]) -> OrderedDict[str, Tensor]:
        pyramid = self.neck(levels)
        named = OrderedDict((str(i), x) for i, x in enumerate(pyramid))
        named["pool"] = F.max_pool2d(pyramid[-1], kernel_size=1, stride=2)  # torchvision's P6
        return named


class FixedStrideAnchors(AnchorGenerator):
    """torchvision's anchors at the levels' true strides (which may be fractional)."""

    def __init__(self, strides: Sequence[float]) -> None:
        sizes = tuple((ANCHOR_PER_STRIDE * s,) for s in strides)
        super().__init__(sizes, (ASPECT_RATIOS,) * len(strides))
        self.level_strides = tuple(float(s) for s in strides)

    def forward(self, image_list: ImageList, feature_maps: list[Tensor]) -> list[Tensor]:
        grids = [list(f.shape[-2:]) for f in feature_maps]
        dtype, device = feature_maps[0].dtype, feature_maps[0].device
        strides = [[torch.tensor(s, dtype=dtype, device=device)] * 2 for s in self.level_strides]
        self.set_cell_anchors(dtype, device)
        per_level = torch.cat(self.grid_anchors(grids, strides))
        return [per_level for _ in image_list.image_sizes]


class FixedStrideRoIAlign(MultiScaleRoIAlign):
    """torchvision's multi-scale RoIAlign with the levels' true scales (1 / stride) set up front."""

    def __init__(self, strides: Sequence[float], output_size: int, sampling_ratio: int = 2):
        super().__init__(["0", "1", "2", "3"], output_size, sampling_ratio)
        levels = [round(math.log2(s)) for s in strides]
        if levels != list(range(levels[0], levels[0] + len(levels))):
            raise ValueError(f"pyramid strides {tuple(strides)} are not one octave apart")
        self.scales = [1.0 / float(s) for s in strides]
        self.map_levels = initLevelMapper(levels[0], levels[-1])


class MaskRCNNReference(nn.Module):
    """torchvision's Mask R-CNN over the project's backbone and neck.

    Attributes as the other kinds': backbone (the project's, frozen or partly frozen), strides,
    mask_stride, size_divisor, num_classes, num_kernels (detections per image); detector (the
    torchvision MaskRCNN). forward: training -> {"loss_*"}, eval -> torchvision detections.
    """

    # The class-dependent layers (torchvision's predictors; class 0 is its background).
    CLASS_LAYER_PREFIXES: tuple[str, ...] = (
        "detector.roi_heads.box_predictor.",
        "detector.roi_heads.mask_predictor.mask_fcn_logits.",
    )

    def __init__(self, backbone: Backbone, cfg: ModelConfig, num_classes: int) -> None:
        super().__init__()
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        self.backbone = backbone
        self.num_classes = num_classes
        neck = build_neck(
            tuple(backbone.level_channels),
            tuple(backbone.level_strides),
            cfg.channels,
            tuple(cfg.pyramid_scales),
        )
        levels = PyramidLevels(neck, cfg.channels)
        self.strides: tuple[float, ...] = tuple(float(s) for s in neck.strides)
        self.mask_stride: float = self.strides[0]
        coarsest = self.strides[-1]
        if coarsest != int(coarsest):
            raise ValueError(f"coarsest pyramid stride {coarsest} is not an integer")
        self.size_divisor: int = math.lcm(int(backbone.size_divisor), int(coarsest))
        self.num_kernels = 100
        width, classes = cfg.channels, num_classes + 1  # + torchvision's background class 0
        # Head widths scale with the pyramid's: torchvision's own (box MLP 1024, mask convs 256)
        # at its 256 channels, a quarter of them at the demo's 64.
        representation = max(1, 1024 * width // 256)
        self.detector = MaskRCNN(
            levels,
            rpn_anchor_generator=FixedStrideAnchors(levels.strides),
            box_roi_pool=FixedStrideRoIAlign(self.strides, 7),
            box_head=TwoMLPHead(width * 7 * 7, representation),
            box_predictor=FastRCNNPredictor(representation, classes),
            box_batch_size_per_image=cfg.roi_samples,
            mask_roi_pool=FixedStrideRoIAlign(self.strides, 14),
            mask_head=MaskRCNNHeads(width, [width] * 4, 1),
            mask_predictor=MaskRCNNPredictor(width, width, classes),
            box_detections_per_img=self.num_kernels,
            image_mean=[0.0, 0.0, 0.0],
            image_std=[1.0, 1.0, 1.0],
        )

    def _levels(self, images: Tensor | BackboneLevels) -> list[Tensor]:
        return backbone_levels(self.backbone, images)[0]

    def forward(
        self,
        images: Tensor | BackboneLevels,
        targets: list[dict[str, Tensor]] | None = None,
        image_sizes: Sequence[tuple[int, int]] | None = None,
    ) -> Any:
        """images: (B, 3, H, W) ImageNet-normalised and padded to ``size_divisor`` (or its frozen
        backbone levels); targets (training): per image "boxes" (L, 4) xyxy, "labels" (L,)
        0-based, "masks" (L, H, W); image_sizes: each image's (h, w) inside the padding (default
        the padded size: training batches carry no sizes, and proposals reaching into the zero
        padding only add negatives). Training returns torchvision's losses as "loss_*"; eval
        returns its detections (boxes, labels 1-based, scores, masks (N, 1, 28, 28)) per image."""
        height, width = images.shape[-2:]
        if height % self.size_divisor or width % self.size_divisor:
            raise ValueError(
                f"input {height}x{width} is not a multiple of size_divisor {self.size_divisor}"
            )
        count = images.shape[0]
        sizes = [tuple(int(v) for v in s) for s in image_sizes or [(height, width)] * count]
        batch = ImageList(torch.empty(0, 3, height, width), sizes)
        features = self.detector.backbone(self._levels(images))
        if self.training:
            if targets is None:
                raise ValueError("Mask R-CNN needs targets in training mode")
            targets = [
                {"boxes": t["boxes"], "labels": t["labels"] + 1, "masks": t["masks"]}
                for t in targets
            ]
        proposals, rpn_losses = self.detector.rpn(batch, features, targets)
        detections, roi_losses = self.detector.roi_heads(features, proposals, sizes, targets)
        # torchvision names its terms loss_objectness, loss_rpn_box_reg, loss_classifier,
        # loss_box_reg and loss_mask: the engine sums every "loss_*" as they are.
        return {**rpn_losses, **roi_losses} if self.training else detections

    @torch.no_grad()
    def detect(
        self, images: Tensor | BackboneLevels, infos: Sequence[dict[str, Any]]
    ) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
        """Per image (masks (K, H, W) bool, scores (K,), contiguous labels (K,)), best first, at
        the original size: torchvision's detections taken back by its transform's postprocess,
        masks binarised at 0.5 (as torchvision's paste does). The Predictor selects from them."""
        sizes = [tuple(int(v) for v in info["image_size"]) for info in infos]
        originals = [tuple(int(v) for v in info["orig_size"]) for info in infos]
        detections = self.forward(images, image_sizes=sizes)
        detections = self.detector.transform.postprocess(detections, sizes, originals)
        out = []
        for det in detections:
            order = det["scores"].float().argsort(descending=True)
            masks = (det["masks"][order, 0].float() > MASK_THRESHOLD).cpu().numpy()
            scores = det["scores"][order].float().cpu().numpy()
            labels = (det["labels"][order] - 1).cpu().numpy()  # torchvision's 0 is background
            out.append((masks, scores, labels))
        return out
