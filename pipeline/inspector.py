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

Everything is reusable from Python: :func:`summarise`, :func:`find_image`, :func:`render`,
:func:`to_coco`, :func:`recall_against_gt`.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import sys
from collections import Counter
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import cv2
import numpy as np
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval
from tqdm import tqdm

from pipeline.cli import UserError, code_version
from pipeline.shards import (
    STATUS_EMPTY,
    STATUS_OK,
    STATUS_UNREADABLE,
    ImageRecord,
    ShardReader,
    list_shards,
    list_temp_files,
    read_meta,
    shard_index,
)

STATUS_NAMES = {STATUS_OK: "ok", STATUS_EMPTY: "empty", STATUS_UNREADABLE: "unreadable"}
QUANTILES = (0.0, 0.1, 0.25, 0.5, 0.75, 0.9, 1.0)
MAX_DETS = (1, 10, 20)  # the proposal stage keeps at most top_k = 20 masks per image
RECALL_FILE = "recall.json"
PLAN_FILE = "plan.json"  # written by `pipeline proposals` (optional here: tells missing shards)
# Distinct colours (RGB) for masks in rendered grids.
PALETTE = (
    (230, 25, 75),
    (60, 180, 75),
    (255, 225, 25),
    (0, 130, 200),
    (245, 130, 48),
    (145, 30, 180),
    (70, 240, 240),
    (240, 50, 230),
    (210, 245, 60),
    (250, 190, 212),
    (0, 128, 128),
    (170, 110, 40),
)


# --------------------------------------------------------------------------------------------
# Reading


def shard_paths(shard_dir: str | Path) -> list[Path]:
    """The final shard files of ``shard_dir``; UserError when the folder or shards are missing."""
    folder = Path(shard_dir)
    if not folder.is_dir():
        raise UserError(f"shard folder not found: {folder}")
    paths = list_shards(folder)
    if not paths:
        temps = list_temp_files(folder)
        extra = f" ({len(temps)} unfinished temporary file(s) only)" if temps else ""
        raise UserError(f"no shard files (shard-NNNNN.h5) in {folder}{extra}")
    for p in paths:
        read_meta(p)  # ShardError (one line) on an unknown schema version or a non-shard file
    return paths


def iter_records(paths: Sequence[Path], desc: str = "") -> Iterator[tuple[Path, int, ImageRecord]]:
    """(shard path, index in shard, record) for every image of every shard, in shard order.
    ``desc``: show a progress bar with this label (on a terminal only)."""
    total = sum(int(read_meta(p)["num_images"]) for p in paths) if desc else None
    with tqdm(
        total=total,
        desc=desc,
        unit="img",
        leave=False,
        dynamic_ncols=True,
        disable=None if desc else True,
    ) as bar:
        for path in paths:
            with ShardReader(path) as reader:
                for i, rec in enumerate(reader.records()):
                    yield path, i, rec
                    bar.update(1)


def _rle_dicts(rec: ImageRecord) -> list[dict[str, Any]]:
    return [{"size": [rec.height, rec.width], "counts": c} for c in rec.rles]


def _mask_areas(rec: ImageRecord) -> np.ndarray:
    """(K,) pixel areas of the record's masks, straight from the RLE (no decoding)."""
    if not rec.rles:
        return np.zeros(0, np.float64)
    return np.asarray(mask_utils.area(_rle_dicts(rec)), np.float64)


def iter_unique(paths: Sequence[Path], desc: str = "") -> Iterator[ImageRecord]:
    """Every record, one at a time (all seeds of a big set would not fit in memory); UserError
    when two images share an image_id (COCO files need unique ids)."""
    seen: dict[int, str] = {}
    for _, _, rec in iter_records(paths, desc):
        if rec.image_id in seen:
            raise UserError(
                f"image_id {rec.image_id} appears twice ({seen[rec.image_id]} and "
                f"{rec.file_name}); shards from different runs mixed in one folder?"
            )
        seen[rec.image_id] = rec.file_name
        yield rec


# --------------------------------------------------------------------------------------------
# Summary


