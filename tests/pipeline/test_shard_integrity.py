"""Shard integrity: per-dataset checksums and structure checks, on read and before a re-run
counts a shard as done (only a damaged shard is recomputed)."""

from __future__ import annotations

from pathlib import Path

import h5py
import numpy as np
import pytest
from pycocotools import mask as mask_utils

from pipeline.executors.proposals import prepare_out
from pipeline.inputs.listing import ImageItem
from pipeline.shards.integrity import CHECKSUM_ATTR, DATASETS
from pipeline.shards.plan import make_plan
from pipeline.shards.schema import (
    STATUS_OK,
    ImageRecord,
    ShardError,
    list_shards,
    shard_name,
    verify_shard,
    write_shard,
)
from pipeline.shards.shard_reader import ShardReader

C = 4
FINGERPRINT = "a" * 64
META = {
    "fingerprint": FINGERPRINT,
    "backbone": "dinov2_vits14",
    "feature_stride": 14,
    "embed_dim": C,
    "settings": {},
}


def _record(name: str, image_id: int, k: int = 2) -> ImageRecord:
    rng = np.random.default_rng(image_id)
    masks = (rng.random((k, 9, 7)) > 0.5).astype(np.uint8)
    return ImageRecord(
        file_name=name,
        image_id=image_id,
        height=9,
        width=7,
        status=STATUS_OK,
        rles=[mask_utils.encode(np.asfortranarray(m))["counts"] for m in masks],
        boxes=np.zeros((k, 4), np.float32),
        scores=np.full(k, 0.9, np.float32),
        seeds=rng.standard_normal((k, C)).astype(np.float16),
        seed_pos=np.zeros((k, 3), np.int16),
    )


def _shard(tmp_path: Path, index: int = 0, names=("a.png", "b.png")) -> Path:
    path = tmp_path / shard_name(index)
    write_shard(path, [_record(n, 2 * index + i) for i, n in enumerate(names)], META)
    return path


def test_every_dataset_carries_a_checksum_and_verifies(tmp_path):
    path = _shard(tmp_path)
    with h5py.File(path, "r") as f:
        assert all(f[name].attrs[CHECKSUM_ATTR].startswith("sha256:") for name in DATASETS)
    assert verify_shard(path)["num_images"] == 2


def test_bit_rot_in_a_dataset_names_the_field(tmp_path):
    path = _shard(tmp_path)
    with h5py.File(path, "r+") as f:
        f["masks/seed"][0, 0] = np.float16(123.0)  # content changed, checksum attribute not
    with pytest.raises(ShardError, match="shard-00000.h5: field masks/seed does not match"):
        verify_shard(path)
    with pytest.raises(ShardError, match="masks/seed"):  # a reader refuses it on first access
        ShardReader(path).record(0)


def test_a_dropped_dataset_names_the_field(tmp_path):
    path = _shard(tmp_path)
    with h5py.File(path, "r+") as f:
        del f["masks/seed"]
    with pytest.raises(ShardError, match="field masks/seed is missing"):
        ShardReader(path).image_table()


def _strip_checksums(path: Path) -> None:
    """A shard as written before checksums existed."""
    with h5py.File(path, "r+") as f:
        for name in DATASETS:
            del f[name].attrs[CHECKSUM_ATTR]


def test_integer_rle_and_corrupt_mask_start_fail_without_checksums(tmp_path):
    path = _shard(tmp_path)
    _strip_checksums(path)
    assert verify_shard(path)["num_masks"] == 4  # an old intact shard still reads
    with h5py.File(path, "r+") as f:
        f["images/mask_start"][1] = 3  # image 1's masks would start past the first image's
    with pytest.raises(ShardError, match="mask_start and images/mask_count do not tile"):
        verify_shard(path)
    path = _shard(tmp_path, 1)
    _strip_checksums(path)
    with h5py.File(path, "r+") as f:
        del f["masks/rle"]
        f.create_dataset("masks/rle", data=np.arange(4, dtype=np.int64))
    with pytest.raises(ShardError, match="masks/rle holds int64 values, not strings"):
        verify_shard(path)


def test_a_rerun_recomputes_only_the_damaged_shard(tmp_path, capsys):
    names = ["a.png", "b.png", "c.png", "d.png"]
    items = [ImageItem(n, i, tmp_path / n) for i, n in enumerate(names)]
    plan = make_plan(items, 2)
    out = tmp_path / "proposals"
    for index, shard in enumerate(plan):
        records = [_record(it.file_name, it.image_id) for it in shard]
        write_shard(out / shard_name(index), records, META)
    with h5py.File(out / shard_name(1), "r+") as f:
        f["masks/score"][0] = 0.1
    done = prepare_out(out, plan, 2, FINGERPRINT, overwrite=False)
    assert done == {0}
    assert [p.name for p in list_shards(out)] == [shard_name(0)]
    assert (
        "shard-00001.h5: field masks/score does not match its checksum" in capsys.readouterr().err
    )
