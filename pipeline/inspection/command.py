"""Inspect proposal shards: summary, one image's masks, rendered grids, COCO export, recall.

    python -m pipeline inspect SHARD_DIR [--image ID] [--render DIR] [--to-coco FILE]
                                         [--gt COCO_JSON [--score-cuts T1,T2]]
                                         [--image-root DIR] [--max-render N]

The summary (always printed) counts shards and images by status, shows how many masks images
keep, the score and mask-area distributions, bytes per image and the shards' attributes; shards
made with different fingerprints are reported loudly. ``--render`` draws 4x4 grids of images
with their masks, boxes and scores. ``--to-coco`` writes a COCO *instances* file (one category
"object"; every annotation carries its ``score``): ``COCO(path)`` loads it as a dataset and
``coco_gt.loadRes(json.load(open(path))["annotations"])`` uses it as detections.
``--gt`` measures class-agnostic recall and AP of the pseudo masks against ground truth with
pycocotools (segm, useCats=0, maxDets 1/10/20), over the shards' images only, matched by
``image_id``, and writes the table to ``SHARD_DIR/recall.json``.

Everything is reusable from Python: :func:`summarise`, :func:`find_image` (here),
:func:`pipeline.inspection.render.render`, :func:`pipeline.inspection.coco_export.to_coco`,
:func:`pipeline.inspection.recall.recall_against_gt`; the shard-reading helpers are in
``pipeline.shards.folder_reader``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

from pipeline.atomic_files import write_json
from pipeline.cli import UserError
from pipeline.inspection.coco_export import to_coco
from pipeline.inspection.recall import (
    RECALL_FILE,
    format_recall,
    recall_against_gt,
)
from pipeline.inspection.render import render
from pipeline.inspection.summary import STATUS_NAMES, format_summary, summarise
from pipeline.saliency.mask_stats import image_stats
from pipeline.shards.folder import PLAN_FILE
from pipeline.shards.folder_reader import mask_areas, shard_paths
from pipeline.shards.schema import ImageRecord
from pipeline.shards.shard_reader import ShardReader

__all__ = ["add_arguments", "find_image", "format_image", "format_summary", "run", "summarise"]


# --------------------------------------------------------------------------------------------
# Summary


# --------------------------------------------------------------------------------------------
# One image


def find_image(shard_dir: str | Path, image: int | str) -> tuple[Path, int, ImageRecord]:
    """(shard, index, record) of the image with this image_id (int) or file_name (str)."""
    paths = shard_paths(shard_dir)
    key = int(image) if isinstance(image, str) and image.lstrip("-").isdigit() else image
    for path in paths:
        with ShardReader(path) as reader:
            table = reader.image_table()
            field = "image_id" if isinstance(key, int) else "file_name"
            hits = np.flatnonzero(table[field] == key)
            if hits.size:
                return path, int(hits[0]), reader.record(int(hits[0]))
    raise UserError(f"image {image!r} is not in {shard_dir} (give an image_id or a file_name)")


def format_image(path: Path, index: int, rec: ImageRecord) -> str:
    status = STATUS_NAMES.get(rec.status, str(rec.status))
    lines = [
        f"image {rec.image_id}  {rec.file_name}  {rec.width}x{rec.height}  status {status}"
        f"{'  (' + rec.error + ')' if rec.error else ''}  [{path.name} #{index}]"
    ]
    if not rec.num_masks:
        lines.append("  no masks")
        return "\n".join(lines)
    areas = mask_areas(rec)
    q = image_stats(rec)
    lines.append(
        f"  {'#':>3} {'score':>6} {'area px':>9} {'area %':>7}  "
        f"{'box x0,y0,x1,y1':<24} seed (scale,row,col)  width pieces largest"
    )
    for k in range(rec.num_masks):
        box = ",".join(f"{v:.0f}" for v in rec.boxes[k])
        pos = ",".join(str(int(v)) for v in rec.seed_pos[k])
        lines.append(
            f"  {k:>3} {rec.scores[k]:6.3f} {areas[k]:9.0f} "
            f"{100 * areas[k] / max(1, rec.height * rec.width):6.2f}%  {box:<24} ({pos})  "
            f"{q['width'][k]:5.0%} {q['pieces'][k]:>6} {q['largest'][k]:7.0%}"
        )
    lines.append(f"  near-duplicate pairs: {q['dup_pairs']}")
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------
# Command line


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("shard_dir", help="folder of shard-NNNNN.h5 files")
    parser.add_argument(
        "--image",
        default=None,
        metavar="ID",
        help="list one image's masks (image_id, or file_name)",
    )
    parser.add_argument(
        "--render",
        default=None,
        metavar="DIR",
        help="write PNG grids of images with their masks into DIR",
    )
    parser.add_argument(
        "--image-root",
        default=None,
        metavar="DIR",
        help="folder the shards' file names are relative to "
        "(default: the one recorded in SHARD_DIR/plan.json, else data.train_images)",
    )
    parser.add_argument(
        "--max-render",
        type=int,
        default=64,
        metavar="N",
        help="render at most N images (default 64: four 4x4 pages)",
    )
    parser.add_argument(
        "--tile", type=int, default=256, metavar="PX", help="render: tile size (default 256)"
    )
    parser.add_argument(
        "--grid", type=int, default=4, metavar="N", help="render: N x N tiles a page (default 4)"
    )
    parser.add_argument(
        "--top-k", type=int, default=0, metavar="K", help="render: draw the best K masks (0: all)"
    )
    parser.add_argument(
        "--min-score", type=float, default=0.0, metavar="S", help="render: masks scored >= S"
    )
    parser.add_argument(
        "--to-coco",
        default=None,
        metavar="FILE",
        help="write the pseudo masks as a COCO instances JSON",
    )
    parser.add_argument(
        "--gt",
        default=None,
        metavar="COCO_JSON",
        help="recall/AP against this ground truth; writes SHARD_DIR/recall.json",
    )
    parser.add_argument(
        "--score-cuts",
        default="",
        metavar="T1,T2,...",
        help="with --gt, also evaluate only masks with score >= each cut",
    )


def image_root(args: argparse.Namespace, shard_dir: Path) -> tuple[str, str]:
    """(root, where it came from): --image-root, else the one the proposals recorded in
    plan.json, else (folders made before roots were recorded) the config's data.train_images."""
    if args.image_root is not None:
        return str(args.image_root), "from --image-root"
    try:
        recorded = json.loads((shard_dir / PLAN_FILE).read_text()).get("image_root")
    except (OSError, ValueError, AttributeError):
        recorded = None
    if recorded:
        return str(recorded), f"recorded in {PLAN_FILE}"
    from pipeline.config import load_pipeline_config

    root = load_pipeline_config(args.config, args.overrides)[0].data.train_images
    return root, f"data.train_images: {shard_dir} records none"


