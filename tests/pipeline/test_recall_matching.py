"""inspect --gt on shards of an image folder: the folder numbers images by plan position, the GT
file by its own ids, so images are matched by file name (and the result says so)."""

from __future__ import annotations

import json

import numpy as np
from pycocotools import mask as mask_utils

from pipeline.inspection.recall import format_recall, recall_against_gt
from pipeline.shards.schema import STATUS_OK, ImageRecord, shard_name, write_shard

H, W = 20, 30
META = {
    "fingerprint": "c" * 64,
    "backbone": "dinov2_vits14",
    "feature_stride": 14,
    "embed_dim": 4,
    "settings": {},
}


def _mask(top: int) -> np.ndarray:
    m = np.zeros((H, W), np.uint8)
    m[top : top + 8, 5:20] = 1
    return m


def _rle(m: np.ndarray) -> dict:
    rle = mask_utils.encode(np.asfortranarray(m))
    return {"size": rle["size"], "counts": rle["counts"].decode()}


def test_gt_with_other_ids_is_matched_by_file_name(tmp_path):
    names = ["a.png", "b.png"]
    records = [
        ImageRecord(
            file_name=n,
            image_id=i,  # a folder run: plan position
            height=H,
            width=W,
            status=STATUS_OK,
            rles=[mask_utils.encode(np.asfortranarray(_mask(2 + 5 * i)))["counts"]],
            boxes=np.array([[5, 2, 20, 10]], np.float32),
            scores=np.array([0.9], np.float32),
            seeds=np.ones((1, 4), np.float16),
            seed_pos=np.zeros((1, 3), np.int16),
        )
        for i, n in enumerate(names)
    ]
    write_shard(tmp_path / shard_name(0), records, META)
    # The GT numbers b.png 1 and a.png 2: ids exist in both but name other images.
    gt = {
        "images": [
            {"id": 2, "file_name": "a.png", "height": H, "width": W},
            {"id": 1, "file_name": "b.png", "height": H, "width": W},
        ],
        "annotations": [
            {
                "id": k + 1,
                "image_id": image_id,
                "category_id": 1,
                "segmentation": _rle(_mask(top)),
                "area": 120.0,
                "bbox": [5, top, 15, 8],
                "iscrowd": 0,
            }
            for k, (image_id, top) in enumerate([(2, 2), (1, 7)])
        ],
        "categories": [{"id": 1, "name": "thing"}],
    }
    gt_path = tmp_path / "gt.json"
    gt_path.write_text(json.dumps(gt))
    result = recall_against_gt(tmp_path, gt_path)
    assert result["matched_by"] == "file_name" and result["images_evaluated"] == 2
    assert result["metrics"]["AR@1"] == 1.0  # each mask found on its own image
    assert "matched by file_name" in format_recall(result)
