"""A model's detections on one image as instances: decoding the last stage's outputs into
original-size binary masks, boxes and scores, optional mask NMS, and the COCO results form.

Decoding follows K-Net's ``KernelIterHead.simple_test`` (docs/method.md, stage three): the
detection scores (N kernels x C classes) are flattened, the top ``max_detections`` (kernel, class)
pairs are kept, and each one's mask logits become an original-size binary mask: sigmoid, bilinear
up-sampling to the padded input size, crop to the resized image, bilinear resize to the original
size, threshold at ``mask_threshold``. Detections whose binary mask is empty are dropped: an empty
mask matches no object (IoU 0), so it cannot change AP.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from pycocotools import mask as mask_util
from torch import Tensor

# Masks are resized in groups of this many, so 100 detections on an 800 x 1333 image never hold
# 100 full-size float maps at once (~430 MB) on the device.
_RESIZE_CHUNK = 16


@dataclass
class Instances:
    """Detections on one image, best first.

    masks: (K, H, W) bool at the image's original size; boxes: (K, 4) float32 x0, y0, x1, y1 in
    pixels (x1, y1 exclusive); scores: (K,) float32; labels: (K,) int64 contiguous class indices;
    label_names / category_ids: per detection, the class name and its COCO category id.
    rles: the compressed RLE of each mask (pycocotools dicts, counts as bytes).
    """

    masks: np.ndarray
    boxes: np.ndarray
    scores: np.ndarray
    labels: np.ndarray
    label_names: list[str] = field(default_factory=list)
    category_ids: list[int] = field(default_factory=list)
    rles: list[dict[str, Any]] = field(default_factory=list, repr=False)

    def __len__(self) -> int:
        return int(self.scores.shape[0])

    def to_coco(self, image_id: int) -> list[dict[str, Any]]:
        """COCO results dicts: image_id, category_id, segmentation (RLE, counts as str), bbox
        (x, y, w, h) and score; pycocotools ``loadRes`` reads a list of them."""
        out = []
        for k in range(len(self)):
            rle = self.rles[k]
            x0, y0, x1, y1 = (float(v) for v in self.boxes[k])
            out.append(
                {
                    "image_id": int(image_id),
                    "category_id": int(self.category_ids[k]),
                    "segmentation": {"size": list(rle["size"]), "counts": rle["counts"].decode()},
                    "bbox": [x0, y0, x1 - x0, y1 - y0],
                    "score": float(self.scores[k]),
                }
            )
        return out


def mask_nms(rles: list[dict], scores: np.ndarray, labels: np.ndarray, iou: float) -> np.ndarray:
    """Indices kept by greedy per-class mask NMS: a detection is dropped when its mask overlaps a
    better-scored kept one of the same class by IoU > ``iou``. Query-based models need no NMS
    (each object should win one kernel); the option is for crowded or class-agnostic outputs."""
    order = np.argsort(-scores, kind="stable")
    kept: list[int] = []
    for i in order:
        same = [j for j in kept if labels[j] == labels[i]]
        if same:
            overlap = mask_util.iou([rles[j] for j in same], [rles[i]], [0])  # one gt: iscrowd (1,)
            if float(np.max(overlap)) > iou:
                continue
        kept.append(int(i))
    return np.array(sorted(kept, key=lambda j: -scores[j]), np.int64)


def _binary_masks(
    mask_logits: Tensor,
    kernels: Tensor,
    input_size: tuple[int, int],
    image_size: tuple[int, int],
    orig_size: tuple[int, int],
    threshold: float,
) -> np.ndarray:
    """(k, H, W) uint8 original-size masks of the chosen kernels."""
    h_img, w_img = image_size
    binary = []
    for start in range(0, kernels.numel(), _RESIZE_CHUNK):
        chunk = mask_logits[kernels[start : start + _RESIZE_CHUNK]].float().sigmoid()[None]
        chunk = F.interpolate(chunk, size=input_size, mode="bilinear", align_corners=False)
        chunk = chunk[:, :, :h_img, :w_img]  # drop the zero padding (bottom/right)
        chunk = F.interpolate(chunk, size=orig_size, mode="bilinear", align_corners=False)
        binary.append((chunk[0] > threshold).cpu())
    if not binary:
        return np.zeros((0, *orig_size), np.uint8)
    return torch.cat(binary).numpy().astype(np.uint8)


@torch.no_grad()
def decode(
    scores: Tensor,
    mask_logits: Tensor,
    *,
    input_size: tuple[int, int],
    image_size: tuple[int, int],
    orig_size: tuple[int, int],
    mask_threshold: float = 0.3,
    max_detections: int = 100,
    score_threshold: float = 0.0,
    nms_iou: float = 0.0,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, list[dict]]:
    """One image's detections from its (N, C) detection scores and (N, h, w) mask logits.

    input_size: (Hp, Wp) padded network input; image_size: (h, w) the resized image inside it
    (top-left); orig_size: (H, W) on disk. Returns (masks (K, H, W) uint8, scores (K,), labels
    (K,), rles), best first, K <= max_detections, scores >= score_threshold, no empty mask; with
    ``nms_iou`` > 0 per-class mask NMS at that IoU.
    """
    num_classes = scores.shape[1]
    flat = scores.float().flatten()  # (N*C,), kernel-major
    top_scores, top_index = flat.topk(min(max_detections, flat.numel()), sorted=True)
    keep = top_scores >= score_threshold
    top_scores, top_index = top_scores[keep], top_index[keep]
    kernels = torch.div(top_index, num_classes, rounding_mode="floor")
    labels = (top_index % num_classes).cpu().numpy().astype(np.int64)
    masks = _binary_masks(mask_logits, kernels, input_size, image_size, orig_size, mask_threshold)
    score_np = top_scores.cpu().numpy().astype(np.float32)
    return select(masks, score_np, labels, max_detections=max_detections, nms_iou=nms_iou)


def select(
    masks: np.ndarray,
    scores: np.ndarray,
    labels: np.ndarray,
    *,
    max_detections: int = 100,
    score_threshold: float = 0.0,
    nms_iou: float = 0.0,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, list[dict]]:
    """Binary masks (K, H, W) uint8 at the original size, sorted best first, with their scores
    and labels -> (masks, scores, labels, rles) as :func:`decode` returns them: at most
    ``max_detections``, scores >= ``score_threshold``, no empty mask, per-class mask NMS at
    ``nms_iou`` when > 0."""
    keep = np.flatnonzero(scores >= score_threshold)[:max_detections]
    masks, scores, labels = masks[keep], scores[keep], labels[keep]
    # pycocotools wants (H, W, k) in Fortran order.
    rles = mask_util.encode(np.asfortranarray(masks.transpose(1, 2, 0))) if len(masks) else []
    nonempty = np.flatnonzero(masks.any(axis=(1, 2)))
    masks, scores, labels = masks[nonempty], scores[nonempty], labels[nonempty]
    rles = [rles[i] for i in nonempty]
    if nms_iou > 0 and len(rles):
        kept = mask_nms(rles, scores, labels, nms_iou)
        masks, scores, labels = masks[kept], scores[kept], labels[kept]
        rles = [rles[i] for i in kept]
    return masks, scores, labels, rles


def boxes_of(rles: list[dict]) -> np.ndarray:
    """(K, 4) float32 x0, y0, x1, y1 of each RLE mask's bounding box."""
    if not rles:
        return np.zeros((0, 4), np.float32)
    xywh = mask_util.toBbox(rles).astype(np.float32).reshape(-1, 4)
    return np.concatenate([xywh[:, :2], xywh[:, :2] + xywh[:, 2:]], axis=1)
