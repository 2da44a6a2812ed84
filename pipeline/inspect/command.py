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
:func:`pipeline.inspect.render.render`, :func:`pipeline.inspect.coco_export.to_coco`,
:func:`pipeline.inspect.recall.recall_against_gt`; the shard-reading helpers are in
``pipeline.shards.reader``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.atomic_files import write_json
from pipeline.cli import UserError
from pipeline.inspect.coco_export import to_coco
from pipeline.inspect.recall import (
    RECALL_FILE,
    format_recall,
    recall_against_gt,
)
from pipeline.inspect.render import render
from pipeline.saliency.mask_stats import StatsCollector, format_stats, image_stats
from pipeline.shards.reader import iter_records, mask_areas, shard_paths
from pipeline.shards.schema import (
    STATUS_EMPTY,
    STATUS_OK,
    STATUS_UNREADABLE,
    ImageRecord,
    ShardReader,
    list_temp_files,
    read_meta,
    shard_index,
)

__all__ = ["add_arguments", "find_image", "format_image", "format_summary", "run", "summarise"]

STATUS_NAMES = {STATUS_OK: "ok", STATUS_EMPTY: "empty", STATUS_UNREADABLE: "unreadable"}
QUANTILES = (0.0, 0.1, 0.25, 0.5, 0.75, 0.9, 1.0)
PLAN_FILE = "plan.json"  # written by `pipeline proposals` (optional here: tells missing shards)


# --------------------------------------------------------------------------------------------
# Summary


def _quantiles(values: Sequence[float]) -> dict[str, float] | None:
    if len(values) == 0:
        return None
    v = np.asarray(values, np.float64)
    out = {f"p{round(q * 100)}": float(np.quantile(v, q)) for q in QUANTILES}
    out["mean"] = float(v.mean())
    return out


def _json_attr(value: Any) -> Any:
    try:
        return json.loads(value) if value is not None else None
    except (TypeError, json.JSONDecodeError):
        return value


def summarise(shard_dir: str | Path) -> dict[str, Any]:
    """Counts, distributions and attributes of every shard in ``shard_dir`` as a plain dict."""
    folder = Path(shard_dir)
    paths = shard_paths(folder)
    metas = {p.name: read_meta(p) for p in paths}
    fingerprints = Counter(str(m.get("fingerprint")) for m in metas.values())
    conflicts = {}
    for key in ("backbone", "feature_stride", "embed_dim", "settings", "created_with"):
        values = sorted({json.dumps(m.get(key), sort_keys=True) for m in metas.values()})
        if len(values) > 1:
            conflicts[key] = [json.loads(v) for v in values]
    first = metas[paths[0].name]
    settings = _json_attr(first.get("settings"))

    planned = None
    plan_file = folder / PLAN_FILE
    if plan_file.is_file():
        with contextlib.suppress(OSError, ValueError, KeyError, TypeError):
            planned = int(json.loads(plan_file.read_text())["num_shards"])
    present = {shard_index(p) for p in paths}
    top = max(planned or 0, max(present) + 1)
    missing = sorted(set(range(top)) - present)

    status: Counter[str] = Counter()
    reasons: Counter[str] = Counter()
    per_image: Counter[int] = Counter()
    scores: list[np.ndarray] = []
    fractions: list[np.ndarray] = []
    ids: Counter[int] = Counter()
    quality = StatsCollector()
    for _, _, rec in iter_records(paths, "summary"):
        status[STATUS_NAMES.get(rec.status, str(rec.status))] += 1
        quality.add(rec)
        ids[rec.image_id] += 1
        if rec.status == STATUS_UNREADABLE:
            reasons[rec.error or "(no reason)"] += 1
            continue
        per_image[rec.num_masks] += 1
        scores.append(np.asarray(rec.scores, np.float64))
        fractions.append(mask_areas(rec) / max(1, rec.height * rec.width))
    scores_all = np.concatenate(scores) if scores else np.zeros(0)
    fractions_all = np.concatenate(fractions) if fractions else np.zeros(0)
    n_images = sum(status.values())
    n_bytes = sum(p.stat().st_size for p in paths)
    readable = sum(per_image.values())
    return {
        "shard_dir": str(folder),
        "num_shards": len(paths),
        "planned_shards": planned,
        "missing_shards": missing,
        "temp_files": [p.name for p in list_temp_files(folder)],
        "images": n_images,
        "status": {name: status.get(name, 0) for name in STATUS_NAMES.values()},
        "unreadable_reasons": reasons.most_common(5),
        "masks": int(len(scores_all)),
        "masks_per_image": {
            "histogram": {int(k): per_image[k] for k in sorted(per_image)},
            "mean": float(len(scores_all) / readable) if readable else None,
        },
        "score": _quantiles(scores_all),
        "area_fraction": _quantiles(fractions_all),
        "quality": quality.result(),
        "bytes": n_bytes,
        "bytes_per_image": n_bytes / n_images if n_images else None,
        "duplicate_image_ids": sum(1 for c in ids.values() if c > 1),
        "fingerprints": dict(fingerprints),
        "mixed_fingerprints": len(fingerprints) > 1,
        "meta": {
            "schema_version": first.get("schema_version"),
            "fingerprint": first.get("fingerprint"),
            "backbone": first.get("backbone"),
            "feature_stride": first.get("feature_stride"),
            "embed_dim": first.get("embed_dim"),
            "created_with": first.get("created_with"),
            "settings": settings,
            # a self-training round's record (trainer/stages/self_training.py); None for stage one
            "self_training": _json_attr(first.get("self_training")),
        },
        "meta_conflicts": conflicts,
    }


