"""Recall of proposal shards against ground truth: class-agnostic recall and AP of the pseudo
masks with pycocotools (segm, useCats=0, maxDets 1/10/20), over the shards' images only, matched
by ``image_id``, or by ``file_name`` when the ids do not correspond (shards of an image folder
number images by plan position); ``pipeline inspect --gt`` prints the table and writes it to
``SHARD_DIR/recall.json``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path, PurePosixPath
from typing import Any

import numpy as np
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from pipeline.cli import UserError, code_version
from pipeline.inputs.coco_file import load_coco_file
from pipeline.inspection.coco_export import record_annotations
from pipeline.shards.folder_reader import iter_unique, shard_paths
from pipeline.shards.schema import STATUS_UNREADABLE, read_meta
from pipeline.shards.shard_reader import ShardReader

MAX_DETS = (1, 10, 20)  # the proposal stage keeps at most top_k = 20 masks per image
RECALL_FILE = "recall.json"


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """pycocotools prints progress on stdout; keep the command's own output clean."""
    with contextlib.redirect_stdout(io.StringIO()):
        yield


def _coco_eval(gt: COCO, dets: list[dict[str, Any]], img_ids: list[int]) -> dict[str, Any]:
    """Class-agnostic segm COCOeval of ``dets`` on ``img_ids``; AP/AR read from the arrays.

    COCOeval.summarize() assumes maxDets 100 for AP, so the numbers are read from
    ``eval["precision"]`` (T,R,K,A,M) and ``eval["recall"]`` (T,K,A,M) directly.
    """
    dt = COCO()  # built directly: loadRes() fails on an empty list and copies every GT image
    dt.dataset = {
        "images": [gt.imgs[i] for i in img_ids],
        "categories": gt.dataset["categories"],
        "annotations": dets,
    }
    with _quiet():
        dt.createIndex()
        ev = COCOeval(gt, dt, iouType="segm")
        ev.params.imgIds = list(img_ids)
        ev.params.useCats = 0
        ev.params.maxDets = list(MAX_DETS)
        ev.evaluate()
        ev.accumulate()
    p, precision, recall = ev.params, ev.eval["precision"], ev.eval["recall"]
    a = p.areaRngLbl.index("all")
    t50 = int(np.flatnonzero(np.isclose(p.iouThrs, 0.5))[0])
    t75 = int(np.flatnonzero(np.isclose(p.iouThrs, 0.75))[0])

    def mean(x: np.ndarray) -> float | None:
        valid = x[x > -1]  # -1 marks "no ground truth" in pycocotools' arrays
        return float(valid.mean()) if valid.size else None

    out: dict[str, Any] = {"masks_per_image": len(dets) / max(1, len(img_ids))}
    for m, k in enumerate(MAX_DETS):
        out[f"AR@{k}"] = mean(recall[:, 0, a, m])
        out[f"AR50@{k}"] = mean(recall[t50, 0, a, m])
    for area in ("small", "medium", "large"):
        out[f"AR@{MAX_DETS[-1]}_{area}"] = mean(recall[:, 0, p.areaRngLbl.index(area), -1])
    out["AP"] = mean(precision[:, :, 0, a, -1])
    out["AP50"] = mean(precision[t50, :, 0, a, -1])
    out["AP75"] = mean(precision[t75, :, 0, a, -1])
    return out


def _name_index(gt: COCO) -> dict[str, int]:
    """GT image id by file_name, and by base name where that is unique."""
    by_name = {str(im["file_name"]): int(i) for i, im in gt.imgs.items()}
    bases: dict[str, list[int]] = {}
    for name, i in by_name.items():
        bases.setdefault(PurePosixPath(name).name, []).append(i)
    return {**{b: ids[0] for b, ids in bases.items() if len(ids) == 1}, **by_name}


def choose_matching(paths: Sequence[Path], gt: COCO) -> tuple[str, Callable[[int, str], int]]:
    """("image_id" | "file_name", (shard image_id, file_name) -> GT image id or -1).

    Shards of a COCO JSON keep its ids; shards of a folder number images by plan position, which
    a GT file's ids need not follow. Ids are used when every shard image found under its id there
    has that file name too and names find no more images; otherwise images are matched by file
    name (then base name)."""
    by_name = _name_index(gt)
    conflicts = agree = named = 0
    for path in paths:
        with ShardReader(path) as reader:
            table = reader.image_table()
        for i, name in zip(table["image_id"].tolist(), table["file_name"].tolist()):
            named += str(name) in by_name or PurePosixPath(str(name)).name in by_name
            info = gt.imgs.get(int(i))
            if info is None:
                continue
            same = PurePosixPath(str(info["file_name"])).name == PurePosixPath(str(name)).name
            agree, conflicts = agree + same, conflicts + (not same)
    if agree and not conflicts and agree >= named:
        return "image_id", lambda image_id, file_name: int(image_id)

    def by_file(image_id: int, file_name: str) -> int:
        return by_name.get(file_name, by_name.get(PurePosixPath(file_name).name, -1))

    return "file_name", by_file


