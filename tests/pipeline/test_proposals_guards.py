"""The proposals command guards its folder and its inputs: --overwrite keeps the old shards until
a new run finished, a run that read no image fails, Ray gets absolute image paths."""

from __future__ import annotations

import json
import os
import socket

import pytest

from pipeline import proposals
from pipeline.overwrite_staging import STAGING
from pipeline.shards import list_shards, read_meta, shard_name
from tests.pipeline import test_proposals
from tests.pipeline.test_proposals import _config, _images, _run

weights = test_proposals.weights  # the same tiny random ViT checkpoint fixture


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_overwrite_keeps_old_shards_when_the_run_cannot_start(tmp_path, weights, monkeypatch):
    pytest.importorskip("ray")
    images = _images(tmp_path / "imgs", 4)
    out = tmp_path / "out"
    assert _run(_config(tmp_path, weights), images, out) == 0
    before = {p.name: p.stat().st_ino for p in list_shards(out)}
    plan = (out / "plan.json").read_text()

    monkeypatch.setenv("RAY_ADDRESS", f"127.0.0.1:{_closed_port()}")  # Ray cannot start
    other = _config(tmp_path, weights, top_k=3)
    assert _run(other, images, out, "--overwrite", "--executor", "ray") == 2
    assert {p.name: p.stat().st_ino for p in list_shards(out)} == before
    assert (out / "plan.json").read_text() == plan and not (out / STAGING).exists()


def test_overwrite_replaces_only_after_the_new_run(tmp_path, weights, monkeypatch):
    images = _images(tmp_path / "imgs", 6)
    out = tmp_path / "out"
    assert _run(_config(tmp_path, weights), images, out) == 0  # shards 0, 1, 2
    seen = {}
    real = proposals.run_local

    def spy(worker, jobs, on_done, on_batch=None):  # what the folder holds while computing
        seen["shards"] = [p.name for p in list_shards(out)]
        seen["into"] = worker.out_dir
        return real(worker, jobs, on_done, on_batch)

    monkeypatch.setattr(proposals, "run_local", spy)
    other = _config(tmp_path, weights, top_k=3, shard_size=4)  # shards 0, 1
    assert _run(other, images, out, "--overwrite") == 0
    assert seen["shards"] == [shard_name(i) for i in range(3)]  # old ones kept meanwhile
    assert seen["into"] == out / STAGING
    assert [p.name for p in list_shards(out)] == [shard_name(0), shard_name(1)]
    assert json.loads(read_meta(out / shard_name(0))["settings"])["top_k"] == 3
    plan = json.loads((out / "plan.json").read_text())
    assert (
        plan["shard_size"] == 4
        and plan["fingerprint"] == read_meta(out / shard_name(1))["fingerprint"]
    )
    assert json.loads((out / "summary.json").read_text())["computed_shards"] == [0, 1]
    assert not (out / STAGING).exists()


def test_a_run_that_read_no_image_fails(tmp_path, weights, capsys):
    folder = tmp_path / "bad"
    folder.mkdir()
    for name in ("a.png", "b.jpg"):
        (folder / name).write_text("not an image\n")
    out = tmp_path / "out"
    assert _run(_config(tmp_path, weights), folder, out) == 2
    err = capsys.readouterr().err
    assert "no image could be read" in err and "a.png" in err and "Traceback" not in err


def test_ray_gets_absolute_image_paths(tmp_path, weights, monkeypatch):
    images = _images(tmp_path / "imgs", 3)
    seen = []

    def fake_run_ray(backbone_cfg, cfg, out, jobs, *args, **kwargs):
        seen.extend(it.path for _, items in jobs for it in items)
        return {}

    monkeypatch.setattr(proposals, "run_ray", fake_run_ray)
    monkeypatch.chdir(tmp_path)  # relative inputs, as a user types them
    config = _config(tmp_path, weights)
    _run(config, images.relative_to(tmp_path), tmp_path / "out", "--executor", "ray")
    assert len(seen) == 3 and all(p.is_absolute() for p in seen)
    assert all(os.path.isfile(p) for p in seen)
