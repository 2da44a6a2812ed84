"""Work units of the Ray executor and how its actors share a machine (no Ray started here)."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest

from pipeline.executors.ray_cluster import CPU_THREADS_PER_ACTOR, plan_actors
from pipeline.executors.work_units import Piece, ShardAssembler, shard_batches, shard_pieces
from pipeline.inputs.listing import ImageItem
from pipeline.shards.plan import make_plan
from pipeline.shards.schema import ImageRecord


def _items(n: int) -> list[ImageItem]:
    return [ImageItem(f"img_{i:03d}.png", i, Path(f"/x/img_{i:03d}.png")) for i in range(n)]


def _record(item: ImageItem) -> ImageRecord:
    return ImageRecord(item.file_name, item.image_id, 0, 0, 2, "unreadable")


def _pieces(jobs, batch_size, by_shape=False):
    return [p for job in jobs for p in shard_pieces(job, batch_size, by_shape)]


def test_pieces_are_the_local_workers_batches():
    jobs = list(enumerate(make_plan(_items(10), 4)))  # shards of 4, 4, 2
    pieces = _pieces(jobs, 3)
    # Without grouping by shape (a ResNet, whose border cells see the batch padding): per shard,
    # batch_size consecutive images from the shard's start, as process_shard forms them.
    assert [(p.shard, p.positions) for p in pieces] == [
        (0, (0, 1, 2)), (0, (3,)), (1, (0, 1, 2)), (1, (3,)), (2, (0, 1)),
    ]  # fmt: skip
    assert [it for p in pieces for it in p.items] == _items(10)


def _image(path: Path, width: int, height: int) -> None:
    cv2.imwrite(str(path), np.zeros((height, width, 3), np.uint8))


def test_batches_group_like_shapes(tmp_path):
    # landscape 3:2, portrait 2:3, landscape 4:3, an unreadable file, portrait 2:3, landscape 3:2
    shapes = [(60, 40), (40, 60), (40, 30), None, (40, 60), (60, 40)]
    items = []
    for i, shape in enumerate(shapes):
        path = tmp_path / f"img_{i}.png"
        if shape is None:
            path.write_bytes(b"not an image")
        else:
            _image(path, *shape)
        items.append(ImageItem(path.name, i, path))
    batches = shard_batches(items, 2, by_shape=True)
    # landscape by aspect (4:3 before the two 3:2, stable), then portrait, unknown sizes last
    assert batches == [(2, 0), (5, 1), (4, 3)]
    assert shard_batches(items, 2, by_shape=False) == [(0, 1), (2, 3), (4, 5)]
    assert sorted(i for b in batches for i in b) == list(range(6))


def test_one_shard_still_gives_every_actor_work():
    jobs = list(enumerate(make_plan(_items(32), 64)))  # the case: 1 shard, 2 actors
    assert len(jobs) == 1 and len(_pieces(jobs, 8)) == 4


def test_assembler_orders_pieces_whatever_the_arrival():
    jobs = [(0, _items(7))]
    # batches that are not consecutive, as grouping by shape makes them
    pieces = [
        Piece(0, pos, tuple(jobs[0][1][i] for i in pos)) for pos in [(3, 0), (6, 1), (2, 5), (4,)]
    ]
    asm = ShardAssembler(jobs)
    for p in reversed(pieces[1:]):
        assert asm.add(p, [_record(it) for it in p.items]) is None
    assert asm.pending() == 1
    whole = asm.add(pieces[0], [_record(it) for it in pieces[0].items])
    assert [r.file_name for r in whole] == [it.file_name for it in _items(7)]
    assert asm.pending() == 0
    with pytest.raises(ValueError):
        asm.add(pieces[0], [])


@pytest.mark.parametrize(
    "cpus, gpus, workers, node_cpus, threads, decode, gpu",
    [
        (2, 0, 1, None, (2,), (None,), 0),  # one actor takes every core
        (2, 0, 2, None, (1, 1), (None, None), 0),
        (2, 0, 8, None, (1, 1), (None, None), 0),  # never more actors than cores
        (3, 0, 2, None, (2, 1), (None, None), 0),  # the odd core is not left idle
        (2, 0, 0, None, (2,), (None,), 0),  # 0: from the machine
        (16, 0, 0, None, (4, 4, 4, 4), (None,) * 4, 0),
        (32, 0, 1, 8, (8,), (None,), 0),  # a share never exceeds one node
        (16, 4, 2, None, (4, 4, 4, 4), (4, 4, 4, 4), 1),  # one per GPU, CPUs decode
        (2, 4, 1, None, (1, 1, 1, 1), (1, 1, 1, 1), 1),
    ],
)
def test_thread_share_follows_config_and_machine(
    cpus, gpus, workers, node_cpus, threads, decode, gpu
):
    plan = plan_actors(cpus, gpus, workers, node_cpus)
    assert plan.cpus == threads and plan.decode_threads == decode and plan.gpus == gpu
    assert plan.actors == len(threads)


def test_automatic_cpu_actors_scale_with_cores():
    assert plan_actors(CPU_THREADS_PER_ACTOR * 3, 0, 0).actors == 3
    assert plan_actors(1, 0, 0).cpus == (1,)
