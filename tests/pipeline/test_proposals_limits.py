"""Proposals honour the [data] image limits, and a full disk stops the run at once in one line."""

from __future__ import annotations

import errno

import pytest

from pipeline.executors.dispatch import run_local
from pipeline.shards.schema import STATUS_OK, STATUS_UNREADABLE, list_shards
from pipeline.shards.shard_reader import ShardReader
from tests.pipeline.test_proposals import _config, _images, _run, one_thread, weights  # noqa: F401


def _statuses(out):
    statuses, errors = [], []
    for path in list_shards(out):
        with ShardReader(path) as reader:
            table = reader.image_table()
            statuses += [int(s) for s in table["status"]]
            errors += [reader.record(i).error for i in range(len(table["status"]))]
    return statuses, errors


def test_proposals_take_the_pixel_limit_from_the_config(tmp_path, weights):  # noqa: F811
    images = _images(tmp_path / "images", 3)
    config = _config(tmp_path, weights)
    assert _run(config, images, tmp_path / "default") == 0
    assert all(s != STATUS_UNREADABLE for s in _statuses(tmp_path / "default")[0])
    # 40-100 px images are all above a 1,000-pixel limit: each is recorded unreadable, by header.
    small = ["--set", "data.max_image_pixels=1000"]
    assert _run(config, images, tmp_path / "limited", *small) == 2  # no image could be read
    statuses, errors = _statuses(tmp_path / "limited")
    assert statuses == [STATUS_UNREADABLE] * 3 and all("too large" in e for e in errors)
    assert STATUS_OK not in statuses


class _FullDisk:
    calls = 0

    def process_shard(self, index, items, on_batch=None):
        self.calls += 1
        raise OSError(errno.ENOSPC, "No space left on device", f"shard-{index:05d}.h5")


def test_a_full_disk_stops_local_proposals_without_retries():
    worker = _FullDisk()
    with pytest.raises(OSError) as caught:
        run_local(worker, [(0, ["a"]), (1, ["b"])], lambda summary: None)
    assert caught.value.errno == errno.ENOSPC
    assert worker.calls == 1  # no retry, and no next shard