def _histogram(counts: dict[int, int], width: int = 40) -> list[str]:
    """One text bar per mask count; counts above 30 distinct values are grouped in ranges."""
    if not counts:
        return ["    (no readable image)"]
    keys = sorted(counts)
    step = max(1, -(-(keys[-1] + 1) // 30))  # ceil: at most ~30 rows
    rows: dict[int, int] = Counter()
    for k, c in counts.items():
        rows[k // step * step] += c
    peak = max(rows.values())
    lines = []
    for lo in range(0, keys[-1] + 1, step):
        c = rows.get(lo, 0)
        label = f"{lo}" if step == 1 else f"{lo}-{lo + step - 1}"
        lines.append(f"    {label:>7} | {'#' * round(width * c / peak):<{width}} {c}")
    return lines


def _fmt_q(q: dict[str, float] | None, pct: bool = False) -> str:
    if q is None:
        return "(no masks)"
    f = (lambda v: f"{100 * v:.2f}%") if pct else (lambda v: f"{v:.3f}")
    names = {"p0": "min", "p100": "max"}
    keys = [f"p{round(x * 100)}" for x in QUANTILES]
    return "  ".join(f"{names.get(k, k)}={f(q[k])}" for k in keys) + f"  mean={f(q['mean'])}"


def format_summary(s: dict[str, Any]) -> str:
    """The summary dict as the text the command prints."""
    lines = []
    if s["mixed_fingerprints"]:
        lines.append("!" * 78)
        lines.append(
            f"!! MIXED FINGERPRINTS: {len(s['fingerprints'])} different fingerprints "
            "in one folder: these shards were made with different backbone weights "
            "or proposal settings"
        )
        for fp, n in sorted(s["fingerprints"].items()):
            lines.append(f"!!   {fp[:16]}...  {n} shard(s)")
        lines.append("!" * 78)
    m = s["meta"]
    planned = f" of {s['planned_shards']} planned" if s["planned_shards"] is not None else ""
    lines.append(f"shards: {s['num_shards']}{planned} in {s['shard_dir']}")
    if s["missing_shards"]:
        lines.append(f"  INCOMPLETE: missing shard indices {_short_list(s['missing_shards'])}")
    if s["temp_files"]:
        lines.append(
            f"  unfinished temporary files (a writer was interrupted): "
            f"{_short_list(s['temp_files'])}"
        )
    lines.append(
        f"schema v{m['schema_version']}  backbone {m['backbone']}  stride "
        f"{m['feature_stride']}  embed dim {m['embed_dim']}  created with "
        f"{m['created_with']}"
    )
    lines.append(f"fingerprint {m['fingerprint']}")
    lines.append(f"settings {json.dumps(m['settings'], sort_keys=True)}")
    if m.get("self_training"):
        lines.append(f"self-training {json.dumps(m['self_training'], sort_keys=True)}")
    for key, values in s["meta_conflicts"].items():
        lines.append(f"  WARNING: shards disagree on {key}: {values}")
    st = s["status"]
    lines.append(
        f"images: {s['images']}  ok {st['ok']}  empty {st['empty']}  unreadable {st['unreadable']}"
    )
    for reason, n in s["unreadable_reasons"]:
        lines.append(f"    unreadable x{n}: {reason}")
    if s["duplicate_image_ids"]:
        lines.append(f"  WARNING: {s['duplicate_image_ids']} image_id(s) appear more than once")
    mean = s["masks_per_image"]["mean"]
    lines.append(
        f"masks: {s['masks']}  per readable image "
        f"{'n/a' if mean is None else f'{mean:.2f}'}; histogram (masks: images)"
    )
    lines += _histogram(s["masks_per_image"]["histogram"])
    lines.append(f"score:        {_fmt_q(s['score'])}")
    lines.append(f"area (image): {_fmt_q(s['area_fraction'], pct=True)}")
    lines += format_stats(s["quality"])
    per = s["bytes_per_image"]
    lines.append(
        f"size: {s['bytes'] / 2**20:.2f} MiB, "
        f"{'n/a' if per is None else f'{per / 1024:.1f} KiB'} per image"
    )
    return "\n".join(lines)


def _short_list(items: Sequence[Any], n: int = 10) -> str:
    head = ", ".join(str(x) for x in items[:n])
    return head + (f", ... ({len(items)} in all)" if len(items) > n else "")


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