def recall_against_gt(
    shard_dir: str | Path, gt_json: str | Path, score_cuts: Sequence[float] = ()
) -> dict[str, Any]:
    """Class-agnostic recall and AP of the pseudo masks against a COCO ground-truth file.

    Images are matched by ``image_id`` and only images present in the shards are evaluated
    (unreadable ones count, with no masks). Metrics (pycocotools, iouType "segm", useCats 0,
    maxDets 1/10/20, 101-point AP): ``AR@k`` (IoU 0.5:0.95), ``AR50@k`` (IoU 0.5), ``AR@20_small``
    / ``_medium`` / ``_large``, ``AP``, ``AP50``, ``AP75``; None where there is no ground truth.
    ``score_cuts``: also evaluate keeping only masks with score >= each cut, which equals
    re-running the proposals with that ``score_threshold`` (the threshold only filters at the
    end), so shards made with a low threshold show every higher one.
    """
    paths = shard_paths(shard_dir)
    gt_path = Path(gt_json)
    if not gt_path.is_file():
        raise UserError(f"ground-truth file not found: {gt_path}")
    # Validated like every COCO reader (pipeline/inputs/coco_file.py); categories are optional here:
    # recall is class-agnostic.
    gt = load_coco_file(gt_path, categories=False).to_coco()
    # With useCats=0 COCOeval still gathers detections through the GT's category ids, so every
    # detection takes one of them (which one does not matter).
    cat_ids = gt.getCatIds()
    category = int(cat_ids[0]) if cat_ids else 1
    if not cat_ids:
        gt.dataset["categories"] = [{"id": 1, "name": "object"}]
        gt.cats = {1: gt.dataset["categories"][0]}
    matched_by, gt_id_of = choose_matching(paths, gt)
    img_ids, dets = [], []
    n_records = 0
    for rec in iter_unique(paths, "recall"):
        n_records += 1
        info = gt.imgs.get(gt_id_of(rec.image_id, rec.file_name))
        if info is None:
            continue
        rec = dataclasses.replace(rec, image_id=int(info["id"]))
        if rec.status != STATUS_UNREADABLE and (rec.height, rec.width) != (
            info["height"],
            info["width"],
        ):
            raise UserError(
                f"image_id {rec.image_id} ({rec.file_name}) is {rec.width}x"
                f"{rec.height} in the shards but {info['width']}x{info['height']} in "
                f"{gt_path}: is this the ground truth of these images?"
            )
        img_ids.append(int(rec.image_id))
        dets += record_annotations(rec, category, len(dets) + 1)
    if not img_ids:
        raise UserError(
            f"none of the {n_records} shard images is in {gt_path} (matched by image_id or "
            "file_name)"
        )
    meta = read_meta(paths[0])
    result: dict[str, Any] = {
        "shard_dir": str(shard_dir),
        "gt": str(gt_path),
        "fingerprint": meta.get("fingerprint"),
        "backbone": meta.get("backbone"),
        "settings": meta.get("settings"),
        "version": code_version(),
        "iou_type": "segm",
        "matched_by": matched_by,
        "class_agnostic": True,
        "max_dets": list(MAX_DETS),
        "images_in_shards": n_records,
        "images_evaluated": len(img_ids),
        "images_not_in_gt": n_records - len(img_ids),
        "gt_instances": len(gt.getAnnIds(imgIds=img_ids, iscrowd=False)),
        "masks": len(dets),
        "metrics": _coco_eval(gt, dets, img_ids),
        "by_score": [],
    }
    for cut in sorted(float(c) for c in score_cuts):
        kept = [d for d in dets if d["score"] >= cut]
        result["by_score"].append({"min_score": cut, **_coco_eval(gt, kept, img_ids)})
    return result


RECALL_COLUMNS = (
    "masks_per_image",
    "AR@1",
    "AR@10",
    "AR@20",
    "AR50@1",
    "AR50@10",
    "AR50@20",
    "AP",
    "AP50",
)


def format_recall(r: dict[str, Any]) -> str:
    lines = [
        f"pseudo masks vs {r['gt']}: class-agnostic segm, {r['images_evaluated']} images "
        f"matched by {r.get('matched_by', 'image_id')} "
        f"({r['images_not_in_gt']} shard images not in the GT), {r['gt_instances']} "
        f"objects, {r['masks']} masks"
    ]
    header = f"{'min score':>9} " + " ".join(
        f"{c.replace('masks_per_image', 'masks/img'):>9}" for c in RECALL_COLUMNS
    )
    lines.append(header)
    rows = [("all", r["metrics"])] + [(f"{b['min_score']:.2f}", b) for b in r["by_score"]]
    for label, m in rows:
        cells = ["n/a" if m[c] is None else f"{m[c]:.3f}" for c in RECALL_COLUMNS]
        lines.append(f"{label:>9} " + " ".join(f"{v:>9}" for v in cells))
    return "\n".join(lines)
