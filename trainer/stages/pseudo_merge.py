"""Merging a self-training round's predictions with the masks it relabels (CutLER's merge).

A round's pseudo masks are the model's confident predictions. Kept alone they drop every object
the model scores below the threshold, however well the previous round (stage one's saliency
masks, for round 2) had it: on the demo pool the 4,000-iteration K-Net keeps 431 masks at score
0.5 where stage one kept 2,794. CutLER's self-training keeps the earlier round's masks that
overlap no prediction (IoU below 0.5) beside the predictions. ``--merge`` offers that form and its
mirror:

- ``model-first`` (CutLER): every kept prediction, plus each source mask whose IoU with every
  prediction is below ``--merge-iou``;
- ``source-first``: every source mask, plus each prediction whose IoU with every source mask is
  below ``--merge-iou`` (objects the model found and the source missed).

A kept mask keeps what its own round recorded: RLE, box, score and seed (a source mask its stage
one seed, a prediction the seed :func:`trainer.stages.mask_seeds.mask_seeds` gives it). The
merged masks are sorted by score, as the schema asks; the two rounds' scores are on different
scales, so a score cut or top-k at pre-training (``pretrain.pseudo_min_score`` / ``_max_masks``)
mixes them, which is why the demo's pre-training keeps every mask.
"""

from __future__ import annotations

import dataclasses

import numpy as np
from pycocotools import mask as mask_utils

from pipeline.shards.schema import STATUS_OK, STATUS_UNREADABLE, ImageRecord

MERGE_MODES = ("off", "model-first", "source-first")


def _overlapping(extra: ImageRecord, kept: ImageRecord, iou: float) -> np.ndarray:
    """(len(extra),) bool: which of ``extra``'s masks overlap one of ``kept``'s at IoU >= iou."""
    if not kept.rles or not extra.rles:
        return np.zeros(extra.num_masks, bool)
    a, b = extra.rle_dicts(), kept.rle_dicts()
    ious = np.asarray(mask_utils.iou(a, b, [0] * len(b))).reshape(len(a), len(b))
    return (ious >= iou).any(1)


def merge_records(model: ImageRecord, source: ImageRecord, mode: str, iou: float) -> ImageRecord:
    """One image's merged record: ``model`` (this round's predictions) and ``source`` (the masks
    it relabelled) by ``mode``. An unreadable model record, a source record without masks, or
    ``mode`` "off" returns ``model`` as is, so an image with no mask on either side keeps the
    model's empty record and its reason."""
    if mode not in MERGE_MODES:
        raise ValueError(f"merge mode must be one of {MERGE_MODES}, got {mode!r}")
    if mode == "off" or model.status == STATUS_UNREADABLE or not source.rles:
        return model  # (a source image unreadable then and readable now has no masks to add)
    if (model.file_name, model.height, model.width) != (
        source.file_name,
        source.height,
        source.width,
    ):
        raise ValueError(f"merging two different images: {model.file_name}, {source.file_name}")
    first, second = (model, source) if mode == "model-first" else (source, model)
    added = np.flatnonzero(~_overlapping(second, first, iou))
    parts = [(first, np.arange(first.num_masks)), (second, added)]
    rles = [r.rles[int(k)] for r, ks in parts for k in ks]  # never empty: source has masks
    scores = np.concatenate([r.scores[ks] for r, ks in parts]).astype(np.float32)
    order = np.argsort(-scores, kind="stable")
    width = max(r.seeds.shape[1] for r, ks in parts if len(ks))
    seeds = np.concatenate([r.seeds[ks].reshape(len(ks), width) for r, ks in parts])
    return dataclasses.replace(
        model,
        status=STATUS_OK,
        error="",
        rles=[rles[k] for k in order],
        boxes=np.concatenate([r.boxes[ks].reshape(-1, 4) for r, ks in parts])[order],
        scores=scores[order],
        seeds=seeds.astype(np.float16)[order],
        seed_pos=np.concatenate([r.seed_pos[ks].reshape(-1, 3) for r, ks in parts])[order],
    )
