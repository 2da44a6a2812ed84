"""``python -m trainer kernels``: the per-kernel mean masks it saves equal a direct computation on
two images of different aspect ratios, the centres follow their definition, and it draws PNGs
(one per checkpoint, and side by side)."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from pipeline.backbones.build import build_backbone
from pipeline.config import BackboneConfig
from tests.trainer.helpers import TINY_MODEL, coco_annotation, run_cli
from trainer.config import Config, FinetuneConfig
from trainer.data.coco_dataset import CocoDataset
from trainer.data.transforms import Augment
from trainer.engine.checkpoint import save_checkpoint
from trainer.experiments.kernels import confident_centres
from trainer.model.knet import KNet

SIZES = ((48, 80), (72, 40))  # (height, width): one wide, one tall image


def _two_images(root: Path) -> tuple[Path, Path]:
    rng = np.random.default_rng(0)
    (root / "val").mkdir(parents=True)
    images, anns = [], []
    for i, (h, w) in enumerate(SIZES):
        cv2.imwrite(str(root / "val" / f"{i}.png"), rng.integers(0, 255, (h, w, 3), np.uint8))
        images.append({"id": i + 1, "file_name": f"{i}.png", "height": h, "width": w})
        mask = np.zeros((h, w), np.uint8)
        mask[5:20, 5:30] = 1
        anns.append(coco_annotation(mask, i + 1, i + 1, 1))
    ann = root / "val.json"
    ann.write_text(
        json.dumps({"images": images, "annotations": anns, "categories": [{"id": 1, "name": "a"}]})
    )
    return ann, root / "val"


def _checkpoint(path: Path, ann: Path, images: Path) -> KNet:
    cfg = Config(
        backbone=BackboneConfig(kind="resnet50", weights="random"),
        model=TINY_MODEL,
        finetune=FinetuneConfig(short_side=56, max_side=84, batch_size=2),
    )
    cfg.data.val_json, cfg.data.val_images = str(ann), str(images)
    torch.manual_seed(0)
    model = KNet(build_backbone(cfg.backbone), cfg.model, num_classes=2)
    save_checkpoint(
        path, {"model": model.state_dict(), "config": dataclasses.asdict(cfg), "num_classes": 2}
    )
    return model.eval()


def _direct_mean(model: KNet, ann: Path, images: Path) -> np.ndarray:
    """Each image alone (the dataset's resize and normalisation, short side 56, long <= 84),
    padded to the model's divisor: sigmoid of the last stage's masks, up-sampled to the input,
    cropped to the image, resized to 64 x 64; the mean over the two images."""
    dataset = CocoDataset(ann, images, Augment(56, 84), train=False, with_masks=False)
    maps = []
    for item in (dataset[0], dataset[1]):
        x = item["image"]
        nh, nw = x.shape[-2:]
        assert (nh, nw) == tuple(item["info"]["image_size"])
        d = model.size_divisor
        hp, wp = -(-nh // d) * d, -(-nw // d) * d
        x = F.pad(x, (0, wp - nw, 0, hp - nh))[None]
        with torch.no_grad():
            logits = model(x)["stages"][-1]["masks"][0]
        up = F.interpolate(logits.sigmoid()[None], size=(hp, wp), mode="bilinear")
        crop = up[:, :, :nh, :nw]
        maps.append(F.interpolate(crop, size=(64, 64), mode="bilinear")[0])
    assert {tuple(m.shape) for m in maps} == {(TINY_MODEL.num_kernels, 64, 64)}
    return torch.stack(maps).mean(0).numpy()


def test_kernels_mean_masks_equal_a_direct_computation(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the relative --out folders below land in the test's folder
    ann, images = _two_images(tmp_path / "data")
    model = _checkpoint(tmp_path / "a.pt", ann, images)
    code, out, err = run_cli(
        "kernels", "--checkpoint", str(tmp_path / "a.pt"), "--out", str(tmp_path / "k")
    )
    assert code == 0, err
    saved = np.load(tmp_path / "k" / "kernels-a.npz")
    assert int(saved["images"]) == 2 and saved["mean"].shape == (TINY_MODEL.num_kernels, 64, 64)
    direct = _direct_mean(model, ann, images)
    np.testing.assert_allclose(saved["mean"], direct, atol=2e-3)
    assert (tmp_path / "k" / "kernels-a.png").stat().st_size > 0

    # Two checkpoints: one PNG each and the side-by-side grid; --limit takes the first images.
    save_checkpoint(tmp_path / "b.pt", torch.load(tmp_path / "a.pt", weights_only=True))
    args = ["--checkpoint", str(tmp_path / "a.pt"), "--checkpoint", str(tmp_path / "b.pt")]
    code, out, err = run_cli(
        "kernels", *args, "--label", "sp", "--label", "base", "--limit", "1", "--out", "k2"
    )
    assert code == 0, err
    for name in ("kernels-sp.png", "kernels-base.png", "kernels-side-by-side.png"):
        assert (Path("k2") / name).stat().st_size > 0
    assert int(np.load(Path("k2") / "kernels-sp.npz")["images"]) == 1
    code, _, err = run_cli("kernels", *args, "--label", "x", "--out", "k3")
    assert code == 2 and "one distinct --label" in err


def test_confident_centres_follow_their_definition():
    maps = torch.zeros(3, 4, 4)
    maps[0, 0:2, 2:4] = 0.9  # cells (rows 0-1, cols 2-3): centre x = 0.75, y = 0.25
    maps[1] = 0.4  # never above the threshold: not confident
    maps[2, 3, 0] = 0.6  # one cell: centre (0.125, 0.875)
    got = confident_centres(maps, 0.5)
    torch.testing.assert_close(got, torch.tensor([[0.0, 0.75, 0.25], [2.0, 0.125, 0.875]]))


def test_a_huge_canvas_is_refused_before_any_work(tmp_path):
    """--canvas 100000 would allocate kernels x 10^10 floats per image."""
    code, _, err = run_cli(
        "kernels",
        "--checkpoint",
        str(tmp_path / "x.pt"),
        "--canvas",
        "100000",
        "--out",
        str(tmp_path / "k"),
    )
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and "--canvas must be in [2, 1024]" in lines[0]
    assert not (tmp_path / "k").exists()


def test_collapse_summary_tells_copies_from_distinct_kernels():
    from trainer.experiments.kernels import collapse_summary

    blob = np.zeros((4, 8, 8), np.float32)
    blob[:, 3:5, 3:5] = 1  # four copies of one central blob
    centres = np.array([[k, 0.5, 0.5] for k in range(4) for _ in range(5)], np.float32)
    copies = collapse_summary({"mean": blob, "centres": centres, "images": 10})
    assert copies["active"] == 4 and copies["centre_spread"] == 0.0
    assert copies["mean_map_cosine"] == pytest.approx(1.0)
    corners = np.zeros((4, 8, 8), np.float32)
    for k, (y, x) in enumerate([(0, 0), (0, 6), (6, 0), (6, 6)]):
        corners[k, y : y + 2, x : x + 2] = 1
    spots = np.array([[k, 0.1 + 0.8 * (k % 2), 0.1 + 0.8 * (k // 2)] for k in range(4)])
    distinct = collapse_summary({"mean": corners, "centres": spots, "images": 10})
    assert distinct["mean_map_cosine"] == pytest.approx(0.0)
    assert distinct["centre_spread"] > 0.3
    rare = collapse_summary({"mean": corners, "centres": spots[:1], "images": 100})
    assert rare["active"] == 0  # one confident mask in 100 images is below 5%
