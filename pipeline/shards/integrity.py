"""Integrity of a shard file: per-dataset checksums and the structure readers rely on.

The atomic rename guarantees a shard was written whole; it says nothing about what happened to
the file afterwards (bit-rot, a bad copy, a tool that dropped a dataset). So the writer stores a
sha256 of each dataset's content as that dataset's ``checksum`` attribute (an additive attribute:
the schema's names are unchanged and other HDF5 tools read the file as before), and
:func:`find_problem` recomputes them, and checks the structure every reader relies on (lengths,
mask ranges, RLE as strings), before a shard counts as finished or is trained on. Shards written
before checksums existed get the structure checks only.

No import of ``pipeline.shards.schema`` here (it imports this module): problems are returned as one
line, and the shards module turns them into its ShardError.
"""

from __future__ import annotations

import hashlib

import h5py
import numpy as np

CHECKSUM_ATTR = "checksum"
IMAGE_FIELDS = (
    "file_name",
    "image_id",
    "height",
    "width",
    "mask_start",
    "mask_count",
    "status",
    "error",
)
MASK_FIELDS = ("rle", "box", "score", "seed", "seed_pos")
DATASETS = tuple(f"images/{k}" for k in IMAGE_FIELDS) + tuple(f"masks/{k}" for k in MASK_FIELDS)
_STRING_FIELDS = ("images/file_name", "images/error", "masks/rle")


def digest(values: np.ndarray) -> str:
    """ "sha256:<hex>" of a dataset's content as h5py reads it: shape, then each string's
    length and bytes (variable-length strings), or the raw array bytes."""
    h = hashlib.sha256(repr(tuple(values.shape)).encode())
    if values.dtype == object:
        for v in values.reshape(-1):
            b = v.encode() if isinstance(v, str) else bytes(v)
            h.update(len(b).to_bytes(8, "little"))
            h.update(b)
    else:
        h.update(np.ascontiguousarray(values).tobytes())
    return f"sha256:{h.hexdigest()}"


def _read(f: h5py.File, name: str) -> tuple[np.ndarray | None, str]:
    if name not in f:
        return None, f"field {name} is missing"
    try:
        return f[name][()], ""
    except Exception as e:  # h5py raises OSError, KeyError, ... for damaged chunks
        return None, f"field {name} cannot be read ({str(e).strip().splitlines()[0]})"


def _structure_problem(data: dict[str, np.ndarray], n: int, m: int) -> str:
    for name, values in data.items():
        want = n if name.startswith("images/") else m
        if len(values) != want:
            return f"field {name} has {len(values)} rows, expected {want}"
        if name in _STRING_FIELDS and values.dtype != object:
            return f"field {name} holds {values.dtype} values, not strings"
    start = data["images/mask_start"].astype(np.int64)
    count = data["images/mask_count"].astype(np.int64)
    if (count < 0).any() or (start != np.cumsum(count) - count).any() or count.sum() != m:
        return "fields images/mask_start and images/mask_count do not tile masks/* (corrupt)"
    if not np.isin(data["images/status"], (0, 1, 2)).all():
        return "field images/status holds an unknown status"
    return ""


def find_problem(f: h5py.File, num_images: int, num_masks: int) -> str:
    """One line describing what is wrong with an open shard ("" when it is intact): a missing
    or unreadable dataset, a checksum mismatch, or a broken structure."""
    data = {}
    for name in DATASETS:
        values, problem = _read(f, name)
        if problem:
            return problem
        stored = f[name].attrs.get(CHECKSUM_ATTR)
        if stored is not None:
            stored = stored.decode() if isinstance(stored, bytes) else str(stored)
            if digest(values) != stored:
                return f"field {name} does not match its checksum (the file is damaged)"
        data[name] = values
    return _structure_problem(data, num_images, num_masks)
