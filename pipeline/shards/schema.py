"""The shard format (docs/architecture.md, schema version 1): one HDF5 file per shard of proposals.

This module owns every name in the format. The proposals driver writes through
:func:`write_shard`; the inspector and the trainer's dataset read through :class:`ShardReader`
(or :func:`read_meta` for the attributes alone). Layout of one shard with N images, M masks and
backbone width C::

    attrs   schema_version, fingerprint, backbone, feature_stride, embed_dim, created_with,
            num_images, num_masks, settings (JSON of the proposal settings; additive),
            self_training (JSON; only in the shards of a self-training round; additive)
    /images/file_name (N,) str      /images/image_id (N,) int64
    /images/height, /images/width (N,) int32
    /images/mask_start (N,) int64   /images/mask_count (N,) int32
    /images/status (N,) uint8       /images/error (N,) str
    /masks/rle (M,) bytes           /masks/box (M,4) float32     /masks/score (M,) float32
    /masks/seed (M,C) float16       /masks/seed_pos (M,3) int16

A shard is written under a temporary name in the same folder and renamed into place when
complete, so a file with a final name (``shard-NNNNN.h5``) is always whole. Each dataset carries
a ``checksum`` attribute (pipeline/shards/integrity.py), checked with :func:`verify_shard` and on
a reader's first access; any read failure is a :class:`ShardError` naming the shard and field.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import h5py
import numpy as np
from pycocotools import mask as mask_utils

from pipeline import __version__
from pipeline.atomic_files import with_path
from pipeline.cli import UserError
from pipeline.shards.integrity import CHECKSUM_ATTR, digest, find_problem

SCHEMA_VERSION = 1
STATUS_OK, STATUS_EMPTY, STATUS_UNREADABLE = 0, 1, 2

_FINAL_RE = re.compile(r"^shard-(\d{5,})\.h5$")
_TEMP_RE = re.compile(r"^shard-\d{5,}\.h5\.[^.]+\.tmp$")
_STR = h5py.string_dtype("utf-8")
# RLE counts are printable ASCII ('0'..'o'), so a variable-length byte string holds them exactly.
_BYTES = h5py.string_dtype("ascii")
# Attributes every writer must be given (the rest are derived from the records).
META_KEYS = ("fingerprint", "backbone", "feature_stride", "embed_dim", "settings")
# Attributes a writer may be given (JSON strings, written only when present): a self-training
# round's record of where its pseudo masks came from (trainer/stages/self_training.py).
OPTIONAL_KEYS = ("self_training",)


class ShardError(UserError):
    """A shard that cannot be read: unknown schema version, missing field, corrupt file."""


@dataclass
class ImageRecord:
    """One image's proposals; K masks sorted by score, K = 0 for empty or unreadable images."""

    file_name: str
    image_id: int
    height: int
    width: int
    status: int
    error: str = ""
    rles: list[bytes] = field(default_factory=list)  # COCO compressed RLE counts, (K,)
    boxes: np.ndarray = field(default_factory=lambda: np.zeros((0, 4), np.float32))  # (K,4)
    scores: np.ndarray = field(default_factory=lambda: np.zeros((0,), np.float32))  # (K,)
    seeds: np.ndarray = field(default_factory=lambda: np.zeros((0, 0), np.float16))  # (K,C)
    seed_pos: np.ndarray = field(default_factory=lambda: np.zeros((0, 3), np.int16))  # (K,3)

    @property
    def num_masks(self) -> int:
        return len(self.rles)

    def rle_dicts(self) -> list[dict[str, Any]]:
        """The masks as pycocotools RLE dicts (``size`` [H, W], ``counts``), for decode and IoU."""
        size = [int(self.height), int(self.width)]
        return [{"size": size, "counts": c} for c in self.rles]

    def decode_masks(self) -> np.ndarray:
        """(K,H,W) uint8 masks in {0,1} at the original image size."""
        if not self.rles:
            return np.zeros((0, self.height, self.width), np.uint8)
        decoded = mask_utils.decode(self.rle_dicts())  # (H,W,K)
        return np.ascontiguousarray(decoded.transpose(2, 0, 1))


