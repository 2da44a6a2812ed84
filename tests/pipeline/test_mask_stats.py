"""Ground-truth-free mask statistics (pipeline/saliency/mask_stats.py) and how inspect reports
them."""

from __future__ import annotations

import numpy as np

from pipeline.inspection.render import best_masks
from pipeline.saliency.mask_stats import StatsCollector, format_stats, image_stats
from pipeline.shards.schema import STATUS_EMPTY, ImageRecord, shard_name, write_shard
from tests.pipeline.test_inspector import META, ok_record, rle, run_cli

H, W = 40, 48


def record_with_masks(masks: list[np.ndarray], scores: list[float]) -> ImageRecord:
    rec = ok_record("x.png", 1, [(0, 0, 1, 1)] * len(masks), scores)
    rec.rles = [rle(m)["counts"] for m in masks]
    boxes = []
    for m in masks:
        ys, xs = np.nonzero(m)
        boxes.append([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1])
    rec.boxes = np.array(boxes, np.float32)
    return rec


def scattered_and_copies() -> ImageRecord:
    scattered = np.zeros((H, W), np.uint8)
    scattered[5:15, 5:15] = 1  # 100 px
    scattered[30:35, 40:45] = 1  # 25 px, far away
    block = np.zeros((H, W), np.uint8)
    block[20:30, 5:15] = 1
    nested = block.copy()
    nested[20, 5:15] = 0  # IoU 0.9 with block
    return record_with_masks([scattered, block, nested], [0.9, 0.8, 0.7])


def test_image_stats_pieces_width_and_duplicates():
    s = image_stats(scattered_and_copies())
    assert s["pieces"] == [2, 1, 1]
    assert abs(s["largest"][0] - 0.8) < 1e-9 and s["largest"][1] == 1.0
    assert abs(s["width"][0] - 40 / W) < 1e-6
    assert s["dup_pairs"] == 1


def test_collector_counts_empty_images_by_stage():
    c = StatsCollector()
    c.add(scattered_and_copies())
    c.add(ImageRecord("e.png", 2, H, W, STATUS_EMPTY, "box_width: all 3 boxes span ..."))
    c.add(ImageRecord("f.png", 3, H, W, STATUS_EMPTY, "box_width: all 1 boxes span ..."))
    c.add(ImageRecord("g.png", 4, H, W, STATUS_EMPTY))
    r = c.result()
    assert r["pieces_per_mask_median"] == 1 and r["scattered_masks"] == 0
    assert r["wide_boxes"] == 1 and r["dup_pairs_per_image_median"] == 0.0
    assert r["empty_by_stage"] == {"box_width": 2, "(no reason recorded)": 1}
    text = "\n".join(format_stats(r))
    assert "empty x2: box_width" in text


def test_inspect_prints_quality_and_empty_reason(tmp_path):
    out = tmp_path / "proposals"
    empty = ImageRecord("e.png", 2, H, W, STATUS_EMPTY, "score: no mask's maskness reaches 0.7")
    write_shard(out / shard_name(0), [scattered_and_copies(), empty], META)
    code, text, _ = run_cli([str(out)])
    assert code == 0
    assert "pieces per mask median 1" in text and "empty x1: score" in text
    code, text, _ = run_cli([str(out), "--image", "2"])
    assert code == 0 and "score: no mask's maskness reaches 0.7" in text


def test_best_masks_top_k_and_score_cut():
    rec = scattered_and_copies()
    assert best_masks(rec, 2, 0.0).scores.tolist() == [np.float32(0.9), np.float32(0.8)]
    cut = best_masks(rec, 0, 0.75)
    assert cut.num_masks == 2 and len(cut.boxes) == 2
    assert best_masks(rec, 0, 0.0) is rec
