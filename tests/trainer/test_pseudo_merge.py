"""CutLER's merge of a round's predictions with the masks it relabels, on hand-made masks."""

from __future__ import annotations

import numpy as np
import pytest
from pycocotools import mask as mask_utils

from pipeline.shards.schema import STATUS_EMPTY, STATUS_OK, STATUS_UNREADABLE, ImageRecord
from trainer.stages.pseudo_merge import merge_records

H, W, C = 20, 20, 4


def _record(boxes: list[tuple[int, int, int, int]], scores: list[float], seed: float):
    """An image's record with one rectangle mask per (x0, y0, x1, y1) box; every seed is
    ``seed`` in all channels and seed_pos (0, k, k), so a test can tell where a mask came from."""
    rles = []
    for x0, y0, x1, y1 in boxes:
        m = np.zeros((H, W), np.uint8)
        m[y0:y1, x0:x1] = 1
        rles.append(mask_utils.encode(np.asfortranarray(m))["counts"])
    k = len(boxes)
    return ImageRecord(
        "a.jpg", 1, H, W, STATUS_OK if k else STATUS_EMPTY, "" if k else "score: none",
        rles=rles,
        boxes=np.asarray(boxes, np.float32).reshape(k, 4),
        scores=np.asarray(scores, np.float32),
        seeds=np.full((k, C), seed, np.float16),
        seed_pos=np.asarray([(0, i, i) for i in range(k)], np.int16).reshape(k, 3),
    )  # fmt: skip


# The model's two masks: one nearly the source's first (IoU 0.9), one where the source has none.
MODEL = _record([(0, 0, 10, 10), (12, 12, 18, 18)], [0.8, 0.6], 1.0)
SOURCE = _record([(0, 0, 10, 9), (0, 12, 6, 20), (5, 0, 15, 10)], [0.9, 0.7, 0.5], 2.0)


def test_model_first_adds_the_source_masks_that_overlap_no_prediction():
    merged = merge_records(MODEL, SOURCE, "model-first", 0.5)
    # Source 0 overlaps model 0 at IoU 0.9: dropped. Source 2 overlaps it at 50/150 = 0.33: kept.
    assert merged.status == STATUS_OK and merged.num_masks == 4
    assert merged.scores.tolist() == pytest.approx([0.8, 0.7, 0.6, 0.5])
    assert merged.seeds[:, 0].tolist() == [1.0, 2.0, 1.0, 2.0]  # each keeps its own seed
    assert merged.seed_pos[:, 1].tolist() == [0, 1, 1, 2]
    assert merged.boxes.tolist() == [
        [0, 0, 10, 10],
        [0, 12, 6, 20],
        [12, 12, 18, 18],
        [5, 0, 15, 10],
    ]
    assert merged.rles == [MODEL.rles[0], SOURCE.rles[1], MODEL.rles[1], SOURCE.rles[2]]


def test_source_first_adds_the_predictions_the_source_missed():
    merged = merge_records(MODEL, SOURCE, "source-first", 0.5)
    assert merged.num_masks == 4 and merged.seeds[:, 0].tolist() == [2.0, 2.0, 1.0, 2.0]
    assert merged.rles == [SOURCE.rles[0], SOURCE.rles[1], MODEL.rles[1], SOURCE.rles[2]]
    # A threshold below every overlap (0.3 < 0.33) also drops source 2 in model-first.
    assert merge_records(MODEL, SOURCE, "model-first", 0.3).num_masks == 3


def test_empty_sides_and_off():
    empty = _record([], [], 0.0)
    assert merge_records(MODEL, SOURCE, "off", 0.5) is MODEL
    from_source = merge_records(empty, SOURCE, "model-first", 0.5)
    assert from_source.status == STATUS_OK and from_source.rles == SOURCE.rles
    assert from_source.seeds.shape == (3, C) and from_source.error == ""
    assert merge_records(MODEL, empty, "source-first", 0.5).rles == MODEL.rles
    both = merge_records(empty, _record([], [], 0.0), "model-first", 0.5)
    assert both.status == STATUS_EMPTY and both.error == "score: none"
    unreadable = ImageRecord("a.jpg", 1, 0, 0, STATUS_UNREADABLE, "truncated")
    assert merge_records(unreadable, SOURCE, "model-first", 0.5) is unreadable
    # Unreadable at stage one, readable now: nothing to add, whatever its recorded size.
    assert merge_records(MODEL, unreadable, "model-first", 0.5) is MODEL


def test_other_images_or_modes_are_refused():
    other = _record([(0, 0, 5, 5)], [0.9], 2.0)
    other.file_name = "b.jpg"
    with pytest.raises(ValueError, match="different images"):
        merge_records(MODEL, other, "model-first", 0.5)
    with pytest.raises(ValueError, match="merge mode"):
        merge_records(MODEL, SOURCE, "union", 0.5)
