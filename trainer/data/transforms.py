"""Training-time geometry for one image and its instance masks (numpy, OpenCV).

Every transform moves the image and its masks together and the boxes are *recomputed* from the
transformed masks, so the three can never disagree (a rotated box is not the box of the rotated
object). Randomness comes only from a ``numpy.random.Generator`` passed in: the dataset derives
one per sample from (seed, epoch, position), so a sample is augmented identically whichever
DataLoader worker makes it and whether or not the run was resumed.

Conventions: image (H, W, 3) uint8 RGB; masks (L, H, W) uint8 in {0, 1}; boxes (L, 4) float32
x0, y0, x1, y1 in pixels with x1, y1 exclusive (max index + 1), as in the proposals shards.
"""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np
from torch import Tensor

# ImageNet mean colour (pipeline.backbones.backbone.IMAGENET_MEAN x 255): the fill of a rotation's empty
# corners, so that after normalisation they read as zeros, exactly like the batch padding.
_FILL_RGB = (124, 116, 104)
# Channels per OpenCV call: warpAffine and bilinear resize take up to CV_CN_MAX = 512 (stay well
# below); area resampling when shrinking takes at most 4.
_CHANNEL_CHUNK = 256
_AREA_CHUNK = 4


def target_size(height: int, width: int, short_side: int, max_side: int) -> tuple[int, int]:
    """(h, w) after scaling so the short side is ``short_side`` and the long side <= ``max_side``.

    The scale is min(short_side / short, max_side / long) (mmdet's "keep ratio" rescale), sizes
    rounded to the nearest pixel and at least 1.
    """
    scale = min(short_side / min(height, width), max_side / max(height, width))
    # round() as pipeline.inputs.images.resize_keep_ratio does, so both stages see the same pixels.
    return max(1, round(height * scale)), max(1, round(width * scale))


def _resize_channels(stack: np.ndarray, size: tuple[int, int], interp: int) -> np.ndarray:
    """Resize (H, W, C) to (h, w, C) for any C, keeping the channel axis even when C == 1."""
    h, w = size
    chunk = _AREA_CHUNK if interp == cv2.INTER_AREA else _CHANNEL_CHUNK
    parts = []
    for start in range(0, stack.shape[2], chunk):
        part = cv2.resize(stack[:, :, start : start + chunk], (w, h), interpolation=interp)
        parts.append(part.reshape(h, w, -1))
    return np.concatenate(parts, axis=2) if len(parts) > 1 else parts[0]


