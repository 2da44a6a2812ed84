"""Downstream reads what upstream recorded: plan.json's image root and file sizes, used by the
trainer's ShardDataset and by inspect --render / --image, and the check that an opened image is
the one the shards describe (two folders, same file names, different pixels)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import cv2
import numpy as np
import pytest
from pycocotools import mask as mask_utils

from pipeline.cli import UserError
from pipeline.executors.proposals import prepare_out
from pipeline.inputs.listing import list_images
from pipeline.inspection.command import image_root
from pipeline.inspection.render import render
from pipeline.shards.plan import make_plan, plan_inputs
from pipeline.shards.schema import STATUS_OK, ImageRecord, shard_name, write_shard
from trainer.data.shard_dataset import ShardDataset
from trainer.data.transforms import Augment

H, W = 24, 32
META = {
    "fingerprint": "b" * 64,
    "backbone": "dinov2_vits14",
    "feature_stride": 14,
    "embed_dim": 4,
    "settings": {},
}


def _two_folders(tmp_path: Path) -> tuple[Path, Path]:
    """Folders ``right`` and ``wrong`` with the same file names and sizes, other pixels."""
    rng = np.random.default_rng(0)
    right, wrong = tmp_path / "right", tmp_path / "wrong"
    for folder in (right, wrong):
        folder.mkdir()
    for name in ("p.png", "q.png"):
        cv2.imwrite(str(right / name), rng.integers(0, 255, (H, W, 3), dtype=np.uint8))
        cv2.imwrite(str(wrong / name), np.full((H, W, 3), 128, np.uint8))
    return right, wrong


def _proposals(tmp_path: Path, right: Path) -> Path:
    """A proposals folder for ``right``'s images, made the way the command makes it."""
    items = list_images(right)
    plan = make_plan(items, 8)
    out = tmp_path / "proposals"
    prepare_out(out, plan, 8, META["fingerprint"], False, plan_inputs(right, items))
    mask = np.zeros((H, W), np.uint8)
    mask[4:12, 5:20] = 1
    records = [
        ImageRecord(
            file_name=it.file_name,
            image_id=it.image_id,
            height=H,
            width=W,
            status=STATUS_OK,
            rles=[mask_utils.encode(np.asfortranarray(mask))["counts"]],
            boxes=np.array([[5, 4, 20, 12]], np.float32),
            scores=np.array([0.9], np.float32),
            seeds=np.ones((1, 4), np.float16),
            seed_pos=np.zeros((1, 3), np.int16),
        )
        for it in plan[0]
    ]
    write_shard(out / shard_name(0), records, META)
    return out


def test_plan_records_source_root_listing_and_sizes(tmp_path):
    right, _ = _two_folders(tmp_path)
    plan = json.loads((_proposals(tmp_path, right) / "plan.json").read_text())
    assert plan["image_root"] == str(right.absolute())
    assert plan["source"] == str(right.absolute())
    assert len(plan["listing_hash"]) == 64
    assert plan["file_bytes"] == {n: (right / n).stat().st_size for n in ("p.png", "q.png")}


def test_trainer_reads_the_recorded_root_and_refuses_other_pixels(tmp_path, monkeypatch):
    right, wrong = _two_folders(tmp_path)
    shards = _proposals(tmp_path, right)
    # The config's data.train_images (here: the working directory) holds the wrong pictures.
    monkeypatch.chdir(tmp_path)
    (tmp_path / "config.toml").write_text(f'[data]\ntrain_images = "{wrong}"\n')
    dataset = ShardDataset(shards, Augment(24, 32))
    assert dataset.image_root == right.absolute()
    assert dataset[0]["image"].shape[-2:] == (H, W)
    other = ShardDataset(shards, Augment(24, 32), image_root=wrong)
    with pytest.raises(UserError, match=r"wrong/p.png has \d+ bytes, but the proposals read"):
        other[0]


def test_inspect_takes_the_recorded_root_and_render_refuses_other_pixels(tmp_path):
    right, wrong = _two_folders(tmp_path)
    shards = _proposals(tmp_path, right)
    args = argparse.Namespace(image_root=None, config="configs/demo.toml", overrides=[])
    root, where = image_root(args, shards)
    assert root == str(right.absolute()) and "plan.json" in where
    assert len(render(shards, tmp_path / "pages", root)) == 1
    with pytest.raises(UserError, match="wrong/p.png has"):
        render(shards, tmp_path / "pages", wrong)
