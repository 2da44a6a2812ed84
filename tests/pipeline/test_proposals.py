"""The proposals driver: plan, fingerprint, resume after SIGKILL, overwrite, bad inputs, Ray.

A tiny random DINOv2 ViT-S/14 is saved once as a checkpoint so every process (pytest, a CLI
subprocess, Ray actors) loads the same weights; images are 28-100 px.
"""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import cv2
import h5py
import numpy as np
import pytest
import torch
from PIL import Image

from pipeline.cli import main as cli_main
from pipeline.config import ProposalConfig
from pipeline.executors.worker import ProposalWorker
from pipeline.inputs.listing import ImageItem, list_images
from pipeline.shards.plan import compute_fingerprint, make_plan, plan_hash, result_settings
from pipeline.shards.schema import (
    STATUS_EMPTY,
    STATUS_OK,
    STATUS_UNREADABLE,
    list_shards,
    list_temp_files,
    read_meta,
    shard_name,
)
from pipeline.shards.shard_reader import ShardReader

ROOT = Path(__file__).resolve().parents[2]
COMMANDS = {"proposals": "pipeline.executors.proposals"}


@pytest.fixture(scope="module")
def weights(tmp_path_factory) -> Path:
    from pipeline.backbones.vit import DinoV2ViTS14

    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("weights") / "vits14.pth"
    torch.save(DinoV2ViTS14(pos_grid=4).vit.state_dict(), path)
    return path


@pytest.fixture(autouse=True)
def one_thread():
    # Same thread count in this process, CLI subprocesses and Ray actors (see _env).
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _config(tmp: Path, weights: Path, **proposals) -> Path:
    settings = {
        "short_side": 56,
        "max_side": 84,
        "batch_size": 3,
        "shard_size": 2,
        "executor": "local",
        "workers": 1,
        "prefetch": 1,
        # random weights score low; keep enough masks to exercise RLE and seeds
        "score_threshold": 0.3,
        "min_center_y": 0.0,
        "max_box_width": 1.0,
    }
    settings.update(proposals)
    lines = [
        'name = "tiny"',
        "[backbone]",
        'kind = "dinov2_vits14"',
        f'weights = "{weights}"',
        "[proposals]",
    ]
    lines += [f"{k} = {json.dumps(v)}" for k, v in settings.items()]
    path = tmp / f"tiny-{len(list(tmp.glob('tiny-*.toml')))}.toml"
    path.write_text("\n".join(lines) + "\n")
    return path


