"""COCO export of proposal shards: the pseudo masks as a COCO *instances* file.

One category "object"; every annotation carries its ``score``: ``COCO(path)`` loads the file as
a dataset and ``coco_gt.loadRes(json.load(open(path))["annotations"])`` uses it as detections.
The per-record annotations are also the detections ``pipeline.inspection.recall`` evaluates.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pipeline.atomic_files import write_json
from pipeline.cli import code_version
from pipeline.shards.folder_reader import iter_unique, mask_areas, shard_paths
from pipeline.shards.schema import STATUS_UNREADABLE, ImageRecord, read_meta


def record_annotations(rec: ImageRecord, category_id: int, first_id: int) -> list[dict[str, Any]]:
    """COCO annotations (RLE segmentation, xywh box, area, score) for one record's masks."""
    areas = mask_areas(rec)
    anns = []
    for k, counts in enumerate(rec.rles):
        x0, y0, x1, y1 = (float(v) for v in rec.boxes[k])
        anns.append(
            {
                "id": first_id + k,
                "image_id": int(rec.image_id),
                "category_id": category_id,
                "segmentation": {"size": [rec.height, rec.width], "counts": counts.decode("ascii")},
                "area": float(areas[k]),
                "bbox": [x0, y0, x1 - x0, y1 - y0],
                "score": float(rec.scores[k]),
                "iscrowd": 0,
            }
        )
    return anns


def to_coco(shard_dir: str | Path, path: str | Path) -> dict[str, Any]:
    """Write the pseudo masks as a COCO instances JSON at ``path`` and return it.

    Images: every readable image (ok and empty; unreadable ones have no size and are left out).
    One category ``{"id": 1, "name": "object"}``. Annotations: compressed-RLE segmentation at the
    original size, ``bbox`` [x, y, w, h] from the stored box, ``area`` in pixels, ``score``,
    ``iscrowd`` 0, ids from 1. Loadable with ``pycocotools.coco.COCO(path)``.
    """
    paths = shard_paths(shard_dir)
    meta = read_meta(paths[0])
    images, anns = [], []
    skipped = 0
    for rec in iter_unique(paths, "to-coco"):
        if rec.status == STATUS_UNREADABLE:
            skipped += 1
            continue
        images.append(
            {
                "id": int(rec.image_id),
                "file_name": rec.file_name,
                "height": int(rec.height),
                "width": int(rec.width),
            }
        )
        anns += record_annotations(rec, 1, len(anns) + 1)
    data = {
        "info": {
            "description": f"saliency pseudo masks from {shard_dir}",
            "fingerprint": meta.get("fingerprint"),
            "backbone": meta.get("backbone"),
            "version": code_version(),
            "unreadable_images_left_out": skipped,
        },
        "images": images,
        "annotations": anns,
        "categories": [{"id": 1, "name": "object", "supercategory": "object"}],
    }
    write_json(path, data, indent=None)
    return data
