"""The labelled COCO dataset of fine-tuning and evaluation: images with their instance masks and
classes (contiguous labels in category-id order), validated once, augmented as the section says."""

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
from trainer.data.datasets import SampleKey, load_image, split_key, make_sample


def _annotation_rle(segmentation: Any, height: int, width: int) -> dict:
    """A COCO segmentation (polygons, uncompressed or compressed RLE) as one compressed RLE."""
    if isinstance(segmentation, list):  # polygons: one RLE per part, merged
        return mask_utils.merge(mask_utils.frPyObjects(segmentation, height, width))
    if isinstance(segmentation.get("counts"), list):  # uncompressed RLE
        return mask_utils.frPyObjects(segmentation, height, width)
    return segmentation


class CocoDataset(Dataset):
    """Instance masks from a COCO JSON and an image root.

    ``cat_ids[i]`` is the COCO category id of contiguous class ``i`` (sorted ids). Crowd
    annotations are ignored. With ``train=True`` images without any non-crowd annotation are
    skipped (nothing to learn from); with ``train=False`` every selected image is kept (it still
    counts for AP) and ``with_masks=False`` skips decoding masks the evaluator does not need.
    ``image_ids`` restricts the dataset (a low-data split). Items are sorted by image id.
    """

    def __init__(
        self,
        ann_file: str | Path,
        image_root: str | Path,
        augment: Augment,
        *,
        image_ids: Sequence[int] | None = None,
        train: bool = True,
        with_masks: bool = True,
        limits: ImageLimits | None = None,
        allow_outside_root: bool = False,
        unlabelled_ok: bool = False,
    ):
        ann_file = Path(ann_file)
        if not ann_file.is_file():
            raise UserError(f"annotation file not found: {ann_file}")
        # Validated once for every reader (bad annotations skipped and listed, bad files refused).
        coco = load_coco_file(
            ann_file, allow_outside_root=allow_outside_root, unlabelled_ok=unlabelled_ok
        )
        data = coco.data
        self.image_root = Path(image_root).expanduser()
        self.limits = limits  # [data] max_image_pixels / max_image_mb; None: the defaults
        self.augment = augment
        self.with_masks = with_masks
        self.train = train
        self.categories = coco.categories()  # (id, name), sorted by id
        self.cat_ids = [cat_id for cat_id, _ in self.categories]
        label_of = {c: i for i, c in enumerate(self.cat_ids)}
        per_image: dict[int, list[tuple[Any, int]]] = {}
        for ann in data.get("annotations", []):
            if ann.get("iscrowd", 0):
                continue
            per_image.setdefault(int(ann["image_id"]), []).append(
                (ann["segmentation"], label_of[int(ann["category_id"])])
            )
        images = sorted(data.get("images", []), key=lambda im: int(im["id"]))
        if image_ids is not None:
            wanted = {int(i) for i in image_ids}
            images = [im for im in images if int(im["id"]) in wanted]
        if train:
            images = [im for im in images if per_image.get(int(im["id"]))]
        if not images:
            raise UserError(f"{ann_file}: no usable images (after split/annotation filtering)")
        # Keep only what a sample needs: the parsed JSON can be large and workers are forked.
        self.images = [
            (str(im["file_name"]), int(im["id"]), int(im["height"]), int(im["width"]))
            for im in images
        ]
        self.annotations = [per_image.get(image_id, []) for _, image_id, _, _ in self.images]

    @property
    def num_classes(self) -> int:
        return len(self.cat_ids)

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, key: int | SampleKey) -> dict[str, Any]:
        index, rng = split_key(key)
        file_name, image_id, height, width = self.images[index]
        role = "training" if self.train else "validation"
        image = load_image(self.image_root / file_name, height, width, self.limits, role)
        anns = self.annotations[index] if self.with_masks else []
        if anns:
            rles = [_annotation_rle(segm, height, width) for segm, _ in anns]
            masks = np.ascontiguousarray(mask_utils.decode(rles).transpose(2, 0, 1))
        else:
            masks = np.zeros((0, height, width), np.uint8)
        labels = np.array([label for _, label in anns], np.int64)
        info = {"image_id": image_id, "file_name": file_name}
        return make_sample(image, masks, labels, None, self.augment, rng, info)
