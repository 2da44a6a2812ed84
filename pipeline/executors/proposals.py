"""Compute saliency mask proposals for a set of images and write them as HDF5 shards.

    python -m pipeline proposals [--images DIR|COCO_JSON] [--image-root DIR] [--out DIR]
                                 [--limit N] [--executor ray|local] [--workers N] [--overwrite]

The sorted image list is cut into shards by a deterministic plan (shard i holds images [i *
shard_size, (i + 1) * shard_size)). Each shard is computed by a :class:`ProposalWorker` (decode and
resize in a prefetching thread pool, backbone forward, docs/method.md steps 2-8 in
``pipeline.saliency.propose.propose``, compressed RLE) and written atomically. A re-run skips every
shard already on disk with the same fingerprint (backbone weights + result-changing settings +
schema version) and the same images, so a killed run resumes where it stopped and recomputes
nothing.

The pieces live in their own modules: the plan and fingerprint in ``pipeline.shards.plan``, the
worker in ``pipeline.executors.worker``, the ``local`` and ``ray`` executors in
``pipeline.executors.dispatch``. This module prepares the output folder and runs the command.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import time
from pathlib import Path

from tqdm import tqdm

from pipeline.atomic_files import write_json
from pipeline.backbones.backbone import weights_fingerprint
from pipeline.backbones.build import build_backbone
from pipeline.cli import UserError, record_run
from pipeline.config import load_pipeline_config
from pipeline.executors.dispatch import run_local, run_ray
from pipeline.executors.worker import ProposalWorker, count_existing
from pipeline.inputs.image_files import ImageLimits
from pipeline.inputs.listing import ImageItem, list_images
from pipeline.precision import check_precision, default_device
from pipeline.run_folder import claim_run_folder
from pipeline.shards import staging as overwrite_staging
from pipeline.shards.plan import (
    compute_fingerprint,
    items_key,
    make_plan,
    plan_hash,
    plan_inputs,
)
from pipeline.shards.schema import (
    SCHEMA_VERSION,
    ShardError,
    list_shards,
    list_temp_files,
    read_meta,
    shard_index,
    shard_name,
    verify_shard,
)
from pipeline.shards.shard_reader import ShardReader

# run() looks run_local / run_ray up in this module, so a test that swaps them patches
# pipeline.executors.proposals.
__all__ = ["PLAN_FILE", "SUMMARY_FILE", "add_arguments", "prepare_out", "run"]

PLAN_FILE, SUMMARY_FILE = "plan.json", "summary.json"


# --------------------------------------------------------------------------------------------
# Output folder: resume, mismatch, overwrite


def _made_by(path: Path, fingerprint: str) -> bool:
    """Whether ``path`` is a shard with this run's schema and fingerprint (however damaged its
    datasets): only such a file may be deleted and recomputed without --overwrite."""
    try:
        return read_meta(path).get("fingerprint") == fingerprint
    except (ShardError, OSError):
        return False


def prepare_out(
    out: Path,
    shards: list[list[ImageItem]],
    shard_size: int,
    fingerprint: str,
    overwrite: bool,
    inputs: dict | None = None,
) -> set[int]:
    """Clean stale temp files, check existing shards, write plan.json; returns finished indices.

    An existing shard is reused only when it carries the same fingerprint and holds exactly the
    images the plan assigns to its index; anything else is an error unless ``overwrite``.
    """
    out.mkdir(parents=True, exist_ok=True)
    for tmp in list_temp_files(out):  # left by a killed writer; never a whole shard
        tmp.unlink(missing_ok=True)
    existing = list_shards(out)
    if overwrite:
        for p in existing:
            p.unlink()
        for name in (PLAN_FILE, SUMMARY_FILE):
            (out / name).unlink(missing_ok=True)
        existing = []
    phash = plan_hash(shards)
    hint = "use --overwrite to replace them or --out to write elsewhere"
    done = set()
    for path in existing:
        index = shard_index(path)
        try:  # checksums and structure: a damaged shard of this run is recomputed
            meta = verify_shard(path)
        except ShardError as e:
            if not _made_by(path, fingerprint):  # another schema, another tool: not ours
                raise UserError(f"{e}; not a shard of this run, so it is kept; {hint}") from None
            print(f"proposals: {e}; recomputing that shard", file=sys.stderr)
            path.unlink()
            continue
        if meta.get("fingerprint") != fingerprint:
            raise UserError(
                f"{out} holds shards made with other backbone weights or proposal settings "
                f"(fingerprint {str(meta.get('fingerprint'))[:12]} != {fingerprint[:12]}); {hint}"
            )
        with ShardReader(path) as reader:
            t = reader.image_table()
        have = [[str(n), int(i)] for n, i in zip(t["file_name"], t["image_id"])]
        if index >= len(shards) or have != items_key(shards[index]):
            raise UserError(
                f"{out} holds shards of a different image list or shard_size "
                f"({path.name} does not match the plan); {hint}"
            )
        done.add(index)
    write_json(
        out / PLAN_FILE,
        {
            "plan_hash": phash,
            "fingerprint": fingerprint,
            "schema_version": SCHEMA_VERSION,
            "num_images": sum(len(s) for s in shards),
            "shard_size": shard_size,
            "num_shards": len(shards),
            **(inputs or {}),  # source, image root, listing hash, file sizes (shard_plan.py)
        },
    )
    return done


# --------------------------------------------------------------------------------------------
# Command line


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--images",
        default=None,
        help="image folder or COCO JSON (default: proposals.images, else data.train_json)",
    )
    parser.add_argument(
        "--image-root", default=None, help="folder the COCO JSON's file names are relative to"
    )
    parser.add_argument(
        "--out", default=None, help="proposals folder (default runs/<name>/proposals)"
    )
    parser.add_argument("--limit", type=int, default=None, help="only the first N sorted images")
    parser.add_argument("--executor", choices=("ray", "local"), default=None)
    parser.add_argument(
        "--workers", type=int, default=None, help="Ray CPU actors when no GPU (0: from the machine)"
    )
    parser.add_argument(
        "--overwrite", action="store_true", help="delete existing shards in --out first"
    )


def _resolve_inputs(args: argparse.Namespace, cfg) -> tuple[str, str | None]:
    if args.images:
        return args.images, args.image_root
    if cfg.proposals.images:
        return cfg.proposals.images, args.image_root
    return cfg.data.train_json, args.image_root or cfg.data.train_images


def run(args: argparse.Namespace) -> int:
    cfg, raw = load_pipeline_config(args.config, args.overrides)
    pcfg = cfg.proposals
    executor = args.executor or pcfg.executor
    workers = args.workers if args.workers is not None else pcfg.workers
    if executor not in ("ray", "local"):
        raise UserError(f"proposals.executor must be 'ray' or 'local', got '{executor}'")
    if workers < 0:
        raise UserError(f"--workers must be >= 0 (0: from the machine), got {workers}")
    if executor == "local" or not os.environ.get("RAY_ADDRESS"):  # this machine runs the workers
        check_precision(pcfg.precision, default_device(), "proposals.precision")
    source, image_root = _resolve_inputs(args, cfg)
    if not Path(source).exists():
        raise UserError(f"image input not found: {source}")
    items = list_images(source, image_root, cfg.data.allow_outside_root)
    if args.limit is not None:
        if args.limit < 1:
            raise UserError(f"--limit must be >= 1, got {args.limit}")
        items = items[: args.limit]
    if not items:
        raise UserError(f"no images in {source}")
    out = Path(args.out or pcfg.out or f"runs/{cfg.name}/proposals")
    if executor == "ray":  # a cluster's workers would resolve relative paths in their own cwd
        items = [dataclasses.replace(it, path=Path(it.path).absolute()) for it in items]

    shards = make_plan(items, pcfg.shard_size)
    backbone = build_backbone(cfg.backbone)
    fingerprint = compute_fingerprint(
        cfg.backbone.kind, weights_fingerprint(backbone), pcfg, backbone.batch_invariant
    )
    raw.setdefault("proposals", {}).update(
        images=str(source), out=str(out), executor=executor, workers=workers
    )
    with claim_run_folder(out, "proposals"):  # one run at a time in a folder
        return _staged(out, args, cfg, raw, shards, backbone, fingerprint, executor, workers)


def _staged(out: Path, args, cfg, raw, shards, backbone, fingerprint, executor, workers) -> int:
    # An overwriting run computes into staging and replaces the old shards only when it finished;
    # staging left by an interrupted run with the same plan and fingerprint is resumed.
    target = overwrite_staging.begin(out, args.overwrite, plan_hash(shards), fingerprint)
    rc = _compute(target, args, cfg, raw, shards, backbone, fingerprint, executor, workers)
    if target != out:
        if rc == 0:
            overwrite_staging.commit(out, target)
        else:
            print(
                f"proposals: --overwrite kept the previous shards in {out}; the finished new "
                f"ones wait in {target} for a re-run of this command",
                file=sys.stderr,
            )
    return rc


def _compute(out: Path, args, cfg, raw, shards, backbone, fingerprint, executor, workers) -> int:
    """Prepare ``out``, run the executor over the shards not done yet, write the summary."""
    pcfg = cfg.proposals
    items = [it for s in shards for it in s]
    inputs = plan_inputs(raw["proposals"]["images"], items)
    # Staged shards are this run's own: resumed, never deleted as "existing" ones.
    overwrite = args.overwrite and out.name != overwrite_staging.STAGING
    done = prepare_out(out, shards, pcfg.shard_size, fingerprint, overwrite, inputs)
    record_run(out, raw)

    jobs = [(i, s) for i, s in enumerate(shards) if i not in done]
    todo_images = sum(len(s) for _, s in jobs)
    print(
        f"proposals: {len(items)} images in {len(shards)} shards of {pcfg.shard_size}; "
        f"{len(done)} already done, {len(jobs)} to compute with {executor} -> {out}",
        file=sys.stderr,
    )
    summaries: list[dict] = []
    bar = tqdm(
        total=todo_images,
        unit="img",
        desc="proposals",
        dynamic_ncols=True,
        disable=todo_images == 0,
    )
    counts = {"images": 0, "masks": 0}

    def progress(n_images: int, n_masks: int) -> None:
        counts["images"] += n_images
        counts["masks"] += n_masks
        bar.update(n_images)
        bar.set_postfix(masks_per_img=f"{counts['masks'] / max(1, counts['images']):.2f}")

    on_done = summaries.append
    limits = ImageLimits.from_data(cfg.data)  # [data] max_image_pixels / max_image_mb

    t0 = time.perf_counter()
    try:
        if not jobs:
            failed: dict[int, str] = {}
        elif executor == "local":
            worker = ProposalWorker(
                cfg.backbone, pcfg, out, backbone=backbone, fingerprint=fingerprint, limits=limits
            )
            failed = run_local(worker, jobs, on_done, on_batch=progress)
        else:
            del backbone  # the actors build their own; keep the driver small
            failed = run_ray(
                cfg.backbone,
                pcfg,
                out,
                jobs,
                workers,
                fingerprint,
                on_done,
                on_batch=progress,
                limits=limits,
            )
    finally:
        bar.close()
    seconds = time.perf_counter() - t0
    return _finish(out, shards, done, summaries, failed, seconds)


def _finish(
    out: Path,
    shards: list,
    done: set[int],
    summaries: list[dict],
    failed: dict[int, str],
    seconds: float,
) -> int:
    computed = sorted(s["index"] for s in summaries)
    totals = {k: 0 for k in ("images", "ok", "empty", "unreadable", "masks")}
    unreadable: list = []
    for s in summaries + [count_existing(out / shard_name(i)) for i in sorted(done)]:
        for k in totals:
            totals[k] += s[k]
        unreadable += s["errors"]
    computed_images = sum(s["images"] for s in summaries)
    summary = {
        **totals,
        "images_planned": sum(len(s) for s in shards),
        "shards": len(shards),
        "computed_shards": computed,
        "skipped_shards": sorted(done),
        "failed_shards": {str(k): v for k, v in sorted(failed.items())},
        "seconds": round(seconds, 3),
        "computed_images": computed_images,
        "images_per_s": round(computed_images / seconds, 3) if seconds > 0 else 0.0,
        "masks_per_image": round(totals["masks"] / max(1, totals["ok"] + totals["empty"]), 3),
        "unreadable_files": unreadable,
    }
    write_json(out / SUMMARY_FILE, summary)
    print(
        f"proposals: {totals['ok']} ok, {totals['empty']} empty, {totals['unreadable']} "
        f"unreadable images; {totals['masks']} masks; {seconds:.1f} s, "
        f"{summary['images_per_s']:.2f} images/s; shards {len(computed)} computed, "
        f"{len(done)} skipped, {len(failed)} failed -> {out}"
    )
    if totals["images"] and not totals["ok"] + totals["empty"]:
        name, reason = unreadable[0]
        print(
            f"proposals: error: no image could be read ({len(unreadable)} unreadable, first "
            f"{name}: {reason}); check --images and --image-root",
            file=sys.stderr,
        )
        return 2
    if failed:
        for index, err in sorted(failed.items()):
            print(f"proposals: shard {index} failed: {err}", file=sys.stderr)
        print(
            f"proposals: {len(failed)} shard(s) failed; re-run the same command to retry them",
            file=sys.stderr,
        )
        return 1
    return 0
