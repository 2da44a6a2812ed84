"""The shard format: write-read round trip, dtypes, empty shards, refusal of unknown versions."""

from __future__ import annotations

import pickle

import h5py
import numpy as np
import pytest
from pycocotools import mask as mask_utils

from pipeline.shards.schema import (
    SCHEMA_VERSION,
    STATUS_EMPTY,
    STATUS_OK,
    STATUS_UNREADABLE,
    ImageRecord,
    ShardError,
    list_shards,
    list_temp_files,
    read_meta,
    shard_name,
    temp_name,
    write_shard,
)
from pipeline.shards.shard_reader import ShardReader

C = 6
META = {
    "fingerprint": "f" * 64,
    "backbone": "dinov2_vits14",
    "feature_stride": 14,
    "embed_dim": C,
    "settings": {"top_k": 20, "scales": [1.0, 0.5]},
}


def _ok_record(
    rng: np.random.Generator, name: str, image_id: int, k: int, h: int = 11, w: int = 17
) -> tuple[ImageRecord, np.ndarray]:
    masks = (rng.random((k, h, w)) > 0.6).astype(np.uint8)
    rles = [mask_utils.encode(np.asfortranarray(m))["counts"] for m in masks]
    seeds = rng.standard_normal((k, C)).astype(np.float32)
    seeds /= np.linalg.norm(seeds, axis=1, keepdims=True)
    rec = ImageRecord(
        file_name=name,
        image_id=image_id,
        height=h,
        width=w,
        status=STATUS_OK,
        rles=rles,
        boxes=rng.random((k, 4)).astype(np.float32) * 10,
        scores=np.sort(rng.random(k).astype(np.float32))[::-1].copy(),
        seeds=seeds.astype(np.float16),
        seed_pos=rng.integers(0, 30, (k, 3)).astype(np.int16),
    )
    return rec, masks


def test_round_trip_all_fields(tmp_path):
    rng = np.random.default_rng(0)
    ok1, m1 = _ok_record(rng, "sub/a.jpg", 7, 3)
    ok2, m2 = _ok_record(rng, "b é.png", 9, 1, h=5, w=4)
    empty = ImageRecord("c.jpg", 11, 20, 30, STATUS_EMPTY)
    bad = ImageRecord("d.jpg", 12, 0, 0, STATUS_UNREADABLE, "truncated")
    records = [ok1, empty, bad, ok2]
    path = tmp_path / shard_name(3)
    write_shard(path, records, META)
    assert path.name == "shard-00003.h5"
    assert list_shards(tmp_path) == [path]
    assert list_temp_files(tmp_path) == []

    meta = read_meta(path)
    assert meta["schema_version"] == SCHEMA_VERSION
    assert meta["fingerprint"] == META["fingerprint"] and meta["backbone"] == "dinov2_vits14"
    assert meta["feature_stride"] == 14 and meta["embed_dim"] == C
    assert meta["num_images"] == 4 and meta["num_masks"] == 4
    assert meta["created_with"]
    # settings given as a dict are stored as sorted-key JSON
    assert meta["settings"] == '{"scales": [1.0, 0.5], "top_k": 20}'

    with h5py.File(path, "r") as f:  # the docs/architecture.md names and dtypes, exactly
        dtypes = {
            "images/image_id": np.int64,
            "images/height": np.int32,
            "images/width": np.int32,
            "images/mask_start": np.int64,
            "images/mask_count": np.int32,
            "images/status": np.uint8,
            "masks/box": np.float32,
            "masks/score": np.float32,
            "masks/seed": np.float16,
            "masks/seed_pos": np.int16,
        }
        for name, dt in dtypes.items():
            assert f[name].dtype == dt, name
        for name in ("images/file_name", "images/error"):
            assert h5py.check_string_dtype(f[name].dtype).encoding == "utf-8"
        assert h5py.check_string_dtype(f["masks/rle"].dtype) is not None
        assert f["masks/seed"].shape == (4, C) and f["masks/seed_pos"].shape == (4, 3)
        assert f["images/mask_start"][()].tolist() == [0, 3, 3, 3]
        assert f["images/mask_count"][()].tolist() == [3, 0, 0, 1]

    reader = ShardReader(path)
    assert len(reader) == 4
    got = list(reader.records())
    for want, have in zip(records, got):
        for key in ("file_name", "image_id", "height", "width", "status", "error", "rles"):
            assert getattr(have, key) == getattr(want, key), key
        assert have.boxes.dtype == np.float32 and have.scores.dtype == np.float32
        assert have.seeds.dtype == np.float16 and have.seed_pos.dtype == np.int16
        if want.num_masks:
            np.testing.assert_array_equal(have.boxes, want.boxes)
            np.testing.assert_array_equal(have.scores, want.scores)
            np.testing.assert_array_equal(have.seeds, want.seeds)
            np.testing.assert_array_equal(have.seed_pos, want.seed_pos)
    np.testing.assert_array_equal(got[0].decode_masks(), m1)
    np.testing.assert_array_equal(got[3].decode_masks(), m2)
    assert got[1].decode_masks().shape == (0, 20, 30)  # empty image: no mask, its size kept
    assert got[2].error == "truncated" and got[2].seeds.shape == (0, C)
    assert reader.image_table()["status"].tolist() == [0, 1, 2, 0]
    reader.close()


