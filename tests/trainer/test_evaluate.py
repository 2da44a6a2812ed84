"""Evaluation: logits -> COCO results -> pycocotools mask AP."""

from __future__ import annotations

import contextlib
import io
import json

import numpy as np
import pytest
import torch
from pycocotools import mask as mask_util
from pycocotools.coco import COCO

from tests.trainer.helpers import coco_annotation, write_tiny_coco
from trainer.stages.coco_metrics import METRIC_NAMES, coco_mask_metrics, format_table, image_results

CATEGORY_IDS = [1, 3]  # non-contiguous on purpose: index 1 must map back to id 3
STRIDE = 4

# Two images. Image 1: original 64 x 96, fed at scale 1 (input 64 x 96, no padding).
# Image 2: original 32 x 48, fed at scale 2 (resized 64 x 96) and padded to 64 x 128.
IMAGES = [
    {"id": 1, "orig": (64, 96), "resized": (64, 96), "input": (64, 96), "scale": 1},
    {"id": 2, "orig": (32, 48), "resized": (64, 96), "input": (64, 128), "scale": 2},
]
# Instances as rectangles on the mask grid (cell rows r0:r1, cols c0:c1) and a class index.
INSTANCES = {
    1: [((2, 8, 3, 10), 0), ((9, 15, 12, 22), 1), ((1, 5, 15, 20), 1)],
    2: [((2, 8, 3, 10), 1), ((10, 14, 2, 12), 0)],
}