def _quantiles(values: Sequence[float]) -> dict[str, float] | None:
    if len(values) == 0:
        return None
    v = np.asarray(values, np.float64)
    out = {f"p{round(q * 100)}": float(np.quantile(v, q)) for q in QUANTILES}
    out["mean"] = float(v.mean())
    return out


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
    try:
        settings = json.loads(first.get("settings", "null"))
    except (TypeError, json.JSONDecodeError):
        settings = first.get("settings")

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
    for _, _, rec in iter_records(paths, "summary"):
        status[STATUS_NAMES.get(rec.status, str(rec.status))] += 1
        ids[rec.image_id] += 1
        if rec.status == STATUS_UNREADABLE:
            reasons[rec.error or "(no reason)"] += 1
            continue
        per_image[rec.num_masks] += 1
        scores.append(np.asarray(rec.scores, np.float64))
        fractions.append(_mask_areas(rec) / max(1, rec.height * rec.width))
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
    areas = _mask_areas(rec)
    lines.append(
        f"  {'#':>3} {'score':>6} {'area px':>9} {'area %':>7}  "
        f"{'box x0,y0,x1,y1':<24} seed (scale,row,col)"
    )
    for k in range(rec.num_masks):
        box = ",".join(f"{v:.0f}" for v in rec.boxes[k])
        pos = ",".join(str(int(v)) for v in rec.seed_pos[k])
        lines.append(
            f"  {k:>3} {rec.scores[k]:6.3f} {areas[k]:9.0f} "
            f"{100 * areas[k] / max(1, rec.height * rec.width):6.2f}%  {box:<24} ({pos})"
        )
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------
# Rendering


def _text(img: np.ndarray, text: str, org: tuple[int, int], scale: float = 0.4) -> None:
    """White text with a black outline, readable on any background (in place)."""
    cv2.putText(img, text, org, cv2.FONT_HERSHEY_SIMPLEX, scale, (0, 0, 0), 3, cv2.LINE_AA)
    cv2.putText(img, text, org, cv2.FONT_HERSHEY_SIMPLEX, scale, (255, 255, 255), 1, cv2.LINE_AA)


