"""COCO mask AP from the one inference path's detections: COCO results per image, pycocotools'
COCOeval (segm) and its six numbers, ground-truth files loaded through the validator, and the
metrics table."""

from __future__ import annotations

import contextlib
import io
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval
from torch import Tensor

from pipeline.cli import UserError
from pipeline.inputs.coco_file import load_coco_file
from trainer.inference.instances import Instances, boxes_of, decode

METRIC_NAMES = ("AP", "AP50", "AP75", "APs", "APm", "APl")  # order of COCOeval.stats[0:6]


def image_results(
    class_logits: Tensor,
    mask_logits: Tensor,
    *,
    image_id: int,
    category_ids: Sequence[int],
    input_size: tuple[int, int],
    image_size: tuple[int, int],
    orig_size: tuple[int, int],
    mask_threshold: float = 0.3,
    max_detections: int = 100,
    scores: Tensor | None = None,
) -> list[dict[str, Any]]:
    """COCO results for one image from the last stage's predictions
    (trainer/inference/instances.py).

    class_logits: (N, C) logits, N kernels, C classes (C == len(category_ids)).
    mask_logits: (N, h, w) logits on the mask grid (h = Hp / mask_stride, w = Wp / mask_stride).
    input_size: (Hp, Wp) padded network input; image_size: (h_img, w_img) the resized image inside
    it (top-left); orig_size: (H, W) of the image on disk, the frame of the ground truth.
    scores: (N, C) detection scores when they are not the sigmoid of ``class_logits``.
    Returns up to ``max_detections`` dicts {"image_id", "category_id", "segmentation" (compressed
    RLE, counts as str), "bbox", "score"}, sorted by score descending, empty masks left out.
    """
    probs = class_logits.float().sigmoid() if scores is None else scores.float()
    if probs.shape[1] != len(category_ids):
        raise ValueError(f"{probs.shape[1]} class scores but {len(category_ids)} category ids")
    masks, score, labels, rles = decode(
        probs,
        mask_logits,
        input_size=input_size,
        image_size=image_size,
        orig_size=orig_size,
        mask_threshold=mask_threshold,
        max_detections=max_detections,
    )
    found = Instances(
        masks=masks.astype(bool),
        boxes=boxes_of(rles),
        scores=score,
        labels=labels,
        category_ids=[int(category_ids[int(c)]) for c in labels],
        rles=rles,
    )
    return found.to_coco(image_id)


def coco_mask_metrics(
    coco_gt: COCO,
    results: list[dict[str, Any]],
    image_ids: Iterable[int] | None = None,
    *,
    class_agnostic: bool = False,
) -> dict[str, float]:
    """Score ``results`` against ``coco_gt`` with COCOeval(iouType="segm").

    image_ids: the images that were evaluated (default: all ground-truth images); an image with no
    detection still counts its ground truth as missed. class_agnostic: COCOeval's useCats=0, any
    detection may match any object (object-discovery AP; the class prediction is ignored).
    Returns fractions in [0, 1] keyed by METRIC_NAMES; pycocotools' -1 (no ground truth in that
    area range) is kept as -1.
    """
    quiet = io.StringIO()  # pycocotools prints progress; the caller prints the table
    with contextlib.redirect_stdout(quiet):
        if results:
            # loadRes adds "id", "area" and a NumPy "bbox" to each dict: give it copies.
            coco_dt = coco_gt.loadRes([dict(r) for r in results])
        else:
            # loadRes cannot take an empty list; an empty result set scores 0 where there is
            # ground truth, exactly what COCOeval gives for an image with no detection.
            coco_dt = COCO()
            coco_dt.dataset = {
                "images": list(coco_gt.dataset["images"]),
                "categories": list(coco_gt.dataset["categories"]),
                "annotations": [],
            }
            coco_dt.createIndex()
        ev = COCOeval(coco_gt, coco_dt, iouType="segm")
        ev.params.useCats = 0 if class_agnostic else 1
        if image_ids is not None:
            ev.params.imgIds = sorted(set(int(i) for i in image_ids))
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    return {name: float(ev.stats[i]) for i, name in enumerate(METRIC_NAMES)}


def load_coco(path: str | Path) -> COCO:
    """pycocotools COCO for a ground-truth JSON, validated (pipeline/inputs/coco_file.py), without
    its
    prints; UserError when missing or malformed. Quiet: the evaluation dataset, built from the
    same file, has already listed any skipped annotation."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"annotation file not found: {path}")
    return load_coco_file(path, quiet=True, unlabelled_ok=True).to_coco()


def format_table(rows: dict[str, dict[str, Any]], extra: Sequence[str] = ()) -> str:
    """A markdown table, one row per name, AP columns in percent (as the paper reports them)."""
    head = ["run", *METRIC_NAMES, *extra]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, m in rows.items():
        cells = [name]
        for key in METRIC_NAMES:
            v = m.get(key)
            cells.append("n/a" if v is None or v < 0 else f"{100 * v:.1f}")
        cells += [str(m.get(key, "")) for key in extra]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)
