"""Compute saliency mask proposals for a set of images and write them as HDF5 shards.

    python -m pipeline proposals [--images DIR|COCO_JSON] [--image-root DIR] [--out DIR]
                                 [--limit N] [--executor ray|local] [--workers N] [--overwrite]

The sorted image list is cut into shards by a deterministic plan (shard i holds images
[i * shard_size, (i + 1) * shard_size)). Each shard is computed by a :class:`ProposalWorker`
(decode and resize in a prefetching thread pool, frozen backbone forward, METHOD.md steps 2-8 in
``pipeline.saliency.propose``, compressed RLE) and written atomically. A re-run skips every shard
already on disk with the same fingerprint (backbone weights + result-changing settings + schema
version) and the same images, so a killed run resumes where it stopped and recomputes nothing.

Executors: ``local`` runs one worker in this process; ``ray`` runs one actor per GPU (or
``--workers`` CPU actors) and hands out shards as actors become free, retrying a failed shard
(also when its actor died) before recording it as failed. Both write identical shards.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import logging
import math
import os
import sys
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from pycocotools import mask as mask_utils
from tqdm import tqdm

from pipeline.backbones import BACKBONE_CLASSES, Backbone, build_backbone, weights_fingerprint
from pipeline.cli import UserError, record_run
from pipeline.config import BackboneConfig, ProposalConfig, load_pipeline_config
from pipeline.images import (
    ImageItem,
    UnreadableImage,
    decode_image,
    list_images,
    normalise,
    pad_batch,
    resize_keep_ratio,
)
from pipeline.saliency import propose
from pipeline.shards import (
    SCHEMA_VERSION,
    STATUS_EMPTY,
    STATUS_OK,
    STATUS_UNREADABLE,
    ImageRecord,
    ShardReader,
    list_shards,
    list_temp_files,
    read_meta,
    shard_index,
    shard_name,
    write_shard,
)

# ProposalConfig fields that change how work is done but not what is computed. Every other
# field (including any added later) enters the fingerprint, so a new knob is safe by default.
# batch_size is one only for batch-invariant backbones (the ViT): a ResNet's border cells see
# how far pad_batch padded, so there it enters the fingerprint (see result_settings).
NON_RESULT_FIELDS = ("batch_size", "shard_size", "workers", "executor", "prefetch", "images", "out")
MAX_RETRIES = 2  # extra attempts per shard before it is recorded as failed
PLAN_FILE, SUMMARY_FILE = "plan.json", "summary.json"
log = logging.getLogger(__name__)


# --------------------------------------------------------------------------------------------
# Plan and fingerprint


def make_plan(items: list[ImageItem], shard_size: int) -> list[list[ImageItem]]:
    """Shard i = items[i * shard_size:(i + 1) * shard_size] of the (already sorted) list."""
    if shard_size < 1:
        raise UserError(f"proposals.shard_size must be >= 1, got {shard_size}")
    return [items[i : i + shard_size] for i in range(0, len(items), shard_size)]


def _items_key(items: list[ImageItem]) -> list[list[Any]]:
    return [[it.file_name, int(it.image_id)] for it in items]


def plan_hash(shards: list[list[ImageItem]]) -> str:
    """Hash of the plan: which images (name and id) go to which shard."""
    data = json.dumps([_items_key(s) for s in shards], separators=(",", ":"))
    return hashlib.sha256(data.encode()).hexdigest()


def result_settings(cfg: ProposalConfig, batch_invariant: bool = True) -> dict[str, Any]:
    """The proposal settings that change results (stored in every shard as ``settings``);
    ``batch_size`` among them when the backbone is not ``batch_invariant``."""
    skip = NON_RESULT_FIELDS if batch_invariant else tuple(set(NON_RESULT_FIELDS) - {"batch_size"})
    return {k: v for k, v in dataclasses.asdict(cfg).items() if k not in skip}


def _batch_invariant(backbone_kind: str) -> bool:
    cls = BACKBONE_CLASSES.get(backbone_kind)
    return bool(cls is not None and cls.batch_invariant)


def compute_fingerprint(
    backbone_kind: str,
    weights_hash: str,
    cfg: ProposalConfig,
    batch_invariant: bool | None = None,
) -> str:
    """sha256 over backbone kind + weights hash + result-changing settings + schema version.

    ``batch_invariant``: the backbone's; None reads it from the class of ``backbone_kind``."""
    if batch_invariant is None:
        batch_invariant = _batch_invariant(backbone_kind)
    payload = {
        "schema_version": SCHEMA_VERSION,
        "backbone": backbone_kind,
        "weights": weights_hash,
        "settings": result_settings(cfg, batch_invariant),
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


# --------------------------------------------------------------------------------------------
# Worker


@dataclass
class _Loaded:
    """One decoded image ready for the backbone, or the reason it could not be read."""

    item: ImageItem
    tensor: torch.Tensor | None = None  # (3,h,w) normalised, resized
    orig: tuple[int, int] = (0, 0)  # original (H, W)
    resized: tuple[int, int] = (0, 0)  # resized (h, w)
    error: str = ""


def masks_to_rles(masks: np.ndarray) -> list[bytes]:
    """(K,H,W) bool/uint8 masks -> K COCO compressed RLE ``counts`` strings."""
    if len(masks) == 0:
        return []
    # pycocotools wants (H,W,K) uint8 in Fortran order.
    stacked = np.asfortranarray(np.transpose(masks.astype(np.uint8, copy=False), (1, 2, 0)))
    return [r["counts"] for r in mask_utils.encode(stacked)]


class ProposalWorker:
    """Holds a frozen backbone on one device and turns a shard's images into a shard file.

    Plain Python: the local executor calls it directly, the Ray executor wraps it as an actor.
    """

    def __init__(
        self,
        backbone_cfg: BackboneConfig,
        cfg: ProposalConfig,
        out_dir: str | Path,
        device: str | None = None,
        threads: int | None = None,
        decode_threads: int | None = None,
        backbone: Backbone | None = None,
        fingerprint: str | None = None,
    ):
        """``backbone`` and its ``fingerprint`` may be handed in by a caller that already built
        and hashed it (the local executor); otherwise the worker builds it from the config."""
        if threads is not None:
            torch.set_num_threads(max(1, int(threads)))
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.cfg = cfg
        self.out_dir = Path(out_dir)
        net = backbone if backbone is not None else build_backbone(backbone_cfg)
        self.backbone = net.eval().to(self.device)
        invariant = bool(getattr(self.backbone, "batch_invariant", False))
        self.fingerprint = fingerprint or compute_fingerprint(
            backbone_cfg.kind, weights_fingerprint(self.backbone), cfg, invariant
        )
        self.meta = {
            "fingerprint": self.fingerprint,
            "backbone": self.backbone.name,
            "feature_stride": self.backbone.saliency_stride,
            "embed_dim": self.backbone.embed_dim,
            "settings": json.dumps(result_settings(cfg, invariant), sort_keys=True),
        }
        self.min_side = 2 * int(self.backbone.saliency_stride)
        # Decoding (OpenCV/PIL) releases the GIL, so threads overlap with the forward pass.
        self.decode_threads = decode_threads or max(2, min(8, torch.get_num_threads()))

    def get_fingerprint(self) -> str:
        return self.fingerprint

    def _load(self, item: ImageItem) -> _Loaded:
        try:
            img = decode_image(item.path, self.min_side)
        except UnreadableImage as e:
            return _Loaded(item, error=str(e) or "unreadable")
        except Exception as e:  # anything else about one file must not sink the whole shard
            return _Loaded(item, error=f"{type(e).__name__}: {e}")
        resized, _ = resize_keep_ratio(img, self.cfg.short_side, self.cfg.max_side)
        return _Loaded(
            item,
            tensor=normalise(resized),
            orig=(int(img.shape[0]), int(img.shape[1])),
            resized=(int(resized.shape[0]), int(resized.shape[1])),
        )

    @torch.inference_mode()
    def _infer(self, batch: list[_Loaded]) -> list[ImageRecord]:
        """Backbone + saliency proposals for one batch; records in the batch's order."""
        good = [b for b in batch if b.tensor is not None]
        props = []
        if good:
            stride = self.backbone.saliency_stride
            x = pad_batch([b.tensor for b in good], self.backbone.size_divisor).to(self.device)
            # sizes: each image's valid pixels, so a batch-invariant backbone ignores the padding
            feats = self.backbone.saliency_features(x, [b.resized for b in good])  # (B,C,h,w)
            valid = [
                (math.ceil(h / stride), math.ceil(w / stride)) for h, w in (b.resized for b in good)
            ]
            props = propose(
                feats,
                valid,
                [b.resized for b in good],
                [b.orig for b in good],
                float(stride),
                self.cfg,
            )
        found = iter(props)  # propose() answers the good images in order
        records = []
        for b in batch:
            it = b.item
            if b.tensor is None:
                records.append(
                    ImageRecord(it.file_name, int(it.image_id), 0, 0, STATUS_UNREADABLE, b.error)
                )
                continue
            p = next(found)
            h, w = b.orig
            k = int(p.masks.shape[0])
            if k == 0:
                records.append(ImageRecord(it.file_name, int(it.image_id), h, w, STATUS_EMPTY))
                continue
            records.append(
                ImageRecord(
                    file_name=it.file_name,
                    image_id=int(it.image_id),
                    height=h,
                    width=w,
                    status=STATUS_OK,
                    rles=masks_to_rles(p.masks.cpu().numpy()),
                    boxes=p.boxes.float().cpu().numpy(),
                    scores=p.scores.float().cpu().numpy(),
                    seeds=p.seeds.float().cpu().numpy().astype(np.float16),
                    seed_pos=p.seed_pos.cpu().numpy().astype(np.int16),
                )
            )
        return records

    def process_shard(
        self,
        index: int,
        items: list[ImageItem],
        on_batch: Callable[[int, int], None] | None = None,
    ) -> dict[str, Any]:
        """Compute and write shard ``index``; returns counts for the progress and summary.

        Batch n+1..n+prefetch are decoded by the thread pool while batch n runs the backbone.
        ``on_batch(images, masks)`` is called after each batch (local progress bar).
        """
        t0 = time.perf_counter()
        bs = max(1, int(self.cfg.batch_size))
        batches = [items[i : i + bs] for i in range(0, len(items), bs)]
        records: list[ImageRecord] = []
        with ThreadPoolExecutor(self.decode_threads, thread_name_prefix="decode") as pool:
            pending: deque = deque()
            ahead = 1 + max(0, int(self.cfg.prefetch))
            for b in batches[:ahead]:
                pending.append([pool.submit(self._load, it) for it in b])
            nxt = ahead
            while pending:
                futures = pending.popleft()
                if nxt < len(batches):
                    pending.append([pool.submit(self._load, it) for it in batches[nxt]])
                    nxt += 1
                out = self._infer([f.result() for f in futures])
                records.extend(out)
                if on_batch is not None:
                    on_batch(len(out), sum(r.num_masks for r in out))
        write_shard(self.out_dir / shard_name(index), records, self.meta)
        summary = _count(records)
        summary.update(index=index, seconds=time.perf_counter() - t0)
        return summary


def _count(records: list[ImageRecord]) -> dict[str, Any]:
    statuses = [r.status for r in records]
    return {
        "images": len(records),
        "ok": statuses.count(STATUS_OK),
        "empty": statuses.count(STATUS_EMPTY),
        "unreadable": statuses.count(STATUS_UNREADABLE),
        "masks": sum(r.num_masks for r in records),
        "errors": [[r.file_name, r.error] for r in records if r.status == STATUS_UNREADABLE],
    }


def _count_existing(path: Path) -> dict[str, Any]:
    with ShardReader(path) as reader:
        t = reader.image_table()
    st = t["status"]
    return {
        "images": int(len(st)),
        "ok": int((st == STATUS_OK).sum()),
        "empty": int((st == STATUS_EMPTY).sum()),
        "unreadable": int((st == STATUS_UNREADABLE).sum()),
        "masks": int(t["mask_count"].sum()),
        "errors": [
            [str(n), str(e)]
            for n, e, s in zip(t["file_name"], t["error"], st)
            if s == STATUS_UNREADABLE
        ],
    }


# --------------------------------------------------------------------------------------------
# Executors: both call on_done(summary) per finished shard and return {index: error} failures.

Job = tuple[int, list[ImageItem]]


def run_local(
    worker: ProposalWorker,
    jobs: list[Job],
    on_done: Callable[[dict], None],
    on_batch: Callable[[int, int], None] | None = None,
) -> dict[int, str]:
    """Shards in order, in this process, with the same retry policy as Ray."""
    failed: dict[int, str] = {}
    for index, items in jobs:
        for attempt in range(MAX_RETRIES + 1):
            try:
                result = worker.process_shard(index, items, on_batch)
            except Exception as e:  # recorded below; the other shards still run
                log.warning("shard %d attempt %d failed: %s", index, attempt + 1, e)
                if attempt == MAX_RETRIES:
                    failed[index] = f"{type(e).__name__}: {e}"
            else:
                on_done(result)
                break
    return failed


def _ray_init(workers: int, num_cpus: int | None = None):
    """Connect to RAY_ADDRESS's cluster, or start a private local one (no dashboard, bound to
    127.0.0.1, quiet). Returns (ray module, whether this call started it)."""
    import ray  # only this module imports Ray, and only when asked to

    if ray.is_initialized():
        return ray, False
    root = str(Path(__file__).resolve().parent.parent)
    path = os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH", "")) if p)
    runtime_env = {"env_vars": {"PYTHONPATH": path}}
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    try:
        if os.environ.get("RAY_ADDRESS"):
            ray.init(
                address="auto",
                runtime_env=runtime_env,
                logging_level=logging.WARNING,
                log_to_driver=False,
            )
        else:
            cpus = num_cpus or (
                len(os.sched_getaffinity(0))
                if hasattr(os, "sched_getaffinity")
                else (os.cpu_count() or 1)
            )
            # No dashboard, and the node address asked to be loopback. (On Linux Ray swaps
            # 127.0.0.1 for the host's own address in resolve_ip_for_localhost, so its ports are
            # not loopback-only; Ray's token authentication, on by default, guards them.)
            ray.init(
                num_cpus=max(cpus, workers),
                include_dashboard=False,
                _node_ip_address="127.0.0.1",
                runtime_env=runtime_env,
                logging_level=logging.WARNING,
                log_to_driver=False,
            )
    except Exception as e:
        raise UserError(
            f"could not start Ray ({type(e).__name__}: {e}); try --executor local"
        ) from None
    return ray, True


def run_ray(
    backbone_cfg: BackboneConfig,
    cfg: ProposalConfig,
    out_dir: Path,
    jobs: list[Job],
    workers: int,
    fingerprint: str,
    on_done: Callable[[dict], None],
    stats: dict[str, Any] | None = None,
    worker_cls: type[ProposalWorker] = ProposalWorker,
) -> dict[int, str]:
    """One actor per GPU (else ``workers`` CPU actors); shards handed out as actors free up.

    ``stats``, when given, receives ``actors`` and ``spawn_s`` (seconds to start them).
    ``worker_cls`` is the actor's class (a subclass of ProposalWorker, e.g. in tests).
    """
    try:
        import ray  # noqa: F401
    except ImportError:
        raise UserError("ray is not installed; use --executor local") from None
    ray, started = _ray_init(workers)
    try:
        gpus = int(ray.cluster_resources().get("GPU", 0))
        cpus = int(ray.cluster_resources().get("CPU", 1))
        if gpus:  # one actor per GPU; its share of the CPUs decodes images
            n = gpus
            share = max(1, cpus // gpus)
            opts, threads, decode = {"num_gpus": 1, "num_cpus": share}, None, share
        else:  # CPU actors split the cores between them
            n = max(1, workers)
            opts, threads, decode = {"num_cpus": 1}, max(1, cpus // n), None
        n = min(n, max(1, len(jobs)))
        actor_cls = ray.remote(worker_cls)

        def spawn(count: int) -> list:
            """Start ``count`` actors in parallel; each must hold the driver's weights."""
            actors = [
                actor_cls.options(**opts).remote(
                    backbone_cfg, cfg, str(out_dir), None, threads, decode
                )
                for _ in range(count)
            ]
            for got in ray.get([a.get_fingerprint.remote() for a in actors]):
                if got != fingerprint:
                    raise RuntimeError(
                        "a Ray worker built a backbone with different weights "
                        f"(fingerprint {got[:12]} != {fingerprint[:12]})"
                    )
            return actors

        queue = deque(jobs)
        attempts: dict[int, int] = {}
        failed: dict[int, str] = {}
        t_spawn = time.perf_counter()
        try:
            idle = spawn(n)
        except Exception as e:
            msg = (str(e).strip().splitlines() or [type(e).__name__])[-1]
            raise UserError(f"could not start the Ray workers: {msg}") from None
        if stats is not None:
            stats.update(actors=n, spawn_s=time.perf_counter() - t_spawn)
        running: dict[Any, tuple[Job, Any]] = {}
        while queue or running:
            while idle and queue:
                actor = idle.pop()
                job = queue.popleft()
                running[actor.process_shard.remote(*job)] = (job, actor)
            done, _ = ray.wait(list(running), num_returns=1)
            job, actor = running.pop(done[0])
            try:
                result = ray.get(done[0])
            except ray.exceptions.RayActorError as e:
                err = f"worker died: {e}".splitlines()[0]
                ray.kill(actor, no_restart=True)
                try:
                    idle += spawn(1)
                except Exception as e2:  # cannot replace it: carry on with the others
                    log.warning("could not restart a Ray worker: %s", e2)
            except Exception as e:
                err = (str(e).strip().splitlines() or [type(e).__name__])[-1]
                idle.append(actor)
            else:
                idle.append(actor)
                on_done(result)
                continue
            index = job[0]
            attempts[index] = attempts.get(index, 0) + 1
            log.warning("shard %d attempt %d failed: %s", index, attempts[index], err)
            if attempts[index] > MAX_RETRIES:
                failed[index] = err
            else:
                queue.appendleft(job)
            if not idle and not running:  # every worker is gone: the rest cannot run
                failed.update({j[0]: "no Ray worker left" for j in queue})
                queue.clear()
        return failed
    finally:
        if started:
            ray.shutdown()


# --------------------------------------------------------------------------------------------
# Output folder: resume, mismatch, overwrite


def _write_json(path: Path, data: dict) -> None:
    tmp = path.with_name(path.name + ".part")
    tmp.write_text(json.dumps(data, indent=2) + "\n")
    os.replace(tmp, path)


def prepare_out(
    out: Path, shards: list[list[ImageItem]], shard_size: int, fingerprint: str, overwrite: bool
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
        meta = read_meta(path)
        if meta.get("fingerprint") != fingerprint:
            raise UserError(
                f"{out} holds shards made with other backbone weights or proposal settings "
                f"(fingerprint {str(meta.get('fingerprint'))[:12]} != {fingerprint[:12]}); {hint}"
            )
        with ShardReader(path) as reader:
            t = reader.image_table()
        have = [[str(n), int(i)] for n, i in zip(t["file_name"], t["image_id"])]
        if index >= len(shards) or have != _items_key(shards[index]):
            raise UserError(
                f"{out} holds shards of a different image list or shard_size "
                f"({path.name} does not match the plan); {hint}"
            )
        done.add(index)
    _write_json(
        out / PLAN_FILE,
        {
            "plan_hash": phash,
            "fingerprint": fingerprint,
            "schema_version": SCHEMA_VERSION,
            "num_images": sum(len(s) for s in shards),
            "shard_size": shard_size,
            "num_shards": len(shards),
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
    parser.add_argument("--workers", type=int, default=None, help="CPU workers when no GPU")
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
    if workers < 1:
        raise UserError(f"--workers must be >= 1, got {workers}")
    source, image_root = _resolve_inputs(args, cfg)
    if not Path(source).exists():
        raise UserError(f"image input not found: {source}")
    items = list_images(source, image_root)
    if args.limit is not None:
        if args.limit < 1:
            raise UserError(f"--limit must be >= 1, got {args.limit}")
        items = items[: args.limit]
    if not items:
        raise UserError(f"no images in {source}")
    out = Path(args.out or pcfg.out or f"runs/{cfg.name}/proposals")

    shards = make_plan(items, pcfg.shard_size)
    backbone = build_backbone(cfg.backbone)
    fingerprint = compute_fingerprint(
        cfg.backbone.kind, weights_fingerprint(backbone), pcfg, backbone.batch_invariant
    )
    done = prepare_out(out, shards, pcfg.shard_size, fingerprint, args.overwrite)
    raw.setdefault("proposals", {}).update(
        images=str(source), out=str(out), executor=executor, workers=workers
    )
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

    def on_done(summary: dict) -> None:
        summaries.append(summary)
        if executor == "ray":
            progress(summary["images"], summary["masks"])

    t0 = time.perf_counter()
    try:
        if not jobs:
            failed: dict[int, str] = {}
        elif executor == "local":
            worker = ProposalWorker(
                cfg.backbone, pcfg, out, backbone=backbone, fingerprint=fingerprint
            )
            failed = run_local(worker, jobs, on_done, on_batch=progress)
        else:
            del backbone  # the actors build their own; keep the driver small
            failed = run_ray(cfg.backbone, pcfg, out, jobs, workers, fingerprint, on_done)
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
    for s in summaries + [_count_existing(out / shard_name(i)) for i in sorted(done)]:
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
    _write_json(out / SUMMARY_FILE, summary)
    print(
        f"proposals: {totals['ok']} ok, {totals['empty']} empty, {totals['unreadable']} "
        f"unreadable images; {totals['masks']} masks; {seconds:.1f} s, "
        f"{summary['images_per_s']:.2f} images/s; shards {len(computed)} computed, "
        f"{len(done)} skipped, {len(failed)} failed -> {out}"
    )
    if failed:
        for index, err in sorted(failed.items()):
            print(f"proposals: shard {index} failed: {err}", file=sys.stderr)
        print(
            f"proposals: {len(failed)} shard(s) failed; re-run the same command to retry them",
            file=sys.stderr,
        )
        return 1
    return 0
