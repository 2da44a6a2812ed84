"""The pretext fit measured during pre-training: the held-out rule, the pseudo-mask ground
truth and its score, and a short pre-training that records the curve (trainer/stages/pretext.py)."""

from __future__ import annotations

import json

import numpy as np
import pytest
from pycocotools import mask as mask_util
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from tests.trainer.helpers import run_cli
from tests.trainer.test_pretrain import _args, make_shards
from trainer.data.shard_dataset import PseudoMaskSelection, ShardDataset
from trainer.data.transforms import Augment
from trainer.engine.metrics_log import read_metrics
from trainer.stages.coco_metrics import coco_mask_metrics
from trainer.stages.pretext import held_out, pseudo_ground_truth


def test_held_out_rule_is_a_stable_seeded_share():
    names = [f"img_{i:05d}.jpg" for i in range(20000)]
    chosen = [n for n in names if held_out(n, 0.05, 0)]
    assert 0.045 < len(chosen) / len(names) < 0.055
    assert chosen == [n for n in names if held_out(n, 0.05, 0)]  # same on every call
    assert chosen != [n for n in names if held_out(n, 0.05, 1)]  # the seed matters
    assert not any(held_out(n, 0.0, 0) for n in names[:100])


def _split(shards, share, seed):
    augment = Augment(56, 84)

    def inside(name):
        return held_out(name, share, seed)

    train = ShardDataset(shards, augment, keep_image=lambda n: not inside(n))
    heldout = ShardDataset(shards, augment, keep_image=inside)
    return train, heldout


def test_held_out_images_are_disjoint_from_training(tmp_path):
    shards = make_shards(tmp_path)
    train, heldout = _split(shards, 0.5, 3)
    everything = ShardDataset(shards, Augment(56, 84))
    assert set(train.names).isdisjoint(heldout.names)
    assert sorted(train.names + heldout.names) == sorted(everything.names)
    assert train.names and heldout.names


def test_pseudo_mask_score_equals_a_direct_cocoeval(tmp_path):
    shards = make_shards(tmp_path)
    dataset = ShardDataset(shards, Augment(56, 84))
    gt = pseudo_ground_truth(dataset)
    records = [dataset.readers[s].record(r) for s, r in dataset.index[:2]]
    # Detections: image 0's pseudo masks exactly, image 1's shifted by 4 pixels.
    results = []
    for n, record in enumerate(records):
        for k, mask in enumerate(record.decode_masks()):
            mask = np.roll(mask, 4 * n, axis=1)
            rle = mask_util.encode(np.asfortranarray(mask))
            results.append(
                {
                    "image_id": record.image_id,
                    "category_id": 1,
                    "score": 0.9 - k / 10,
                    "segmentation": {"size": rle["size"], "counts": rle["counts"].decode()},
                }
            )
    ours = coco_mask_metrics(
        gt, results, image_ids=[r.image_id for r in records], class_agnostic=True
    )
    # The same ground truth written by hand from the decoded masks.
    direct = COCO()
    images, anns = [], []
    for record in records:
        images.append({"id": record.image_id, "height": record.height, "width": record.width})
        for mask in record.decode_masks():
            rle = mask_util.encode(np.asfortranarray(mask))
            anns.append(
                {
                    "id": len(anns) + 1,
                    "image_id": record.image_id,
                    "category_id": 1,
                    "iscrowd": 0,
                    "area": float(mask.sum()),
                    "bbox": list(mask_util.toBbox(rle)),
                    "segmentation": {"size": rle["size"], "counts": rle["counts"].decode()},
                }
            )
    direct.dataset = {"images": images, "annotations": anns, "categories": [{"id": 1}]}
    direct.createIndex()
    ev = COCOeval(direct, direct.loadRes([dict(r) for r in results]), iouType="segm")
    ev.params.useCats = 0
    ev.evaluate(), ev.accumulate(), ev.summarize()
    assert ours["AP"] == pytest.approx(float(ev.stats[0]))
    assert 0 < ours["AP"] < 1  # the shifted image costs something


def test_selection_keeps_the_best_masks_and_skips_images_left_without():
    class Record:
        height, width = 10, 10
        scores = np.array([0.9, 0.6, 0.4], np.float32)
        rles = [
            mask_util.encode(np.asfortranarray(m))["counts"]
            for m in (
                np.ones((10, 10), np.uint8),
                np.eye(10, dtype=np.uint8),
                np.ones((10, 10), np.uint8),
            )
        ]

    assert PseudoMaskSelection(min_score=0.5).keep(Record()).tolist() == [0, 1]
    assert PseudoMaskSelection(max_masks=1).keep(Record()).tolist() == [0]
    assert PseudoMaskSelection(min_area=0.2).keep(Record()).tolist() == [0, 2]
    assert not PseudoMaskSelection().active


def test_pretrain_records_the_held_out_curve_and_resumes_it(tmp_path):
    shards = make_shards(tmp_path)
    out = tmp_path / "pretrain"
    extra = [
        "--set",
        "pretrain.holdout=0.5",
        "--set",
        "pretrain.holdout_seed=3",
        "--set",
        "pretrain.eval_every=2",
        "--set",
        "data.val_json=",
    ]
    code, _, stderr = run_cli(*_args(shards, out, 2, *extra))
    assert code == 0, stderr
    train, heldout = _split(shards, 0.5, 3)
    assert f"{len(train)} images from 2 shards" in stderr  # the held-out images are not trained on
    evals = [r for r in read_metrics(out / "metrics.jsonl") if r.get("kind") == "eval"]
    assert [r["iter"] for r in evals] == [2] and 0 <= evals[0]["heldout_AP"] <= 1
    code, _, stderr = run_cli(*_args(shards, out, 4, "--resume", *extra))
    assert code == 0, stderr
    evals = [r for r in read_metrics(out / "metrics.jsonl") if r.get("kind") == "eval"]
    assert [r["iter"] for r in evals] == [2, 4]
    summary = json.loads((out / "pretext.json").read_text())
    assert summary["heldout"]["final_iteration"] == 4 and (out / "pretext.png").is_file()
