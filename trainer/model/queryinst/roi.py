"""QueryInst's box geometry: RoIAlign over the pyramid, the box coder, and pasting RoI masks.

Boxes are x0, y0, x1, y1 in input pixels of the padded frame. A box reads the pyramid level
floor(log2(sqrt(w h) / (14 x finest stride))), clamped to the pyramid (mmdetection's level
mapping: 56 pixels at stride 4, as published); RoIAlign is torchvision's (aligned, 2 samples per
bin). The box coder is mmdetection's ``DeltaXYWHBBoxCoder`` as QueryInst configures it: deltas
scaled by (0.5, 0.5, 1, 1), no clipping to the image.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor
from torchvision.ops import roi_align

DELTA_STDS = (0.5, 0.5, 1.0, 1.0)
MAX_LOG_RATIO = abs(math.log(16 / 1000))  # mmdetection's wh_ratio_clip
SAMPLING_RATIO = 2
# The logit a pasted mask holds outside its box (sigmoid ~ 2e-9: background).
OUTSIDE_LOGIT = -20.0


def level_of(boxes: Tensor, num_levels: int, finest_stride: float) -> Tensor:
    """(M, 4) boxes -> (M,) int64 pyramid level each box reads (0 = finest)."""
    scale = ((boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])).clamp(min=0).sqrt()
    level = torch.floor(torch.log2(scale / (14 * finest_stride) + 1e-6))
    return level.clamp(0, num_levels - 1).long()


def pyramid_roi_align(
    pyramid: list[Tensor], strides: tuple[float, ...], boxes: Tensor, index: Tensor, size: int
) -> Tensor:
    """pyramid: levels (B, D, H / s, W / s) finest first; boxes: (M, 4), index: (M,) int64 the
    image of each box -> (M, D, size, size) RoI features, each box from its own level. Boxes
    carry no gradient (torchvision's RoIAlign differentiates the features only). Computed in
    float32: box coordinates in bf16 would round to several pixels."""
    flat = boxes.detach().float()
    rois = torch.cat([index[:, None].to(flat.dtype), flat], dim=1)
    levels = level_of(flat, len(pyramid), strides[0])
    out = flat.new_zeros((len(flat), pyramid[0].shape[1], size, size))
    for lvl, (feats, stride) in enumerate(zip(pyramid, strides)):
        chosen = (levels == lvl).nonzero().squeeze(1)
        if len(chosen) == 0:
            continue
        pooled = roi_align(
            feats.float(), rois[chosen], size, 1.0 / stride, SAMPLING_RATIO, aligned=True
        )
        out = out.index_copy(0, chosen, pooled)
    return out.to(pyramid[0].dtype)


def decode_boxes(boxes: Tensor, deltas: Tensor) -> Tensor:
    """boxes (..., 4) x0y0x1y1, deltas (..., 4) dx, dy, dw, dh -> refined boxes (..., 4)."""
    d = deltas.float() * deltas.new_tensor(DELTA_STDS, dtype=torch.float32)
    width, height = boxes[..., 2] - boxes[..., 0], boxes[..., 3] - boxes[..., 1]
    cx = boxes[..., 0] + 0.5 * width + d[..., 0] * width
    cy = boxes[..., 1] + 0.5 * height + d[..., 1] * height
    w = width * d[..., 2].clamp(-MAX_LOG_RATIO, MAX_LOG_RATIO).exp()
    h = height * d[..., 3].clamp(-MAX_LOG_RATIO, MAX_LOG_RATIO).exp()
    return torch.stack([cx - 0.5 * w, cy - 0.5 * h, cx + 0.5 * w, cy + 0.5 * h], dim=-1)


def paste_masks(roi_logits: Tensor, boxes: Tensor, grid: tuple[int, int], stride: float) -> Tensor:
    """roi_logits (M, m, m) in their boxes (M, 4) -> (M, h, w) logits on the mask grid (cell
    centres at (i + 0.5) x stride), ``OUTSIDE_LOGIT`` outside the boxes. The RoI map gets a
    one-cell border at that logit so the edge blends bilinearly into the background."""
    num, m = roi_logits.shape[0], roi_logits.shape[-1]
    if num == 0:
        return roi_logits.new_zeros((0, *grid))
    padded = F.pad(roi_logits[:, None].float(), (1, 1, 1, 1), value=OUTSIDE_LOGIT)
    b = boxes.detach().float()
    cell = torch.stack([b[:, 2] - b[:, 0], b[:, 3] - b[:, 1]], 1).clamp(min=1e-3) / m
    lo, hi = b[:, :2] - cell, b[:, 2:] + cell  # the box grown by the border cell
    h, w = grid
    xs = (torch.arange(w, device=b.device, dtype=b.dtype) + 0.5) * stride
    ys = (torch.arange(h, device=b.device, dtype=b.dtype) + 0.5) * stride
    u = 2 * (xs[None] - lo[:, :1]) / (hi[:, :1] - lo[:, :1]) - 1  # (M, w)
    v = 2 * (ys[None] - lo[:, 1:]) / (hi[:, 1:] - lo[:, 1:]) - 1  # (M, h)
    sample = torch.stack([u[:, None, :].expand(num, h, w), v[:, :, None].expand(num, h, w)], dim=-1)
    pasted = F.grid_sample(padded, sample, align_corners=False, padding_mode="border")
    return pasted[:, 0].to(roi_logits.dtype)
