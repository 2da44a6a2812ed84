"""The frozen-feature cache: exact, a hit recomputes nothing, keys miss on any change, refusals,
and a SIGKILL while writing leaves no half entry."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from pipeline.backbones.build import build_backbone
from pipeline.cli import UserError
from pipeline.config import BackboneConfig
from tests.trainer.helpers import TINY_MODEL_SETTINGS, run_cli, train_records, write_tiny_coco
from tests.trainer.test_pretrain import _args, make_shards
from trainer.data.feature_cache import (
    ENTRY_SUFFIX,
    CachedDataset,
    FeatureStore,
    check_exact,
    frozen_inputs,
)
from trainer.data.frozen_features import FrozenFeatures, per_image_levels

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def vit():
    return build_backbone(BackboneConfig(kind="dinov2_vits14", weights="random"))


def _images(sizes, divisor=28, seed=0):
    """A zero-padded batch of random images of the given (h, w) sizes."""
    g = torch.Generator().manual_seed(seed)
    hp = -(-max(h for h, _ in sizes) // divisor) * divisor
    wp = -(-max(w for _, w in sizes) // divisor) * divisor
    batch = torch.zeros(len(sizes), 3, hp, wp)
    for i, (h, w) in enumerate(sizes):
        batch[i, :, :h, :w] = torch.randn(3, h, w, generator=g)
    return batch


def test_batch_levels_equal_each_image_alone(vit):
    sizes = [(56, 84), (42, 60)]
    batch = _images(sizes)
    together = FrozenFeatures(vit)(batch, [{"image_size": s} for s in sizes]).levels[0]
    for i, (h, w) in enumerate(sizes):
        alone = per_image_levels(vit, batch[i : i + 1, :, :h, :w], [(h, w)])[0][0]
        gh, gw = alone.shape[-2:]
        torch.testing.assert_close(together[i, :, :gh, :gw], alone, rtol=0, atol=0)
        assert together[i, :, gh:].abs().sum() == 0 and together[i, :, :, gw:].abs().sum() == 0


def test_an_image_gets_the_same_bits_in_any_batch(vit):
    # The cache keeps whatever the first batch computed; a run's results then depend on the
    # cache's history unless an image's levels are the same bits whichever images share its batch.
    # Here the image fills the first batch's grid (the ViT's plain attention) and is padded in the
    # second (masked attention): computed in those batches, the two differed in the last bits.
    first = _images([(112, 168), (112, 168)], seed=1)
    other = _images([(112, 168), (140, 112)], seed=2)
    other[0] = 0
    other[0, :, :112, :168] = first[0]  # the same image, in another padded batch
    frozen = FrozenFeatures(vit)
    a = frozen(first, [{"image_size": (112, 168)}] * 2).levels[0][0]
    b = frozen(other, [{"image_size": (112, 168)}, {"image_size": (140, 112)}]).levels[0][0]
    torch.testing.assert_close(a[:, :8, :12], b[:, :8, :12], rtol=0, atol=0)


class _Images(torch.utils.data.Dataset):
    """Two image files on disk, served as the trainer datasets serve samples."""

    def __init__(self, root: Path, sizes):
        self.image_root, self.sizes = root, sizes
        for i in range(len(sizes)):
            (root / f"{i}.bin").write_bytes(np.random.default_rng(i).bytes(64))

    def __len__(self):
        return len(self.sizes)

    def __getitem__(self, i):
        return {"info": {"file_name": f"{i}.bin", "image_size": self.sizes[i], "flipped": False}}


def test_a_hit_recomputes_nothing(vit, tmp_path):
    sizes = [(56, 84), (42, 60)]
    store = FeatureStore(tmp_path / "cache", "f" * 64)
    data = CachedDataset(_Images(tmp_path, sizes), store)
    frozen = FrozenFeatures(vit, store)
    batch = _images(sizes)
    first = frozen(batch, [data[i]["info"] for i in range(2)])
    assert frozen.calls == 2 and store.stats()["entries"] == 2  # one pass per missing image
    infos = [data[i]["info"] for i in range(2)]
    assert all("cached_levels" in info for info in infos)
    second = frozen(batch, infos)
    assert frozen.calls == 2  # every level came from the cache: no backbone pass
    torch.testing.assert_close(second.levels[0], first.levels[0], rtol=0, atol=0)


def test_any_key_change_misses(tmp_path):
    store = FeatureStore(tmp_path, "a" * 64)
    info = {"content": "c1", "image_size": (56, 84), "flipped": False}
    store.put(info, [torch.ones(2, 4, 6)])
    assert store.get(info) is not None
    for change in ({"content": "c2"}, {"image_size": (56, 70)}, {"flipped": True}):
        assert store.get({**info, **change}) is None, change
    other_weights = FeatureStore(tmp_path, "b" * 64)
    assert other_weights.get(info) is None


def test_refuses_what_it_cannot_cache_exactly(vit):
    check_exact(vit, "pretrain")  # frozen ViT, no rotation: fine
    with pytest.raises(UserError, match="rotation"):
        check_exact(vit, "finetune", rotate_prob=0.5, rotate_deg=9.0)
    trainable = build_backbone(BackboneConfig(kind="dinov2_vits14", weights="random"))
    trainable.freeze(1)
    with pytest.raises(UserError, match="fully frozen"):
        frozen_inputs(trainable, enabled=True, cache_dir="x", stage="finetune", datasets=[])
    resnet = build_backbone(BackboneConfig(kind="resnet50", weights="random"))
    with pytest.raises(UserError, match="batch padding"):
        check_exact(resnet, "pretrain")
    # Off, a trainable backbone is simply run by the model (no frozen-feature source).
    assert frozen_inputs(trainable, enabled=False, cache_dir="x", stage="f", datasets=[])[1] is None


_KILLED_WRITER = """
import sys, time, numpy as np, torch
from trainer.data.feature_cache import FeatureStore
def stalled(f, **arrays):
    f.write(b"half an entry"); f.flush(); time.sleep(60)