def _gt_mask(img: dict, cells: tuple[int, int, int, int]) -> np.ndarray:
    """The rectangle in original pixels (grid cells x stride / scale)."""
    r0, r1, c0, c1 = (v * STRIDE // img["scale"] for v in cells)
    m = np.zeros(img["orig"], dtype=np.uint8)
    m[r0:r1, c0:c1] = 1
    return m


def _coco_gt() -> COCO:
    images, anns = [], []
    for img in IMAGES:
        h, w = img["orig"]
        images.append({"id": img["id"], "height": h, "width": w, "file_name": f"{img['id']}.png"})
        for cells, label in INSTANCES[img["id"]]:
            m = _gt_mask(img, cells)
            anns.append(coco_annotation(m, len(anns) + 1, img["id"], CATEGORY_IDS[label]))
    cats = [{"id": c, "name": f"c{c}"} for c in CATEGORY_IDS]
    coco = COCO()
    coco.dataset = {"images": images, "annotations": anns, "categories": cats}
    with contextlib.redirect_stdout(io.StringIO()):
        coco.createIndex()
    return coco


def _predictions(img: dict, perfect: bool, num_kernels: int = 10, seed: int = 0):
    """Hand-made last-stage outputs: (N, C) class logits and (N, h, w) mask logits.

    perfect: one kernel per instance (its class at +8, +7, ..., the other class at -8, a
    +10 / -10 mask), the rest junk: low class logits and random masks (ranked below every true
    positive).
    Not perfect: every mask logit at -10 (nothing survives the threshold).
    """
    g = torch.Generator().manual_seed(seed)
    hp, wp = img["input"]
    logits = torch.full((num_kernels, len(CATEGORY_IDS)), -8.0)
    masks = torch.randn(num_kernels, hp // STRIDE, wp // STRIDE, generator=g) * 5
    if not perfect:
        return logits, torch.full_like(masks, -10.0)
    logits[:, :] = -6.0 + torch.rand(num_kernels, len(CATEGORY_IDS), generator=g)  # junk < 0.01
    # Put the true instances on scattered kernels so the kernel -> mask indexing is exercised.
    for i, (n, (cells, label)) in enumerate(zip([7, 2, 5], INSTANCES[img["id"]])):
        r0, r1, c0, c1 = cells
        logits[n] = -8.0
        logits[n, label] = 8.0 - i  # distinct scores: the ranking is known
        masks[n] = -10.0
        masks[n, r0:r1, c0:c1] = 10.0
    return logits, masks


# Bilinear x4 up-sampling (align_corners=False) of a 0/1 cell rectangle gives 0.625 on its
# border pixels, 0.625^2 = 0.39 on its corners and 0.375 just outside: a threshold between
# 0.375 and 0.39 reproduces the rectangle exactly.
EXACT = 0.38


def _results(perfect: bool, threshold: float = EXACT) -> list[dict]:
    out = []
    for img in IMAGES:
        logits, masks = _predictions(img, perfect)
        out += image_results(
            logits,
            masks,
            image_id=img["id"],
            category_ids=CATEGORY_IDS,
            input_size=img["input"],
            image_size=img["resized"],
            orig_size=img["orig"],
            mask_threshold=threshold,
            max_detections=100,
        )
    return out


def test_perfect_predictions_score_ap_one():
    coco = _coco_gt()
    results = _results(perfect=True)
    # 10 kernels x 2 classes = 20 candidates per image; junk masks are random, most non-empty.
    assert all(
        r["segmentation"]["size"] == [im["orig"][0], im["orig"][1]]
        for r in results
        for im in IMAGES
        if im["id"] == r["image_id"]
    )
    assert {r["category_id"] for r in results} <= set(CATEGORY_IDS)
    scores = [r["score"] for r in results if r["image_id"] == 1]
    assert scores == sorted(scores, reverse=True)
    # Every ground-truth mask is reproduced exactly by one high-scoring detection.
    for img in IMAGES:
        top = [r for r in results if r["image_id"] == img["id"] and r["score"] > 0.5]
        assert len(top) == len(INSTANCES[img["id"]])
        for (cells, label), r in zip(INSTANCES[img["id"]], top):
            assert r["category_id"] == CATEGORY_IDS[label]
            np.testing.assert_array_equal(mask_util.decode(r["segmentation"]), _gt_mask(img, cells))
    metrics = coco_mask_metrics(coco, results)
    assert set(metrics) == set(METRIC_NAMES)
    assert metrics["AP"] == pytest.approx(1.0)
    assert metrics["AP50"] == pytest.approx(1.0) and metrics["AP75"] == pytest.approx(1.0)
    assert metrics["APs"] == pytest.approx(1.0)  # every object here is small (< 32^2 px)
    assert metrics["APm"] == -1 and metrics["APl"] == -1  # no medium/large ground truth


def test_wrong_class_or_threshold_lowers_ap():
    coco = _coco_gt()
    results = _results(perfect=True)
    swapped = [dict(r, category_id=4 - r["category_id"]) for r in results]  # 1 <-> 3
    assert coco_mask_metrics(coco, swapped)["AP"] < 0.2
    # Class-agnostic scoring (object discovery) ignores the label: the masks are still perfect.
    assert coco_mask_metrics(coco, swapped, class_agnostic=True)["AP"] == pytest.approx(1.0)
    # At K-Net's 0.3 threshold the bilinear up-sampling grows each rectangle by one pixel row
    # and column: still a match at IoU 0.5, no longer at the strictest thresholds.
    loose = coco_mask_metrics(coco, _results(perfect=True, threshold=0.3))
    assert loose["AP50"] == pytest.approx(1.0) and loose["AP"] < 1.0


def test_empty_predictions_score_zero():
    coco = _coco_gt()
    results = _results(perfect=False)
    assert results == []  # every mask below threshold: nothing to report
    metrics = coco_mask_metrics(coco, results)
    assert metrics["AP"] == 0.0 and metrics["AP50"] == 0.0 and metrics["APs"] == 0.0


def test_top_k_limits_detections_and_image_subset():
    coco = _coco_gt()
    img = IMAGES[0]
    logits, masks = _predictions(img, perfect=True)
    masks[:] = 10.0  # every mask non-empty, so exactly max_detections come back
    res = image_results(
        logits,
        masks,
        image_id=1,
        category_ids=CATEGORY_IDS,
        input_size=img["input"],
        image_size=img["resized"],
        orig_size=img["orig"],
        max_detections=7,
    )
    assert len(res) == 7
    with pytest.raises(ValueError, match="category ids"):
        image_results(
            logits,
            masks,
            image_id=1,
            category_ids=[1],
            input_size=img["input"],
            image_size=img["resized"],
            orig_size=img["orig"],
        )
    # Evaluating only image 1 with perfect results for image 1: AP 1 on that image alone.
    perfect_1 = [r for r in _results(perfect=True) if r["image_id"] == 1]
    assert coco_mask_metrics(coco, perfect_1, image_ids=[1])["AP"] == pytest.approx(1.0)
    assert coco_mask_metrics(coco, perfect_1)["AP"] < 1.0  # image 2's objects all missed


def test_format_table():
    table = format_table(
        {
            "sp": {
                "AP": 0.1234,
                "AP50": 0.5,
                "AP75": 0.0,
                "APs": -1.0,
                "APm": 0.2,
                "APl": 0.3,
                "iterations": 10,
            }
        },
        extra=["iterations"],
    )
    lines = table.splitlines()
    assert lines[0] == "| run | AP | AP50 | AP75 | APs | APm | APl | iterations |"
    assert lines[2] == "| sp | 12.3 | 50.0 | 0.0 | n/a | 20.0 | 30.0 | 10 |"


class _OracleKNet(torch.nn.Module):
    """Stands in for KNet: replays, batch by batch, predictions made from the ground truth of
    the same loader (one kernel per object, mask logits +-10 on the stride-4 grid)."""

    def __init__(self, batches, num_classes: int, num_kernels: int = 8):
        super().__init__()
        self.batches = list(batches)
        self.num_classes, self.num_kernels = num_classes, num_kernels

    def forward(self, images):
        batch = self.batches.pop(0)
        assert torch.equal(images, batch.images)
        b, _, hp, wp = images.shape
        logits = torch.full((b, self.num_kernels, self.num_classes), -8.0)
        masks = torch.full((b, self.num_kernels, hp // STRIDE, wp // STRIDE), -10.0)
        for i, t in enumerate(batch.targets):
            grid = torch.nn.functional.avg_pool2d(t["masks"].float()[None], STRIDE)[0]
            for n, (m, label) in enumerate(zip(grid, t["labels"])):
                logits[i, n, label] = 8.0
                masks[i, n] = torch.where(m >= 0.5, 10.0, -10.0)
        return {"stages": [{"logits": logits, "masks": masks}]}


def test_evaluate_through_the_loader_geometry(tmp_path):
    """Oracle predictions through CocoDataset + Collate (resize 64 -> 80, pad to 96) and back to
    the original frame: AP50 1.0 proves the crop and resize are inverted correctly."""
    from torch.utils.data import DataLoader

    from trainer.data.coco_dataset import CocoDataset
    from trainer.data.datasets import Collate
    from trainer.data.transforms import Augment
    from trainer.stages.coco_metrics import load_coco
    from trainer.stages.evaluate import evaluate

    ann = write_tiny_coco(tmp_path, "val", num_images=4, seed=3)
    dataset = CocoDataset(ann, tmp_path / "val", Augment(80, 80), train=False)
    loader = DataLoader(dataset, batch_size=3, collate_fn=Collate(32))
    batches = list(loader)
    assert batches[0].images.shape[-2:] == (96, 96)  # padding present: the crop matters
    oracle = _OracleKNet(batches, num_classes=dataset.num_classes)
    oracle.train()
    metrics = evaluate(
        oracle,
        loader,
        load_coco(ann),
        "cpu",
        mask_threshold=0.5,
        results_path=tmp_path / "segm.json",
    )
    assert oracle.training  # mode restored
    assert metrics["images"] == 4
    assert metrics["AP50"] == pytest.approx(1.0) and metrics["AP"] > 0.6
    detections = json.loads((tmp_path / "segm.json").read_text())
    # Every non-empty kernel mask is reported once per class (top-k over kernels x classes).
    objects = sum(len(t["labels"]) for b in batches for t in b.targets)
    assert len(detections) == metrics["detections"] == dataset.num_classes * objects
    # The contiguous -> COCO category mapping matters: swapped ids cost AP.
    oracle = _OracleKNet(batches, num_classes=dataset.num_classes)
    wrong = evaluate(oracle, loader, load_coco(ann), "cpu", category_ids=[7, 2])
    assert wrong["AP"] < metrics["AP"]