def render_tile(rec: ImageRecord, image: np.ndarray | None, note: str, tile: int) -> np.ndarray:
    """One (tile, tile, 3) uint8 RGB cell: the image fitted in, masks translucent with outlines,
    boxes and scores; a grey placeholder with ``note`` when ``image`` is None."""
    cell = np.full((tile, tile, 3), 32, np.uint8)
    if image is None:
        cell[:] = 128
        for i, line in enumerate([rec.file_name[-34:], note[:34], note[34:68]]):
            _text(cell, line, (6, tile // 2 - 10 + 16 * i))
        return cell
    h, w = image.shape[:2]
    s = min(tile / w, tile / h)
    nw, nh = max(1, round(w * s)), max(1, round(h * s))
    view = cv2.resize(image, (nw, nh), interpolation=cv2.INTER_AREA).astype(np.float32)
    draw_masks = not note and rec.num_masks > 0
    if draw_masks:
        masks = rec.decode_masks()  # (K,H,W) at the original size
        for k in range(rec.num_masks - 1, -1, -1):  # best mask drawn last (on top)
            m = cv2.resize(masks[k], (nw, nh), interpolation=cv2.INTER_NEAREST).astype(bool)
            view[m] = 0.5 * view[m] + 0.5 * np.asarray(PALETTE[k % len(PALETTE)], np.float32)
    view = view.round().clip(0, 255).astype(np.uint8)
    if draw_masks:
        for k in range(rec.num_masks):
            color = PALETTE[k % len(PALETTE)]
            x0, y0, x1, y1 = (float(v) * s for v in rec.boxes[k])
            cv2.rectangle(view, (round(x0), round(y0)), (round(x1) - 1, round(y1) - 1), color, 1)
            _text(view, f"{rec.scores[k]:.2f}", (round(x0) + 2, max(10, round(y0) + 11)), 0.35)
    oy, ox = (tile - nh) // 2, (tile - nw) // 2
    cell[oy : oy + nh, ox : ox + nw] = view
    _text(cell, f"{rec.image_id}: {rec.file_name[-24:]} ({rec.num_masks})", (4, 12))
    if note:
        _text(cell, note[:40], (4, tile - 8))
    return cell


def render(
    shard_dir: str | Path,
    out_dir: str | Path,
    image_root: str | Path,
    max_images: int = 64,
    grid: int = 4,
    tile: int = 256,
) -> list[Path]:
    """Draw the first ``max_images`` images (shard order) as ``grid`` x ``grid`` PNG pages.

    Images that cannot be read under ``image_root`` (missing, unreadable, another size than the
    shard records) become a labelled placeholder, never an error. Returns the PNG paths.
    """
    from pipeline.images import UnreadableImage, decode_image  # lazy: pulls in torch

    if max_images < 1 or grid < 1 or tile < 32:
        raise UserError(
            f"render: need max_images >= 1, grid >= 1, tile >= 32 "
            f"(got {max_images}, {grid}, {tile})"
        )
    paths = shard_paths(shard_dir)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    root = Path(image_root)
    cells: list[np.ndarray] = []
    for _, _, rec in iter_records(paths):
        if len(cells) >= max_images:
            break
        image, note = None, ""
        if rec.status == STATUS_UNREADABLE:
            note = f"unreadable: {rec.error}"
        else:
            try:
                image = decode_image(root / rec.file_name)
            except UnreadableImage as e:
                note = f"image {e}"
            if image is not None and image.shape[:2] != (rec.height, rec.width):
                note = f"size {image.shape[1]}x{image.shape[0]} != shard {rec.width}x{rec.height}"
            elif image is not None and rec.status == STATUS_EMPTY:
                note = "no mask survived"
        cells.append(render_tile(rec, image, note, tile))
    written = []
    per_page = grid * grid
    for page, start in enumerate(range(0, len(cells), per_page)):
        canvas = np.zeros((grid * tile, grid * tile, 3), np.uint8)
        for j, cell in enumerate(cells[start : start + per_page]):
            r, c = divmod(j, grid)
            canvas[r * tile : (r + 1) * tile, c * tile : (c + 1) * tile] = cell
        path = out / f"grid-{page:04d}.png"
        if not cv2.imwrite(str(path), cv2.cvtColor(canvas, cv2.COLOR_RGB2BGR)):
            raise UserError(f"cannot write {path}")
        written.append(path)
    return written


# --------------------------------------------------------------------------------------------
# COCO export and recall against ground truth


def _annotations(rec: ImageRecord, category_id: int, first_id: int) -> list[dict[str, Any]]:
    """COCO annotations (RLE segmentation, xywh box, area, score) for one record's masks."""
    areas = _mask_areas(rec)
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


def _write_json(path: Path, data: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".part")
    tmp.write_text(json.dumps(data) + "\n")
    os.replace(tmp, path)


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
        anns += _annotations(rec, 1, len(anns) + 1)
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
    _write_json(Path(path), data)
    return data


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
    try:
        with _quiet():
            gt = COCO(str(gt_path))
    except (ValueError, KeyError, TypeError) as e:  # JSONDecodeError is a ValueError
        raise UserError(f"{gt_path}: not a COCO instances file ({e})") from None
    # With useCats=0 COCOeval still gathers detections through the GT's category ids, so every
    # detection takes one of them (which one does not matter).
    cat_ids = gt.getCatIds()
    category = int(cat_ids[0]) if cat_ids else 1
    if not cat_ids:
        gt.dataset["categories"] = [{"id": 1, "name": "object"}]
        gt.cats = {1: gt.dataset["categories"][0]}
    img_ids, dets = [], []
    n_records = 0
    for rec in iter_unique(paths, "recall"):
        n_records += 1
        info = gt.imgs.get(rec.image_id)
        if info is None:
            continue
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
        dets += _annotations(rec, category, len(dets) + 1)
    if not img_ids:
        raise UserError(
            f"none of the {n_records} shard images is in {gt_path} (matched by image_id)"
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
        "(default: the config's data.train_images)",
    )
    parser.add_argument(
        "--max-render",
        type=int,
        default=64,
        metavar="N",
        help="render at most N images (default 64: four 4x4 pages)",
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
        print()
        print(format_image(*find_image(shard_dir, args.image)))
    if args.render:
        root = args.image_root
        if root is None:
            from pipeline.config import load_pipeline_config

            root = load_pipeline_config(args.config, args.overrides)[0].data.train_images
        pages = render(shard_dir, args.render, root, args.max_render)
        print(
            f"\nrendered {min(args.max_render, summary['images'])} images (root {root}) "
            f"into {len(pages)} PNG(s) in {args.render}"
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
            _write_json(shard_dir / RECALL_FILE, result)
        except OSError as e:
            raise UserError(f"cannot write {shard_dir / RECALL_FILE}: {e.strerror}") from None
        print(f"wrote {shard_dir / RECALL_FILE}")
    return 0