np.savez = stalled
FeatureStore(sys.argv[1], "e" * 64).put(
    {"content": "c", "image_size": (28, 28), "flipped": False}, [torch.ones(3, 2, 2)])
"""


def test_sigkill_while_writing_leaves_no_entry_and_resumes(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen([sys.executable, "-c", _KILLED_WRITER, str(tmp_path)], env=env)
    folder = tmp_path / ("e" * 16)
    # Wait for the entry's own temporary: the marker's ".backbone.json.<pid>.tmp" also matches
    # ".*.tmp" but lives only microseconds, so polling for it raced (a CI run caught it, then
    # found nothing when it looked again).
    entry_tmp = ".*" + ENTRY_SUFFIX + ".*.tmp"
    deadline = time.time() + 120
    while not list(folder.glob(entry_tmp)) and proc.poll() is None and time.time() < deadline:
        time.sleep(0.1)
    assert proc.poll() is None, f"the writer exited early with code {proc.returncode}"
    assert list(folder.glob(entry_tmp)), "the writer never started its entry"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    info = {"content": "c", "image_size": (28, 28), "flipped": False}
    store = FeatureStore(tmp_path, "e" * 64)  # a new run: the dead writer's temporary goes
    assert not list(folder.glob(".*.tmp"))
    assert store.get(info) is None  # a miss, never a half entry
    store.put(info, [torch.ones(3, 2, 2)])
    assert store.get(info)[0].shape == (3, 2, 2)


def test_pretraining_from_the_cache_gives_the_same_losses(tmp_path):
    shards = make_shards(tmp_path)
    cache = tmp_path / "cache"
    runs = {}
    for name, extra in (
        ("computed", ["--set", "pretrain.feature_cache=false"]),
        (
            "filling",
            [
                "--set",
                "pretrain.feature_cache=true",
                "--set",
                f"pretrain.feature_cache_dir={cache}",
            ],
        ),
        (
            "cached",
            [
                "--set",
                "pretrain.feature_cache=true",
                "--set",
                f"pretrain.feature_cache_dir={cache}",
            ],
        ),
    ):
        code, _, stderr = run_cli(*_args(shards, tmp_path / name, 4, *extra))
        assert code == 0, stderr
        runs[name] = [r["loss"] for r in train_records(tmp_path / name)]
    assert "entries" in stderr
    np.testing.assert_allclose(runs["filling"], runs["computed"], rtol=1e-4)
    np.testing.assert_allclose(runs["cached"], runs["computed"], rtol=1e-4)
    assert len(list(cache.rglob("*.npz"))) >= 4  # every image view trained on is stored


def test_finetune_with_rotation_and_cache_is_a_one_line_error(tmp_path):
    train = write_tiny_coco(tmp_path, "train", 4, seed=0)
    val = write_tiny_coco(tmp_path, "val", 2, seed=1)
    data = [
        f"data.train_json={train}",
        f"data.train_images={tmp_path / 'train'}",
        f"data.val_json={val}",
        f"data.val_images={tmp_path / 'val'}",
    ]
    sets = [a for s in (*data, *TINY_MODEL_SETTINGS) for a in ("--set", s)]
    code, _, stderr = run_cli(
        "finetune", "--config", str(ROOT / "configs" / "demo.toml"), "--frac", "0.5",
        "--init", "none", "--out", str(tmp_path / "ft"), *sets,
        "--set", "backbone.weights=random", "--set", "finetune.feature_cache=true",
        "--set", "finetune.rotate_prob=0.5", "--set", "finetune.frozen_stages=-1",
    )  # fmt: skip
    assert code == 2 and "rotation" in stderr and "Traceback" not in stderr, stderr
    assert len(stderr.strip().splitlines()) <= 3  # the error is one line (after the run's intro)
