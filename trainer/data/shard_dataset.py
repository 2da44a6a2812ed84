"""The unlabelled dataset of pre-training: a proposals folder's images with their pseudo masks as
class-agnostic targets and their seed embeddings S_l, the pseudo-mask selection, and the image
root the shards recorded."""

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
        index, rng = split_key(key)
        s, r = self.index[index]
        record = self.readers[s].record(r)
        path = self.image_root / record.file_name
        check_image_file(path, record.file_name, self.file_bytes, self.recorded_root)
        image = load_image(path, record.height, record.width, self.limits)
        masks, seeds = record.decode_masks(), record.seeds
        if self.selection.active:
            keep = self.selection.keep(record)
            masks, seeds = masks[keep], seeds[keep]
        labels = np.zeros(masks.shape[0], np.int64)  # class-agnostic pre-training
        info = {"image_id": record.image_id, "file_name": record.file_name}
        return make_sample(image, masks, labels, seeds, self.augment, rng, info)
