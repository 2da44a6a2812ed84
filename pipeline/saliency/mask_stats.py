"""Ground-truth-free quality statistics of pseudo masks, as ``pipeline inspect`` reports them.

Per mask: its connected pieces at the original size (8-connected pixels) and the share of its
area the largest piece holds, and its box width as a share of the image width. Per image: the
near-duplicate pairs (two masks whose IoU exceeds ``DUP_IOU``). Per run: their distributions
and, for empty images, how many each stage emptied (the stage is the part of the shard's
recorded reason before the colon; shards written before reasons were recorded say
"(no reason recorded)").
"""

from __future__ import annotations

from collections import Counter
from typing import Any

import cv2
import numpy as np
from pycocotools import mask as mask_utils

from pipeline.shards.schema import STATUS_EMPTY, STATUS_OK, ImageRecord

DUP_IOU = 0.5  # two masks of one image above this IoU count as a near-duplicate pair
SCATTERED = 0.8  # a mask whose largest piece holds less than this share counts as scattered
WIDE = 0.8  # a box wider than this share of the image counts as wide


def pieces(mask: np.ndarray) -> tuple[int, float]:
    """(number of 8-connected pieces, largest piece's share of the area) of one (H, W) mask."""
    n, _, stats, _ = cv2.connectedComponentsWithStats(mask.astype(np.uint8), connectivity=8)
    areas = stats[1:, cv2.CC_STAT_AREA]
    if len(areas) == 0:
        return 0, 0.0
    return int(n - 1), float(areas.max() / areas.sum())


def duplicate_pairs(rec: ImageRecord, dup_iou: float = DUP_IOU) -> int:
    """Pairs of this image's masks whose IoU exceeds ``dup_iou`` (IoU on the RLEs)."""
    if rec.num_masks < 2:
        return 0
    rles = rec.rle_dicts()
    iou = np.asarray(mask_utils.iou(rles, rles, [0] * len(rles)))
    return int(np.triu(iou > dup_iou, k=1).sum())


def image_stats(rec: ImageRecord) -> dict[str, Any]:
    """One image: per mask ``pieces`` and ``largest`` share and ``width`` share; ``dup_pairs``."""
    masks = rec.decode_masks()
    found = [pieces(m) for m in masks]
    width = (rec.boxes[:, 2] - rec.boxes[:, 0]) / max(1, rec.width) if rec.num_masks else []
    return {
        "pieces": [p for p, _ in found],
        "largest": [s for _, s in found],
        "width": [float(w) for w in width],
        "dup_pairs": duplicate_pairs(rec),
    }


def empty_stage(rec: ImageRecord) -> str:
    return rec.error.split(":", 1)[0] if rec.error else "(no reason recorded)"


class StatsCollector:
    """Accumulates :func:`image_stats` over a run's records; :meth:`result` summarises."""

    def __init__(self) -> None:
        self.pieces: list[int] = []
        self.largest: list[float] = []
        self.width: list[float] = []
        self.dup_pairs: list[int] = []
        self.empty: Counter[str] = Counter()

    def add(self, rec: ImageRecord) -> None:
        if rec.status == STATUS_EMPTY:
            self.empty[empty_stage(rec)] += 1
        if rec.status not in (STATUS_OK, STATUS_EMPTY):
            return
        s = image_stats(rec)
        self.pieces += s["pieces"]
        self.largest += s["largest"]
        self.width += s["width"]
        self.dup_pairs.append(s["dup_pairs"])

    def result(self) -> dict[str, Any]:
        def median(v: list[float]) -> float | None:
            return float(np.median(v)) if v else None

        n = len(self.pieces)
        return {
            "masks": n,
            "pieces_per_mask_median": median(self.pieces),
            "pieces_per_mask_mean": float(np.mean(self.pieces)) if n else None,
            "scattered_masks": int(sum(s < SCATTERED for s in self.largest)),
            "wide_boxes": int(sum(w > WIDE for w in self.width)),
            "dup_pairs_per_image_median": median(self.dup_pairs),
            "dup_pairs_per_image_mean": float(np.mean(self.dup_pairs)) if self.dup_pairs else None,
            "empty_by_stage": dict(self.empty.most_common()),
        }


def format_stats(s: dict[str, Any]) -> list[str]:
    """The statistics as summary lines."""
    n = s["masks"]
    if not n:
        lines = ["quality: no masks"]
    else:
        lines = [
            f"quality: pieces per mask median {s['pieces_per_mask_median']:g} "
            f"(mean {s['pieces_per_mask_mean']:.2f}); largest piece < {SCATTERED:.0%} of the "
            f"mask in {s['scattered_masks']} of {n}; boxes wider than {WIDE:.0%} of the image "
            f"{s['wide_boxes']} of {n}",
            f"         near-duplicate pairs (IoU > {DUP_IOU:g}) per image: median "
            f"{s['dup_pairs_per_image_median']:g}, mean {s['dup_pairs_per_image_mean']:.2f}",
        ]
    for stage, count in s["empty_by_stage"].items():
        lines.append(f"    empty x{count}: {stage}")
    return lines