def run(args: argparse.Namespace) -> int:
    shard_dir = Path(args.shard_dir)
    try:
        cuts = [float(c) for c in args.score_cuts.split(",") if c.strip()]
    except ValueError:
        msg = f"--score-cuts expects numbers like 0.5,0.6, not '{args.score_cuts}'"
        raise UserError(msg) from None
    summary = summarise(shard_dir)
    print(format_summary(summary))
    if summary["mixed_fingerprints"]:
        print(
            f"pipeline inspect: WARNING: {shard_dir} mixes shards of "
            f"{len(summary['fingerprints'])} different fingerprints",
            file=sys.stderr,
        )
    if args.image is not None:
        found = find_image(shard_dir, args.image)
        root, where = image_root(args, shard_dir)
        print()
        print(format_image(*found))
        print(f"  file {Path(root) / found[2].file_name} (image root {where})")
    if args.render:
        root, where = image_root(args, shard_dir)
        only = None if args.image is None else found[2].image_id
        pages = render(
            shard_dir,
            args.render,
            root,
            args.max_render,
            grid=args.grid,
            tile=args.tile,
            top_k=args.top_k,
            min_score=args.min_score,
            only=only,
        )
        drawn = 1 if only is not None else min(args.max_render, summary["images"])
        print(
            f"\nrendered {drawn} image{'s' if drawn != 1 else ''} (image root {root}, "
            f"{where}) into {len(pages)} PNG(s) in {args.render}"
        )
    if args.to_coco:
        data = to_coco(shard_dir, args.to_coco)
        print(
            f"\nwrote {args.to_coco}: {len(data['images'])} images, "
            f"{len(data['annotations'])} annotations (COCO instances, category 'object')"
        )
    if args.gt:
        result = recall_against_gt(shard_dir, args.gt, cuts)
        print()
        print(format_recall(result))
        try:
            write_json(shard_dir / RECALL_FILE, result)
        except OSError as e:
            raise UserError(f"cannot write {shard_dir / RECALL_FILE}: {e.strerror}") from None
        print(f"wrote {shard_dir / RECALL_FILE}")
    return 0