def _images(folder: Path, n: int, seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        h, w = int(rng.integers(40, 100)), int(rng.integers(40, 100))
        img = np.full((h, w, 3), rng.integers(0, 255, 3), np.uint8)
        y, x = int(rng.integers(0, h // 2)), int(rng.integers(0, w // 2))
        img[y : y + h // 2, x : x + w // 2] = rng.integers(0, 255, 3)  # one "object"
        cv2.imwrite(str(folder / f"img_{i:03d}.png"), img)
    return folder


def _run(config: Path, images: Path, out: Path, *extra: str) -> int:
    return cli_main(
        "pipeline",
        COMMANDS,
        ["proposals", "--config", str(config), "--images", str(images), "--out", str(out), *extra],
    )


def _datasets(path: Path) -> dict:
    found = {}
    with h5py.File(path, "r") as f:
        f.visititems(
            lambda name, obj: (
                found.__setitem__(name, obj[()]) if isinstance(obj, h5py.Dataset) else None
            )
        )
        attrs = {k: (v.item() if isinstance(v, np.generic) else v) for k, v in f.attrs.items()}
    return {"datasets": found, "attrs": attrs}


def _assert_same_shards(a: Path, b: Path) -> None:
    sa, sb = list_shards(a), list_shards(b)
    assert [p.name for p in sa] == [p.name for p in sb] and sa
    for pa, pb in zip(sa, sb):
        da, db = _datasets(pa), _datasets(pb)
        assert da["attrs"] == db["attrs"], pa.name
        assert da["datasets"].keys() == db["datasets"].keys()
        for name in da["datasets"]:
            x, y = da["datasets"][name], db["datasets"][name]
            assert x.dtype == y.dtype and x.shape == y.shape, (pa.name, name)
            if x.dtype.kind == "O":
                assert x.tolist() == y.tolist(), (pa.name, name)
            else:
                assert x.tobytes() == y.tobytes(), (pa.name, name)


def _env() -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    return env


# --------------------------------------------------------------------------------------------


def test_plan_is_deterministic(tmp_path):
    folder = _images(tmp_path / "imgs", 7)
    items = list_images(folder)
    plan = make_plan(items, 3)
    assert [[it.file_name for it in s] for s in plan] == [
        ["img_000.png", "img_001.png", "img_002.png"],
        ["img_003.png", "img_004.png", "img_005.png"],
        ["img_006.png"],
    ]
    assert plan_hash(plan) == plan_hash(make_plan(list_images(folder), 3))
    assert plan_hash(plan) != plan_hash(make_plan(items, 2))
    assert plan_hash(plan) != plan_hash(make_plan(items[:6], 3))
    renamed = [ImageItem(it.file_name, it.image_id + 1, it.path) for it in items]
    assert plan_hash(plan) != plan_hash(make_plan(renamed, 3))


def test_fingerprint_tracks_results_only():
    base = ProposalConfig()
    fp = compute_fingerprint("dinov2_vits14", "w1", base)
    for knob in ("batch_size", "shard_size", "workers", "prefetch"):
        other = dataclasses.replace(base, **{knob: getattr(base, knob) + 1})
        assert compute_fingerprint("dinov2_vits14", "w1", other) == fp, knob
    other = dataclasses.replace(base, executor="local", images="x", out="y")
    assert compute_fingerprint("dinov2_vits14", "w1", other) == fp
    for changed in ({"top_k": 5}, {"score_threshold": 0.5}, {"scales": [1.0]}, {"short_side": 400}):
        other = dataclasses.replace(base, **changed)
        assert compute_fingerprint("dinov2_vits14", "w1", other) != fp, changed
    assert compute_fingerprint("dinov2_vits14", "w2", base) != fp
    assert compute_fingerprint("resnet50", "w1", base) != fp
    assert "batch_size" not in result_settings(base) and "top_k" in result_settings(base)


def test_killed_run_resumes_to_the_same_shards(tmp_path, weights):
    images = _images(tmp_path / "imgs", 16)
    config = _config(tmp_path, weights)
    killed = tmp_path / "killed"
    cmd = [
        sys.executable,
        "-m",
        "pipeline",
        "proposals",
        "--config",
        str(config),
        "--images",
        str(images),
        "--out",
        str(killed),
        "--executor",
        "local",
    ]
    proc = subprocess.Popen(
        cmd, cwd=ROOT, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )
    first = killed / shard_name(0)
    deadline = time.monotonic() + 120
    while not first.exists():
        assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
        assert time.monotonic() < deadline, "no shard appeared"
        time.sleep(0.002)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    proc.stderr.close()
    left = list_shards(killed)
    assert 1 <= len(left) < 8, "the run should have been killed part-way"
    stat0 = first.stat()

    assert _run(config, images, killed) == 0  # resume
    summary = json.loads((killed / "summary.json").read_text())
    assert 0 in summary["skipped_shards"] and 0 not in summary["computed_shards"]
    assert sorted(summary["skipped_shards"] + summary["computed_shards"]) == list(range(8))
    assert len(summary["skipped_shards"]) == len(left)
    assert first.stat().st_ino == stat0.st_ino and first.stat().st_mtime_ns == stat0.st_mtime_ns
    assert list_temp_files(killed) == []
    assert summary["images"] == 16 and summary["failed_shards"] == {}

    whole = tmp_path / "whole"
    assert _run(config, images, whole) == 0
    _assert_same_shards(killed, whole)
    total = summary["ok"] + summary["empty"]
    assert total == 16 and summary["ok"] > 0 and summary["masks"] > 0

    # A third run recomputes nothing.
    assert _run(config, images, whole) == 0
    again = json.loads((whole / "summary.json").read_text())
    assert again["computed_shards"] == [] and len(again["skipped_shards"]) == 8


def test_mismatch_is_refused_and_overwrite_replaces(tmp_path, weights, capsys):
    images = _images(tmp_path / "imgs", 4)
    out = tmp_path / "out"
    assert _run(_config(tmp_path, weights), images, out, "--limit", "3") == 0
    capsys.readouterr()

    other = _config(tmp_path, weights, top_k=3)  # a result-changing setting
    assert _run(other, images, out) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--overwrite" in err and "fingerprint" in err
    assert "Traceback" not in err

    same = _config(tmp_path, weights)  # same settings, other shard size: another plan
    assert _run(same, images, out, "--set", "proposals.shard_size=3") == 2
    err = capsys.readouterr().err.strip()
    assert "different image list or shard_size" in err and len(err.splitlines()) == 1

    # Growing --limit keeps the shards that still match the plan (shard 0) and adds the rest.
    assert _run(same, images, out, "--limit", "4") == 2  # shard 1 held 1 image, now 2
    capsys.readouterr()

    stale = out / (shard_name(5) + ".123.tmp")  # as a killed writer leaves it
    stale.write_bytes(b"half a shard")
    assert _run(other, images, out, "--overwrite") == 0
    assert not stale.exists()
    fp = read_meta(out / shard_name(0))["fingerprint"]
    assert json.loads((out / "plan.json").read_text())["fingerprint"] == fp
    assert json.loads(read_meta(out / shard_name(0))["settings"])["top_k"] == 3
    assert json.loads((out / "summary.json").read_text())["computed_shards"] == [0, 1]


def test_limit_growth_reuses_matching_shards(tmp_path, weights):
    images = _images(tmp_path / "imgs", 5)
    config = _config(tmp_path, weights)
    out = tmp_path / "out"
    assert _run(config, images, out, "--limit", "2") == 0
    assert _run(config, images, out) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["skipped_shards"] == [0] and summary["computed_shards"] == [1, 2]


def test_every_bad_input_is_recorded(tmp_path, weights):
    folder = tmp_path / "bad"
    folder.mkdir()
    rng = np.random.default_rng(3)
    good = rng.integers(0, 255, (60, 80, 3), np.uint8)
    cv2.imwrite(str(folder / "good.png"), good)
    ok, buf = cv2.imencode(".jpg", good)
    (folder / "truncated.jpg").write_bytes(buf.tobytes()[: len(buf) // 2])
    (folder / "zero.jpg").write_bytes(b"")
    (folder / "text.png").write_text("this is not an image\n")
    Image.fromarray(good[..., 0]).save(folder / "gray.png")
    Image.fromarray(np.dstack([good, np.full((60, 80), 128, np.uint8)])).save(folder / "rgba.png")
    cv2.imwrite(str(folder / "deep16.png"), (good.astype(np.uint16) * 257))
    Image.fromarray(good).convert("CMYK").save(folder / "cmyk.jpg")
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise when displayed
    Image.fromarray(good).save(folder / "rotated.jpg", exif=exif.tobytes())
    cv2.imwrite(str(folder / "tiny.png"), good[:9, :12])
    big = cv2.resize(good, (1600, 1200), interpolation=cv2.INTER_LINEAR)
    cv2.imwrite(str(folder / "large.jpg"), big)

    out = tmp_path / "out"
    assert _run(_config(tmp_path, weights, shard_size=4), folder, out) == 0
    records = {r.file_name: r for p in list_shards(out) for r in ShardReader(p).records()}
    assert len(records) == 11
    unreadable = {k: r.error for k, r in records.items() if r.status == STATUS_UNREADABLE}
    assert set(unreadable) == {"truncated.jpg", "zero.jpg", "text.png", "tiny.png"}
    assert all(unreadable.values())
    assert "zero-byte" in unreadable["zero.jpg"] and "small" in unreadable["tiny.png"]
    for name in ("good.png", "gray.png", "rgba.png", "deep16.png", "cmyk.jpg", "large.jpg"):
        assert records[name].status in (STATUS_OK, STATUS_EMPTY), name
    assert (records["good.png"].height, records["good.png"].width) == (60, 80)
    assert (records["rotated.jpg"].height, records["rotated.jpg"].width) == (80, 60)
    assert (records["large.jpg"].height, records["large.jpg"].width) == (1200, 1600)
    for r in records.values():  # masks decode at the original size
        assert r.decode_masks().shape == (r.num_masks, r.height, r.width)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["unreadable"] == 4 and summary["images"] == 11
    assert sorted(n for n, _ in summary["unreadable_files"]) == sorted(unreadable)


def test_coco_json_input_keeps_ids(tmp_path, weights):
    images = _images(tmp_path / "imgs", 3)
    coco = {
        "images": [
            {"id": 100 + i, "file_name": f"img_{i:03d}.png", "height": 0, "width": 0}
            for i in (2, 0, 1)
        ],
        "annotations": [],
        "categories": [],
    }
    ann = tmp_path / "train.json"
    ann.write_text(json.dumps(coco))
    out = tmp_path / "out"
    config = _config(tmp_path, weights)
    assert (
        cli_main(
            "pipeline",
            COMMANDS,
            [
                "proposals",
                "--config",
                str(config),
                "--images",
                str(ann),
                "--image-root",
                str(images),
                "--out",
                str(out),
            ],
        )
        == 0
    )
    ids = [r.image_id for p in list_shards(out) for r in ShardReader(p).records()]
    assert ids == [100, 101, 102]
    assert (out / "config.toml").is_file() and (out / "version.json").is_file()


def test_failed_shard_is_reported_not_dropped(tmp_path, weights, monkeypatch, capsys):
    from pipeline.executors import dispatch as executors

    real = ProposalWorker.process_shard
    calls = []

    def flaky(self, index, items, on_batch=None):
        calls.append(index)
        if index == 1:
            raise RuntimeError("simulated failure")
        return real(self, index, items, on_batch)

    monkeypatch.setattr(ProposalWorker, "process_shard", flaky)
    images = _images(tmp_path / "imgs", 6)
    out = tmp_path / "out"
    assert _run(_config(tmp_path, weights), images, out) == 1
    assert calls.count(1) == 1 + executors.MAX_RETRIES
    summary = json.loads((out / "summary.json").read_text())
    assert summary["failed_shards"] == {"1": "RuntimeError: simulated failure"}
    assert summary["computed_shards"] == [0, 2]
    assert [p.name for p in list_shards(out)] == [shard_name(0), shard_name(2)]
    assert "shard 1 failed" in capsys.readouterr().err


@pytest.mark.parametrize("kind", ["missing", "empty"])
def test_missing_or_empty_input_is_one_line(tmp_path, weights, kind, capsys):
    source = tmp_path / "nothing"
    if kind == "empty":
        source.mkdir()
        (source / "notes.txt").write_text("no images here")
    # The dispatcher (as `python -m pipeline` runs it) turns the error into one line and exit 2.
    assert _run(_config(tmp_path, weights), source, tmp_path / "o") == 2
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err, err
    assert lines[0].startswith("pipeline proposals: error:") and str(source) in lines[0]
    assert not (tmp_path / "o").exists()


class DiesOnce(ProposalWorker):
    """A worker whose process exits the first time it is given shard 1's first batch."""

    def process_batch(self, items):
        marker = self.out_dir / "died-once"
        if items[0].file_name == "img_002.png" and not marker.exists():
            marker.write_text("x")
            os._exit(1)
        return super().process_batch(items)


@pytest.mark.ray
def test_ray_matches_local_and_survives_a_dead_actor(tmp_path, weights, monkeypatch):
    pytest.importorskip("ray")
    from pipeline.executors import dispatch as executors
    from pipeline.executors import proposals
    from pipeline.executors.ray_cluster import ray_init

    images = _images(tmp_path / "imgs", 8)
    config = _config(tmp_path, weights)
    assert _run(config, images, tmp_path / "local", "--executor", "local") == 0
    # The CLI's Ray path, with actors whose process exits on their first try at shard 1: the
    # dead actor is replaced and the batch retried on a live one. The command looks run_ray up
    # in pipeline.executors.proposals, so that is where it is swapped.
    real = executors.run_ray
    monkeypatch.setattr(proposals, "run_ray", lambda *a, **k: real(*a, worker_cls=DiesOnce, **k))
    ray, started = ray_init(num_cpus=2)  # 2 actors x 1 thread, like this process
    try:
        out = tmp_path / "ray"
        assert _run(config, images, out, "--executor", "ray", "--workers", "2") == 0
    finally:
        if started:
            ray.shutdown()
    assert (out / "died-once").exists()
    _assert_same_shards(tmp_path / "local", out)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["computed_shards"] == [0, 1, 2, 3] and summary["failed_shards"] == {}
