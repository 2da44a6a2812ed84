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


def _split_key(key: int | SampleKey) -> tuple[int, np.random.Generator]:
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


def _load_image(
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


def proposals_image_root(folder: str | Path) -> Path | None:
    """The image root a proposals folder was made from, as recorded in the folder.

    An ``image_root`` entry of its plan.json or summary.json wins; otherwise the recorded
    ``config.toml``: ``proposals.images`` if it names a folder, else (a COCO JSON, or empty)
    ``data.train_images``. Relative paths are taken as the proposals command took them (from the
    working directory). None when nothing is recorded.
    """
    folder = Path(folder)
    for name in ("plan.json", "summary.json"):
        try:
            recorded = json.loads((folder / name).read_text()).get("image_root")
        except (OSError, json.JSONDecodeError, AttributeError):
            continue
        if recorded:
            return Path(recorded).expanduser()
    try:
        raw = tomllib.loads((folder / "config.toml").read_text())
    except (tomllib.TOMLDecodeError, OSError):
        return None
    images = str(raw.get("proposals", {}).get("images", "") or "")
    if images and not images.lower().endswith(".json"):
        return Path(images).expanduser()
    train_images = raw.get("data", {}).get("train_images", "")
    return Path(train_images).expanduser() if train_images else None


def _text(name: Any) -> str:
    return name.decode() if isinstance(name, bytes) else str(name)


@dataclass(frozen=True)
class PseudoMaskSelection:
    """Which of an image's pseudo masks are targets: score >= ``min_score``, the best
    ``max_masks`` (0: all) and area >= ``min_area`` of the image. The default keeps all."""

    min_score: float = 0.0
    max_masks: int = 0
    min_area: float = 0.0

    @property
    def active(self) -> bool:
        return self.min_score > 0 or self.max_masks > 0 or self.min_area > 0

    def keep(self, record: Any) -> np.ndarray:
        """Indices of ``record``'s masks (sorted by score, best first) that are targets."""
        keep = np.flatnonzero(np.asarray(record.scores) >= self.min_score)
        if self.min_area > 0 and keep.size:
            size = [record.height, record.width]
            areas = mask_utils.area([{"size": size, "counts": record.rles[k]} for k in keep])
            keep = keep[np.asarray(areas) >= self.min_area * record.height * record.width]
        return keep[: self.max_masks] if self.max_masks > 0 else keep


class ShardDataset(Dataset):
    """Pseudo-mask samples from a proposals folder (pipeline/shards/schema.py), one per usable image.

    Images whose status is not OK (no mask survived, unreadable) are skipped when the index is
    built; ``skipped`` counts them by status. Each shard is read through its own
    :class:`ShardReader`, closed after indexing so each DataLoader worker opens its own handle.

    ``keep_image(file_name) -> bool`` restricts the images (the pretext hold-out,
    trainer/stages/pretext.py); ``selection`` picks the target masks, and an image left with none is
    skipped too (counted under ``no_selected_mask``).

    A sample's target: masks (L,h,w) uint8, boxes (L,4), labels (L,) all 0, seeds (L,C) float32.
    """

    def __init__(
        self,
        folder: str | Path,
        augment: Augment,
        image_root: str | Path | None = None,
        limits: ImageLimits | None = None,
        *,
        keep_image: Callable[[str], bool] | None = None,
        selection: PseudoMaskSelection = PseudoMaskSelection(),
    ):
        self.folder = Path(folder)
        self.limits = limits  # [data] max_image_pixels / max_image_mb; None: the defaults
        paths = list_shards(self.folder)
        if not paths:
            raise UserError(
                f"no proposal shards in {self.folder}: run `python -m pipeline proposals` first "
                "or pass --shards"
            )
        root = Path(image_root).expanduser() if image_root else proposals_image_root(self.folder)
        if root is None:
            raise UserError(
                f"{self.folder} records no image root (config.toml): pass the image folder"
            )
        self.image_root = root
        # What the proposals read (plan.json): each opened file must be that file.
        inputs = recorded_inputs(self.folder)
        self.file_bytes: dict[str, int] = inputs.get("file_bytes", {})
        self.recorded_root = Path(inputs.get("image_root") or root)
        self.augment = augment
        self.selection = selection
        self.metas = [read_meta(p) for p in paths]
        self.readers = [ShardReader(p) for p in paths]
        self.index: list[tuple[int, int]] = []  # (shard, record) of every usable image
        self.names: list[str] = []  # their file names, in the same order
        self.skipped: dict[int | str, int] = {}
        for s, reader in enumerate(self.readers):
            self.index += self._usable(s, reader, keep_image)
            reader.close()  # no handle may cross a fork into the workers
        if not self.index:
            raise UserError(f"{self.folder}: no image has a proposal mask (all empty/unreadable)")

    def _usable(
        self, s: int, reader: ShardReader, keep_image: Callable[[str], bool] | None
    ) -> list[tuple[int, int]]:
        """(shard, record) of shard ``s``'s images that have targets, counting the others."""
        table = reader.image_table()  # status and mask counts only, no mask is read
        usable = (table["status"] == STATUS_OK) & (table["mask_count"] > 0)
        for status in table["status"][~usable].tolist():
            self.skipped[int(status)] = self.skipped.get(int(status), 0) + 1
        rows = [int(r) for r in np.flatnonzero(usable)]
        names = [_text(n) for n in table["file_name"]]
        if keep_image is not None:
            rows = [r for r in rows if keep_image(names[r])]
        if self.selection.active:
            chosen = [r for r in rows if self.selection.keep(reader.record(r)).size]
            lost = len(rows) - len(chosen)
            if lost:
                self.skipped["no_selected_mask"] = self.skipped.get("no_selected_mask", 0) + lost
            rows = chosen
        self.names += [names[r] for r in rows]
        return [(s, r) for r in rows]

    @property
    def meta(self) -> dict[str, Any]:
        """Attributes of the first shard (fingerprint, backbone, embed_dim, ...)."""
        return self.metas[0]

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, key: int | SampleKey) -> dict[str, Any]:
        index, rng = _split_key(key)
        s, r = self.index[index]
        record = self.readers[s].record(r)
        path = self.image_root / record.file_name
        check_image_file(path, record.file_name, self.file_bytes, self.recorded_root)
        image = _load_image(path, record.height, record.width, self.limits)
        masks, seeds = record.decode_masks(), record.seeds
        if self.selection.active:
            keep = self.selection.keep(record)
            masks, seeds = masks[keep], seeds[keep]
        labels = np.zeros(masks.shape[0], np.int64)  # class-agnostic pre-training
        info = {"image_id": record.image_id, "file_name": record.file_name}
        return make_sample(image, masks, labels, seeds, self.augment, rng, info)


# --------------------------------------------------------------------------------------------
# Stage three: labelled COCO


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
        index, rng = _split_key(key)
        file_name, image_id, height, width = self.images[index]
        role = "training" if self.train else "validation"
        image = _load_image(self.image_root / file_name, height, width, self.limits, role)
        anns = self.annotations[index] if self.with_masks else []
        if anns:
            rles = [_annotation_rle(segm, height, width) for segm, _ in anns]
            masks = np.ascontiguousarray(mask_utils.decode(rles).transpose(2, 0, 1))
        else:
            masks = np.zeros((0, height, width), np.uint8)
        labels = np.array([label for _, label in anns], np.int64)
        info = {"image_id": image_id, "file_name": file_name}
        return make_sample(image, masks, labels, None, self.augment, rng, info)
