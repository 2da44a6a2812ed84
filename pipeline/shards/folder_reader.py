"""Reading a folder of proposal shards for the inspector's tools: the shard list, every record in
order (with an optional progress bar), unique image ids, and mask areas straight from the RLE.

Shared by the summary (``pipeline.inspection.summary``), the rendering
(``pipeline.inspection.render``), the COCO export (``pipeline.inspection.coco_export``) and the
recall (``pipeline.inspection.recall``).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
from pycocotools import mask as mask_utils
from tqdm import tqdm

from pipeline.cli import UserError
from pipeline.shards.schema import ImageRecord, list_shards, list_temp_files, read_meta
from pipeline.shards.shard_reader import ShardReader


def shard_paths(shard_dir: str | Path) -> list[Path]:
    """The final shard files of ``shard_dir``; UserError when the folder or shards are missing."""
    folder = Path(shard_dir)
    if not folder.is_dir():
        raise UserError(f"shard folder not found: {folder}")
    paths = list_shards(folder)
    if not paths:
        temps = list_temp_files(folder)
        extra = f" ({len(temps)} unfinished temporary file(s) only)" if temps else ""
        raise UserError(f"no shard files (shard-NNNNN.h5) in {folder}{extra}")
    for p in paths:
        read_meta(p)  # ShardError (one line) on an unknown schema version or a non-shard file
    return paths


def iter_records(paths: Sequence[Path], desc: str = "") -> Iterator[tuple[Path, int, ImageRecord]]:
    """(shard path, index in shard, record) for every image of every shard, in shard order.
    ``desc``: show a progress bar with this label (on a terminal only)."""
    total = sum(int(read_meta(p)["num_images"]) for p in paths) if desc else None
    with tqdm(
        total=total,
        desc=desc,
        unit="img",
        leave=False,
        dynamic_ncols=True,
        disable=None if desc else True,
    ) as bar:
        for path in paths:
            with ShardReader(path) as reader:
                for i, rec in enumerate(reader.records()):
                    yield path, i, rec
                    bar.update(1)


def mask_areas(rec: ImageRecord) -> np.ndarray:
    """(K,) pixel areas of the record's masks, straight from the RLE (no decoding)."""
    if not rec.rles:
        return np.zeros(0, np.float64)
    return np.asarray(mask_utils.area(rec.rle_dicts()), np.float64)


def iter_unique(paths: Sequence[Path], desc: str = "") -> Iterator[ImageRecord]:
    """Every record, one at a time (all seeds of a big set would not fit in memory); UserError
    when two images share an image_id (COCO files need unique ids)."""
    seen: dict[int, str] = {}
    for _, _, rec in iter_records(paths, desc):
        if rec.image_id in seen:
            raise UserError(
                f"image_id {rec.image_id} appears twice ({seen[rec.image_id]} and "
                f"{rec.file_name}); shards from different runs mixed in one folder?"
            )
        seen[rec.image_id] = rec.file_name
        yield rec