def shard_name(index: int) -> str:
    """File name of shard ``index``: ``shard-00000.h5``."""
    return f"shard-{index:05d}.h5"


def shard_index(path: str | Path) -> int:
    """Inverse of :func:`shard_name`; ValueError for anything else."""
    m = _FINAL_RE.match(Path(path).name)
    if not m:
        raise ValueError(f"not a shard file name: {path}")
    return int(m.group(1))


def list_shards(folder: str | Path) -> list[Path]:
    """Final shard files in ``folder`` sorted by index (temporary files are ignored)."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    found = [p for p in folder.iterdir() if _FINAL_RE.match(p.name) and p.is_file()]
    return sorted(found, key=shard_index)


def temp_name(final: str | Path) -> Path:
    """Temporary name for a shard being written (same folder, so os.replace is atomic)."""
    final = Path(final)
    return final.with_name(f"{final.name}.{os.getpid()}.tmp")


def list_temp_files(folder: str | Path) -> list[Path]:
    """Leftover temporary shard files (from a crashed writer) in ``folder``."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir() if _TEMP_RE.match(p.name))


def _check_record(r: ImageRecord, embed_dim: int) -> None:
    k = len(r.rles)
    shapes = {
        "boxes": (np.shape(r.boxes), (k, 4)),
        "scores": (np.shape(r.scores), (k,)),
        "seed_pos": (np.shape(r.seed_pos), (k, 3)),
    }
    if k:
        shapes["seeds"] = (np.shape(r.seeds), (k, embed_dim))
    for name, (got, want) in shapes.items():
        if tuple(got) != want:
            raise ValueError(f"{r.file_name}: {name} has shape {tuple(got)}, expected {want}")
    if r.status not in (STATUS_OK, STATUS_EMPTY, STATUS_UNREADABLE):
        raise ValueError(f"{r.file_name}: unknown status {r.status}")
    if (r.status == STATUS_OK) != (k > 0):
        raise ValueError(f"{r.file_name}: status {r.status} with {k} masks")


def _stack(arrays: list[np.ndarray], shape: tuple[int, ...], dtype: Any) -> np.ndarray:
    arrays = [np.asarray(a, dtype=dtype).reshape(-1, *shape) for a in arrays]
    return np.concatenate(arrays, 0) if arrays else np.zeros((0, *shape), dtype)