def resize_masks(masks: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """(L, H, W) {0,1} masks -> (L, h, w) {0,1}: area/bilinear resampling, then threshold 0.5.

    Resampling the 0/1 map and thresholding keeps thin parts better than nearest-neighbour.
    """
    num = masks.shape[0]
    if num == 0:
        return np.zeros((0, *size), np.uint8)
    shrink = size[0] < masks.shape[1] or size[1] < masks.shape[2]
    interp = cv2.INTER_AREA if shrink else cv2.INTER_LINEAR
    stack = np.ascontiguousarray(masks.transpose(1, 2, 0)).astype(np.float32)
    out = _resize_channels(stack, size, interp)
    return np.ascontiguousarray((out >= 0.5).transpose(2, 0, 1)).astype(np.uint8)


def resize(
    image: np.ndarray, masks: np.ndarray, short_side: int, max_side: int
) -> tuple[np.ndarray, np.ndarray, float]:
    """Resize keeping the aspect ratio; returns (image, masks, scale = new height / old height)."""
    h, w = image.shape[:2]
    size = target_size(h, w, short_side, max_side)
    if size == (h, w):
        return image, masks, 1.0
    interp = cv2.INTER_AREA if size[0] < h else cv2.INTER_LINEAR
    image = cv2.resize(image, (size[1], size[0]), interpolation=interp)
    return image, resize_masks(masks, size), size[0] / h


def hflip(image: np.ndarray, masks: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mirror left-right: (H, W, 3) and (L, H, W)."""
    return np.ascontiguousarray(image[:, ::-1]), np.ascontiguousarray(masks[:, :, ::-1])


def rotate(image: np.ndarray, masks: np.ndarray, degrees: float) -> tuple[np.ndarray, np.ndarray]:
    """Rotate about the image centre by ``degrees`` (counter-clockwise), same canvas size.

    The image is resampled bilinearly with the ImageNet mean colour in the uncovered corners;
    each mask bilinearly, then thresholded at 0.5. Parts rotated out of the canvas are lost (a
    mask may become empty; callers drop those).
    """
    h, w = image.shape[:2]
    matrix = cv2.getRotationMatrix2D(((w - 1) / 2.0, (h - 1) / 2.0), degrees, 1.0)
    image = cv2.warpAffine(
        image,
        matrix,
        (w, h),
        flags=cv2.INTER_LINEAR,
        borderMode=cv2.BORDER_CONSTANT,
        borderValue=_FILL_RGB,
    )
    if masks.shape[0] == 0:
        return image, masks
    stack = np.ascontiguousarray(masks.transpose(1, 2, 0)).astype(np.float32)
    parts = []
    for start in range(0, stack.shape[2], _CHANNEL_CHUNK):
        part = cv2.warpAffine(
            stack[:, :, start : start + _CHANNEL_CHUNK],
            matrix,
            (w, h),
            flags=cv2.INTER_LINEAR,
            borderMode=cv2.BORDER_CONSTANT,
            borderValue=0,
        )
        parts.append(part.reshape(h, w, -1))
    out = np.concatenate(parts, axis=2) if len(parts) > 1 else parts[0]
    return image, np.ascontiguousarray((out >= 0.5).transpose(2, 0, 1)).astype(np.uint8)


def masks_to_boxes(masks: np.ndarray) -> np.ndarray:
    """(L, H, W) masks -> (L, 4) float32 tight boxes x0, y0, x1, y1 (x1, y1 exclusive).

    An empty mask gets the box (0, 0, 0, 0).
    """
    num = masks.shape[0]
    boxes = np.zeros((num, 4), np.float32)
    if num == 0:
        return boxes
    rows = masks.any(axis=2)  # (L, H)
    cols = masks.any(axis=1)  # (L, W)
    for i in range(num):
        ys = np.flatnonzero(rows[i])
        xs = np.flatnonzero(cols[i])
        if ys.size:
            boxes[i] = (xs[0], ys[0], xs[-1] + 1, ys[-1] + 1)
    return boxes


@dataclass
class Augment:
    """The per-sample pipeline: resize keeping ratio, then flip and rotation with probabilities.

    ``flip`` and ``rotate_prob`` are probabilities; a rotation angle is uniform in
    [-rotate_deg, rotate_deg]. Use flip=0, rotate_prob=0 for evaluation (resize only).
    ``multiscale``: short sides drawn uniformly per sample instead of ``short_side`` (mmdet's
    multi-scale "value" mode), the long-side cap scaled with each (max_side * s / short_side).
    """

    short_side: int
    max_side: int
    flip: float = 0.0
    rotate_deg: float = 0.0
    rotate_prob: float = 0.0
    multiscale: tuple[int, ...] = ()

    def size_for(self, draw: float) -> tuple[int, int]:
        """(short side, long-side cap) for a uniform draw in [0, 1)."""
        if not self.multiscale:
            return self.short_side, self.max_side
        count = len(self.multiscale)
        short = int(self.multiscale[min(int(draw * count), count - 1)])
        return short, max(1, round(self.max_side * short / self.short_side))

    def __call__(
        self, image: np.ndarray, masks: np.ndarray, rng: np.random.Generator
    ) -> tuple[np.ndarray, np.ndarray, dict]:
        """Returns (image (h,w,3), masks (L,h,w), info) with info = {"scale", "flipped", "angle"}.

        Random draws are made in a fixed order whatever the outcome (flip coin, rotation coin,
        angle, then the scale only when ``multiscale`` is set, so fixed-size runs draw exactly
        what they drew before), so a sample's augmentation depends only on its generator.
        """
        flip_draw, rot_draw, angle_draw = rng.random(3)
        short, cap = self.size_for(float(rng.random()) if self.multiscale else 0.0)
        image, masks, scale = resize(image, masks, short, cap)
        flipped = bool(flip_draw < self.flip)
        if flipped:
            image, masks = hflip(image, masks)
        angle = 0.0
        if self.rotate_deg > 0 and rot_draw < self.rotate_prob:
            angle = float((2.0 * angle_draw - 1.0) * self.rotate_deg)
            image, masks = rotate(image, masks, angle)
        return image, masks, {"scale": scale, "flipped": flipped, "angle": angle}


def pad_to(x: Tensor, height: int, width: int) -> Tensor:
    """Zero-pad the last two dims of (..., h, w) at the bottom/right to (..., height, width).

    Used for the batch: images (zero = the ImageNet mean after normalisation) and masks.
    """
    out = x.new_zeros((*x.shape[:-2], height, width))
    out[..., : x.shape[-2], : x.shape[-1]] = x
    return out