def test_reader_is_lazy_and_picklable(tmp_path):
    rng = np.random.default_rng(1)
    rec, masks = _ok_record(rng, "a.jpg", 0, 2)
    path = tmp_path / shard_name(0)
    write_shard(path, [rec], META)
    reader = ShardReader(path)
    assert reader._file is None  # nothing opened until first access
    assert len(reader) == 1 and reader._file is not None
    clone = pickle.loads(pickle.dumps(reader))  # works while the original holds a handle
    assert clone._file is None
    np.testing.assert_array_equal(clone.record(0).decode_masks(), masks)
    with pytest.raises(IndexError):
        clone.record(1)
    clone.close()
    reader.close()


def test_empty_shard(tmp_path):
    path = tmp_path / shard_name(1)
    write_shard(path, [], META)
    reader = ShardReader(path)
    assert len(reader) == 0 and list(reader.records()) == []
    assert reader.meta["num_masks"] == 0
    with h5py.File(path, "r") as f:
        assert f["masks/seed"].shape == (0, C) and f["masks/rle"].shape == (0,)


def test_all_images_without_masks(tmp_path):
    path = tmp_path / shard_name(0)
    records = [
        ImageRecord("a.jpg", 0, 4, 5, STATUS_EMPTY),
        ImageRecord("b.jpg", 1, 0, 0, STATUS_UNREADABLE, "zero-byte file"),
    ]
    write_shard(path, records, META)
    got = list(ShardReader(path).records())
    assert [r.status for r in got] == [STATUS_EMPTY, STATUS_UNREADABLE]
    assert got[1].error == "zero-byte file" and got[0].decode_masks().shape == (0, 4, 5)


def test_unknown_schema_version_refused(tmp_path):
    path = tmp_path / shard_name(0)
    write_shard(path, [], META)
    with h5py.File(path, "a") as f:
        f.attrs["schema_version"] = np.int64(SCHEMA_VERSION + 1)
    with pytest.raises(ShardError, match="schema version 2 is not supported"):
        read_meta(path)
    with pytest.raises(ShardError, match="schema version"):
        len(ShardReader(path))


def test_not_a_shard_and_corrupt_file(tmp_path):
    plain = tmp_path / "plain.h5"
    with h5py.File(plain, "w") as f:
        f["x"] = 1
    with pytest.raises(ShardError, match="not a proposals shard"):
        read_meta(plain)
    junk = tmp_path / shard_name(2)
    junk.write_bytes(b"not hdf5 at all")
    with pytest.raises(ShardError, match="cannot open"):
        read_meta(junk)
    with pytest.raises(ShardError, match="not found"):
        read_meta(tmp_path / "missing.h5")


def test_failed_write_leaves_no_file(tmp_path):
    rng = np.random.default_rng(2)
    rec, _ = _ok_record(rng, "a.jpg", 0, 2)
    rec.seeds = rec.seeds[:, :3]  # wrong width: refused before anything is written
    with pytest.raises(ValueError, match="seeds"):
        write_shard(tmp_path / shard_name(0), [rec], META)
    bad_status = ImageRecord("b.jpg", 0, 3, 3, STATUS_OK)  # "ok" without a mask
    with pytest.raises(ValueError, match="status"):
        write_shard(tmp_path / shard_name(0), [bad_status], META)
    assert list(tmp_path.iterdir()) == []


def test_listing_ignores_temp_files(tmp_path):
    write_shard(tmp_path / shard_name(10), [], META)
    write_shard(tmp_path / shard_name(2), [], META)
    stale = temp_name(tmp_path / shard_name(3))
    stale.write_bytes(b"partial")
    (tmp_path / "plan.json").write_text("{}")
    assert [p.name for p in list_shards(tmp_path)] == ["shard-00002.h5", "shard-00010.h5"]
    assert list_temp_files(tmp_path) == [stale]


def test_identical_input_gives_identical_bytes(tmp_path):
    rng = np.random.default_rng(3)
    rec, _ = _ok_record(rng, "a.jpg", 0, 4)
    write_shard(tmp_path / "x" / shard_name(0), [rec], META)
    write_shard(tmp_path / "y" / shard_name(0), [rec], META)
    a = (tmp_path / "x" / shard_name(0)).read_bytes()
    b = (tmp_path / "y" / shard_name(0)).read_bytes()
    assert a == b
