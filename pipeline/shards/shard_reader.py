"""Reading one shard: its records and per-image fields, opened lazily so a reader can be pickled
into DataLoader worker processes before use (each process opens its own handle)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from pipeline.shards.integrity import IMAGE_FIELDS
from pipeline.shards.schema import ImageRecord, ShardError, attrs_to_meta, open_shard, verify_shard


class ShardReader:
    """Reads one shard. Opens the file lazily on first access, so it can be pickled into
    DataLoader worker processes before use (each process then opens its own handle)."""

    _IMAGE_FIELDS = IMAGE_FIELDS  # the per-image datasets integrity checks

    def __init__(self, path: str | Path, verify: bool = True):
        self.path = Path(path)
        # Checksums are checked on first access; a copy pickled into a DataLoader worker skips
        # that (its parent checked the same file) and keeps the per-field read errors.
        self.verify = verify
        self._verified = False
        self._file: h5py.File | None = None
        self._meta: dict[str, Any] | None = None
        self._images: dict[str, np.ndarray] | None = None

    def _ensure(self) -> h5py.File:
        if self._file is None:
            if self.verify and not self._verified:
                verify_shard(self.path)
                self._verified = True
            f = open_shard(self.path)
            try:
                self._meta = attrs_to_meta(f.attrs, self.path)
                # The per-image index is small (N entries): keep it in memory.
                self._images = {k: f[f"images/{k}"][()] for k in self._IMAGE_FIELDS}
                for k in ("file_name", "error"):
                    self._images[k] = np.array(
                        [v.decode() if isinstance(v, bytes) else v for v in self._images[k]],
                        dtype=object,
                    )
            except KeyError as e:
                f.close()
                raise ShardError(f"{self.path}: missing field ({e})") from None
            except BaseException:
                f.close()
                raise
            self._file = f
        return self._file

    @property
    def meta(self) -> dict[str, Any]:
        self._ensure()
        assert self._meta is not None
        return dict(self._meta)

    def __len__(self) -> int:
        self._ensure()
        return int(self._meta["num_images"])

    def record(self, i: int) -> ImageRecord:
        """Image ``i`` of this shard with its masks (0 <= i < len)."""
        f = self._ensure()
        n = len(self)
        if not 0 <= i < n:
            raise IndexError(f"image {i} out of range for a shard of {n}")
        im = self._images
        start, count = int(im["mask_start"][i]), int(im["mask_count"][i])
        sl = slice(start, start + count)

        def masks(name: str) -> np.ndarray:
            try:
                return f[f"masks/{name}"][sl]
            except Exception as e:  # KeyError, OSError, ... from a damaged file
                first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
                raise ShardError(f"{self.path}: cannot read masks/{name} ({first})") from None

        return ImageRecord(
            file_name=str(im["file_name"][i]),
            image_id=int(im["image_id"][i]),
            height=int(im["height"][i]),
            width=int(im["width"][i]),
            status=int(im["status"][i]),
            error=str(im["error"][i]),
            rles=[bytes(c) for c in masks("rle")],
            boxes=masks("box"),
            scores=masks("score"),
            seeds=masks("seed"),
            seed_pos=masks("seed_pos"),
        )

    def image_table(self) -> dict[str, np.ndarray]:
        """The per-image index as arrays of length N (file_name, image_id, height, width,
        mask_start, mask_count, status, error), without reading any mask."""
        self._ensure()
        return {k: v.copy() for k, v in self._images.items()}

    def records(self) -> Iterator[ImageRecord]:
        for i in range(len(self)):
            yield self.record(i)

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
        self._file = None

    def __enter__(self) -> ShardReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __getstate__(self) -> dict[str, Any]:
        # An open h5py handle cannot cross processes; the copy reopens on first access.
        return {"path": self.path, "verify": self.verify and not self._verified}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(state["path"], state.get("verify", True))

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:  # interpreter shutdown: h5py may already be gone
            pass