def write_shard(path: str | Path, records: list[ImageRecord], meta: dict[str, Any]) -> None:
    """Write ``records`` as one shard at ``path`` atomically (temp name, fsync, os.replace).

    ``meta`` must hold fingerprint, backbone, feature_stride, embed_dim and settings (a JSON
    string, or a dict that is dumped with sorted keys). The output depends only on the records
    and meta, so two workers given the same input write identical datasets and attributes.
    """
    missing = [k for k in META_KEYS if k not in meta]
    if missing:
        raise ValueError(f"write_shard: meta lacks {', '.join(missing)}")
    c = int(meta["embed_dim"])
    for r in records:
        _check_record(r, c)
    counts = np.array([len(r.rles) for r in records], np.int32)
    starts = np.cumsum(counts, dtype=np.int64) - counts  # first mask row of each image
    settings = meta["settings"]
    if not isinstance(settings, str):
        settings = json.dumps(settings, sort_keys=True)

    final = Path(path)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_name(final)
    try:
        # Built in memory and written with plain file I/O: HDF5 hitting a full disk mid-write
        # can crash the process (a segmentation fault), a plain write raises OSError(ENOSPC).
        # track_order/times off: the bytes depend on content only, not on when it was written.
        in_memory = {"driver": "core", "backing_store": False}
        with h5py.File(final.name, "w", track_order=False, **in_memory) as f:
            f.attrs["schema_version"] = np.int64(SCHEMA_VERSION)
            f.attrs["fingerprint"] = str(meta["fingerprint"])
            f.attrs["backbone"] = str(meta["backbone"])
            f.attrs["feature_stride"] = np.float64(meta["feature_stride"])
            f.attrs["embed_dim"] = np.int64(c)
            f.attrs["created_with"] = str(meta.get("created_with", __version__))
            f.attrs["num_images"] = np.int64(len(records))
            f.attrs["num_masks"] = np.int64(counts.sum())
            f.attrs["settings"] = settings
            for key in OPTIONAL_KEYS:
                if key in meta:
                    f.attrs[key] = str(meta[key])

            def put(name: str, data: np.ndarray, dtype: Any = None) -> None:
                ds = f.create_dataset(name, data=data, dtype=dtype, track_times=False)
                # Of the content as read back, so a reader recomputes exactly this.
                ds.attrs[CHECKSUM_ATTR] = digest(ds[()])

            put("images/file_name", np.array([r.file_name for r in records], dtype=object), _STR)
            put("images/image_id", np.array([r.image_id for r in records], np.int64))
            put("images/height", np.array([r.height for r in records], np.int32))
            put("images/width", np.array([r.width for r in records], np.int32))
            put("images/mask_start", starts)
            put("images/mask_count", counts)
            put("images/status", np.array([r.status for r in records], np.uint8))
            put("images/error", np.array([r.error for r in records], dtype=object), _STR)
            rles = [bytes(c_) for r in records for c_ in r.rles]
            put("masks/rle", np.array(rles, dtype=object).reshape(-1), _BYTES)
            put("masks/box", _stack([r.boxes for r in records], (4,), np.float32))
            put("masks/score", _stack([r.scores for r in records], (), np.float32))
            seeds = [r.seeds for r in records if len(r.rles)]
            put("masks/seed", _stack(seeds, (c,), np.float16))
            put("masks/seed_pos", _stack([r.seed_pos for r in records], (3,), np.int16))
            f.flush()
            image = f.id.get_file_image()
        with open(tmp, "wb") as fh:
            fh.write(image)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, final)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise with_path(e, final) from None
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def attrs_to_meta(attrs: h5py.AttributeManager, path: Path) -> dict[str, Any]:
    if "schema_version" not in attrs:
        raise ShardError(f"{path}: not a proposals shard (no schema_version attribute)")
    version = int(attrs["schema_version"])
    if version != SCHEMA_VERSION:
        raise ShardError(
            f"{path}: shard schema version {version} is not supported by this code "
            f"(reads version {SCHEMA_VERSION}); regenerate the shards or update the code"
        )
    meta: dict[str, Any] = {}
    for key, value in attrs.items():
        if isinstance(value, bytes):
            value = value.decode()
        elif isinstance(value, np.generic):
            value = value.item()
        meta[key] = value
    return meta


def open_shard(path: Path) -> h5py.File:
    if not path.is_file():
        raise ShardError(f"shard not found: {path}")
    try:
        return h5py.File(path, "r")
    except OSError as e:
        raise ShardError(f"{path}: cannot open as HDF5 ({e})") from None


def verify_shard(path: str | Path) -> dict[str, Any]:
    """The shard's attributes after checking every dataset against its checksum and the
    structure readers rely on; ShardError naming the shard and field when anything is wrong."""
    path = Path(path)
    with open_shard(path) as f:
        meta = attrs_to_meta(f.attrs, path)
        problem = find_problem(f, int(meta.get("num_images", -1)), int(meta.get("num_masks", -1)))
    if problem:
        raise ShardError(f"{path}: {problem}")
    return meta


def read_meta(path: str | Path) -> dict[str, Any]:
    """The shard's attributes as plain Python values; ShardError on an unknown schema version."""
    path = Path(path)
    with open_shard(path) as f:
        return attrs_to_meta(f.attrs, path)
