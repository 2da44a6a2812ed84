"""Pseudo masks of two stage-one runs on the same images, mask by mask (precision checks).

    python bench/compare_shards.py RUN_A RUN_B [--iou 0.5] [--out bench/results/X.json]

Per image, masks of A and B are paired by maximum total IoU (Hungarian, scipy); a pair below
``--iou`` counts as unmatched. Reported: images, masks in A and B, pairs, mean IoU of the pairs,
masks only in A ("lost") and only in B ("added"), and the mean absolute score difference of the
pairs. Used to check that bf16 stage one gives fp32's pseudo masks (docs/benchmarks.md).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
from pycocotools import mask as mask_util
from scipy.optimize import linear_sum_assignment

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline.atomic_files import write_json  # noqa: E402
from pipeline.shards.folder_reader import iter_unique, shard_paths  # noqa: E402


def _records(folder: str) -> dict:
    return {r.file_name: r for r in iter_unique(shard_paths(folder))}


def _rles(rec) -> list[dict]:
    return [{"size": [rec.height, rec.width], "counts": c} for c in (rec.rles or [])]


def compare(a_dir: str, b_dir: str, min_iou: float) -> dict:
    a_all, b_all = _records(a_dir), _records(b_dir)
    common = sorted(set(a_all) & set(b_all))
    n_a = n_b = pairs = 0
    ious: list[float] = []
    score_diffs: list[float] = []
    for name in common:
        a, b = a_all[name], b_all[name]
        ra, rb = _rles(a), _rles(b)
        n_a, n_b = n_a + len(ra), n_b + len(rb)
        if not ra or not rb:
            continue
        iou = mask_util.iou(ra, rb, [0] * len(rb))
        rows, cols = linear_sum_assignment(-iou)
        keep = iou[rows, cols] >= min_iou
        pairs += int(keep.sum())
        ious += iou[rows, cols][keep].tolist()
        score_diffs += np.abs(a.scores[rows[keep]] - b.scores[cols[keep]]).tolist()
    return {
        "images": len(common),
        "images_only_in_one": len(set(a_all) ^ set(b_all)),
        "masks_a": n_a,
        "masks_b": n_b,
        "pairs": pairs,
        "mean_pair_iou": float(np.mean(ious)) if ious else None,
        "lost": n_a - pairs,
        "added": n_b - pairs,
        "mean_abs_score_diff": float(np.mean(score_diffs)) if score_diffs else None,
        "min_iou": min_iou,
    }


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("a")
    p.add_argument("b")
    p.add_argument("--iou", type=float, default=0.5)
    p.add_argument("--out", default="")
    args = p.parse_args()
    report = {"a": args.a, "b": args.b, **compare(args.a, args.b, args.iou)}
    if args.out:
        write_json(args.out, report)
    print(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
