"""A proposals folder's summary: counts, score and size quantiles, masks-per-image histogram,
quality statistics without ground truth, and every empty image's stage; the first thing
``inspect`` prints."""

from __future__ import annotations

import contextlib
import json
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.saliency.mask_stats import StatsCollector, format_stats
from pipeline.shards.folder import PLAN_FILE
from pipeline.shards.folder_reader import iter_records, mask_areas, shard_paths
from pipeline.shards.schema import (
    STATUS_EMPTY,
    STATUS_OK,
    STATUS_UNREADABLE,
    list_temp_files,
    read_meta,
    shard_index,
)

STATUS_NAMES = {STATUS_OK: "ok", STATUS_EMPTY: "empty", STATUS_UNREADABLE: "unreadable"}


QUANTILES = (0.0, 0.1, 0.25, 0.5, 0.75, 0.9, 1.0)


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
