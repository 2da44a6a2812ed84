"""The Ray executor on a private 2-CPU cluster: same bytes as local at 1 and 2 workers, every
actor busy even with a single shard, progress per batch."""

from __future__ import annotations

import hashlib
import os

import pytest

from pipeline.config import load_pipeline_config
from pipeline.executors.worker import ProposalWorker
from pipeline.inputs.listing import list_images
from pipeline.shards.plan import make_plan
from pipeline.shards.schema import list_shards
from tests.pipeline import test_proposals
from tests.pipeline.test_proposals import _assert_same_shards, _config, _images, _run

weights = test_proposals.weights  # the same tiny random ViT checkpoint fixture
pytestmark = pytest.mark.ray


@pytest.fixture(scope="module")
def cluster():
    pytest.importorskip("ray")
    from pipeline.executors.ray_cluster import ray_init

    ray, started = ray_init(num_cpus=2)  # every test's run_ray reuses it
    yield ray
    if started:
        ray.shutdown()


class RecordsPid(ProposalWorker):
    """Leaves one file per actor process that computed a batch."""

    def process_batch(self, items):
        (self.out_dir / f"pid-{os.getpid()}").touch()
        return super().process_batch(items)


def _sha(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.mark.parametrize("workers", [1, 2])
def test_ray_writes_the_same_bytes_as_local(tmp_path, weights, cluster, workers):
    images = _images(tmp_path / "imgs", 7)
    config = _config(tmp_path, weights)  # shards of 2, batches of 3: pieces of 2 and 1
    assert _run(config, images, tmp_path / "local", "--executor", "local") == 0
    out = tmp_path / "ray"
    assert _run(config, images, out, "--executor", "ray", "--workers", str(workers)) == 0
    _assert_same_shards(tmp_path / "local", out)
    for a, b in zip(list_shards(tmp_path / "local"), list_shards(out)):
        assert _sha(a) == _sha(b), a.name  # whole files, not only their datasets


def test_one_shard_still_uses_every_actor(tmp_path, weights, cluster):
    from pipeline.executors.dispatch import run_ray

    images = _images(tmp_path / "imgs", 6)
    config = _config(tmp_path, weights, shard_size=6, batch_size=2)  # 1 shard, 3 batches
    cfg, _ = load_pipeline_config(config)
    jobs = list(enumerate(make_plan(list_images(images), 6)))
    fingerprint = ProposalWorker(cfg.backbone, cfg.proposals, tmp_path).fingerprint
    out = tmp_path / "ray"
    out.mkdir()
    done, batches, stats = [], [], {}
    failed = run_ray(
        cfg.backbone, cfg.proposals, out, jobs, 2, fingerprint, done.append, stats,
        worker_cls=RecordsPid, on_batch=lambda n, m: batches.append(n),
    )  # fmt: skip
    assert failed == {} and [s["index"] for s in done] == [0] and done[0]["images"] == 6
    assert stats["actors"] == 2 and stats["threads"] == [1, 1]
    assert len(list(out.glob("pid-*"))) == 2  # both actors computed batches of the one shard
    assert sorted(batches) == [2, 2, 2]  # the progress bar moves per batch
    assert _run(config, images, tmp_path / "local", "--executor", "local") == 0
    _assert_same_shards(tmp_path / "local", out)
