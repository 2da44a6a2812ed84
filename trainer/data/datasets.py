"""Training data: pseudo masks from proposal shards, labelled COCO, and the batch.

- :class:`ShardDataset`: stage two. One sample per image whose proposals status is OK (at least
  one mask); masks decoded from the shards' RLE, seeds S_l (fp16 on disk) as float32, labels 0.
- :class:`CocoDataset`: stage three and evaluation. Category ids mapped to contiguous indices in
  sorted-id order, crowd annotations ignored.
- :func:`collate` builds the trainer :class:`Batch` (docs/architecture.md "The trainer batch").

Samples are addressed by ``(index, sample_seed)`` keys (:data:`SampleKey`, produced by
trainer/data/loader.py's sampler); the augmentation draws only from the key's seed, so a resumed run
or a different worker count reproduces the same batches.
"""

from __future__ import annotations

import json
import math
import tomllib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from pycocotools import mask as mask_utils
from torch import Tensor
from torch.utils.data import Dataset

from pipeline.cli import UserError
from pipeline.inputs.coco_file import load_coco_file
from pipeline.inputs.image_files import ImageLimits
from pipeline.inputs.images import UnreadableImage, decode_image, normalise
from pipeline.shards.plan import check_image_file, recorded_inputs
from pipeline.shards.schema import STATUS_OK, list_shards, read_meta
from pipeline.shards.shard_reader import ShardReader
from trainer.data.transforms import Augment, masks_to_boxes, pad_to

SampleKey = tuple[int, int]  # (dataset index, augmentation seed)


# --------------------------------------------------------------------------------------------
# Samples and batches


def split_key(key: int | SampleKey) -> tuple[int, np.random.Generator]:
    """A sampler key -> (index, generator). A bare index (evaluation) seeds with the index."""
    if isinstance(key, (tuple, list)):
        index, seed = int(key[0]), int(key[1])
    else:
        index = seed = int(key)
    return index, np.random.default_rng(seed)


def make_sample(
    image: np.ndarray,
    masks: np.ndarray,
    labels: np.ndarray,
    seeds: np.ndarray | None,
    augment: Augment,
    rng: np.random.Generator,
    info: dict[str, Any],
) -> dict[str, Any]:
    """Augment one image with its (L, H, W) masks, drop masks that vanished, build the sample.

    Returns {"image": (3,h,w) float32 normalised, "target": {"masks": (L',h,w) uint8,
    "boxes": (L',4) float32, "labels": (L',) int64[, "seeds": (L',Cs) float32]}, "info": dict}.
    """
    orig_size = image.shape[:2]
    image, masks, aug = augment(image, masks, rng)
    keep = masks.any(axis=(1, 2))  # a resize or rotation can erase a mask
    masks = masks[keep]
    target = {
        "masks": torch.from_numpy(np.ascontiguousarray(masks)),
        "boxes": torch.from_numpy(masks_to_boxes(masks)),
        "labels": torch.from_numpy(labels[keep].astype(np.int64)),
    }
    if seeds is not None:
        target["seeds"] = torch.from_numpy(seeds[keep].astype(np.float32))
    info = {**info, "orig_size": tuple(orig_size), "image_size": tuple(image.shape[:2]), **aug}
    return {"image": normalise(image), "target": target, "info": info}


@dataclass
class Batch:
    """The trainer batch (docs/architecture.md "The trainer batch"). After :meth:`to` it is
    exactly the contract:

    images: (B,3,Hp,Wp) float32 ImageNet-normalised, zero-padded bottom/right, Hp and Wp
        multiples of the model's size_divisor.
    targets: per image {"masks": (L,Hp,Wp) float32 {0,1}, "boxes": (L,4) float32 x0,y0,x1,y1,
        "labels": (L,) int64, "seeds": (L,Cs) float32 (shards only)}.
    infos: per image {"image_id", "file_name", "orig_size" (H,W) on disk, "image_size" (h,w)
        resized image inside the padding, "input_size" (Hp,Wp), "scale", "flipped", "angle"}.

    Before :meth:`to` the masks are uint8 (4x less to move between processes and to the device).
    """

    images: Tensor
    targets: list[dict[str, Tensor]]
    infos: list[dict[str, Any]] = field(default_factory=list)

    def __len__(self) -> int:
        return self.images.shape[0]

    def to(self, device: torch.device | str, non_blocking: bool = False) -> Batch:
        """Move to ``device``; masks become float32 there."""
        targets = []
        for t in self.targets:
            moved = {k: v.to(device, non_blocking=non_blocking) for k, v in t.items()}
            moved["masks"] = moved["masks"].float()
            targets.append(moved)
        return Batch(self.images.to(device, non_blocking=non_blocking), targets, self.infos)

    def pin_memory(self) -> Batch:
        """Called by DataLoader(pin_memory=True) so host-to-GPU copies can be asynchronous."""
        targets = [{k: v.pin_memory() for k, v in t.items()} for t in self.targets]
        return Batch(self.images.pin_memory(), targets, self.infos)


@dataclass(frozen=True)
class Collate:
    """Picklable collate function: samples -> :class:`Batch` padded to ``size_divisor``."""

    size_divisor: int

    def __call__(self, samples: list[dict[str, Any]]) -> Batch:
        d = self.size_divisor
        hp = math.ceil(max(s["image"].shape[1] for s in samples) / d) * d
        wp = math.ceil(max(s["image"].shape[2] for s in samples) / d) * d
        images = torch.stack([pad_to(s["image"], hp, wp) for s in samples])
        targets, infos = [], []
        for s in samples:
            t = dict(s["target"])
            t["masks"] = pad_to(t["masks"], hp, wp)
            targets.append(t)
            infos.append({**s["info"], "input_size": (hp, wp)})
        return Batch(images, targets, infos)


def collate(samples: list[dict[str, Any]], size_divisor: int) -> Batch:
    """Functional form of :class:`Collate`."""
    return Collate(size_divisor)(samples)


def load_image(
    path: Path, height: int, width: int, limits: ImageLimits | None = None, role: str = "training"
) -> np.ndarray:
    """Decode an image that the index says exists with size (height, width); ``role`` names
    the kind of image in an error ("training", "validation")."""
    try:
        image = decode_image(path, limits=limits)
    except (UnreadableImage, FileNotFoundError, OSError) as e:
        raise UserError(f"cannot read {role} image {path}: {e}") from None
    if image.shape[:2] != (height, width):
        raise UserError(
            f"{path} is {image.shape[1]}x{image.shape[0]} but its labels are for "
            f"{width}x{height}: the image changed after the labels/proposals were made"
        )
    return image


# --------------------------------------------------------------------------------------------
# Stage two: proposal shards


# --------------------------------------------------------------------------------------------
# Stage three: labelled COCO


