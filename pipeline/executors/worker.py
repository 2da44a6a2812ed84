"""The per-shard proposal worker: a shard's images -> backbone -> saliency proposals -> shard file.

Each shard is computed by a :class:`ProposalWorker`: decode and resize in a prefetching thread pool,
frozen backbone forward, docs/method.md steps 2-8 in ``pipeline.saliency.propose.propose``,
compressed RLE, written atomically. The executors (``pipeline.executors.dispatch``) decide where
workers run.
"""

from __future__ import annotations

import json
import math
import os
import threading
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

from pipeline.backbones.backbone import Backbone, weights_fingerprint
from pipeline.backbones.build import build_backbone
from pipeline.config import BackboneConfig, ProposalConfig
from pipeline.executors.work_units import shard_batches
from pipeline.inputs.image_files import ImageLimits
from pipeline.inputs.images import (
    UnreadableImage,
    decode_image,
    normalise,
    pad_batch,
    resize_keep_ratio,
)
from pipeline.inputs.listing import ImageItem
from pipeline.precision import autocast, check_precision
from pipeline.saliency.propose import Proposals, propose
from pipeline.shards.plan import compute_fingerprint, result_settings
from pipeline.shards.schema import (
    STATUS_EMPTY,
    STATUS_OK,
    STATUS_UNREADABLE,
    ImageRecord,
    shard_name,
    write_shard,
)
from pipeline.shards.shard_reader import ShardReader


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

    Plain Python: the local executor calls :meth:`process_shard` directly; the Ray executor
    wraps it as a threaded actor and calls :meth:`process_batch` for one batch at a time, two in
    flight, so one call decodes while the other runs the backbone (under ``_infer_lock``).
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
        limits: ImageLimits | None = None,
    ):
        """``backbone`` and its ``fingerprint`` may be handed in by a caller that already built
        and hashed it (the local executor); otherwise the worker builds it from the config.
        ``limits``: what one input image may cost (``[data]`` max_image_pixels / max_image_mb)."""
        if threads is not None:
            torch.set_num_threads(max(1, int(threads)))
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.cfg = cfg
        self.out_dir = Path(out_dir)
        net = backbone if backbone is not None else build_backbone(backbone_cfg)
        self.backbone = net.eval().to(self.device)
        self.precision = check_precision(cfg.precision, self.device, "proposals.precision")
        self._features = self.backbone.saliency_features
        if cfg.compile:  # shapes vary per batch: dynamic, so one compilation serves them all
            self._features = torch.compile(self._features, dynamic=True)
        invariant = bool(getattr(self.backbone, "batch_invariant", False))
        self.by_shape = invariant  # batches of like shapes (work_units.shard_batches)
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
        self.limits = limits or ImageLimits()
        # Decoding (OpenCV/PIL) releases the GIL, so threads overlap with the forward pass.
        self.decode_threads = decode_threads or max(2, min(8, torch.get_num_threads()))
        self._infer_lock = threading.Lock()
        self._pool: ThreadPoolExecutor | None = None  # process_batch's decode threads

    def get_fingerprint(self) -> str:
        return self.fingerprint

    def get_meta(self) -> dict[str, Any]:
        """The shard attributes this worker writes (the Ray driver writes with them)."""
        return dict(self.meta)

    def can_read(self, path: str) -> str:
        """ "" when ``path`` is a readable regular file here, else why not (a cluster check that
        this worker's node sees the driver's files)."""
        p = Path(path)
        if not p.is_file():
            return f"{path} not found (cwd {os.getcwd()})"
        try:
            with p.open("rb") as f:
                f.read(1)
        except OSError as e:
            return f"{path}: {e.strerror or e}"
        return ""

    def cancelled(self) -> bool:
        """Whether the running call was cancelled (the Ray actor overrides this)."""
        return False

    def load(self, item: ImageItem) -> _Loaded:
        try:
            img = decode_image(item.path, self.min_side, self.limits)
        except UnreadableImage as e:
            return _Loaded(item, error=str(e) or "unreadable")
        except Exception as e:  # anything else about one file must not sink the whole shard
            return _Loaded(item, error=f"{type(e).__name__}: {e}")
        return self.prepare(item, img)

    def prepare(self, item: ImageItem, img: np.ndarray) -> _Loaded:
        """A decoded (H, W, 3) uint8 image resized and normalised for :meth:`features` (the
        self-training round reuses it on images it decoded for its model as well)."""
        resized, _ = resize_keep_ratio(img, self.cfg.short_side, self.cfg.max_side)
        return _Loaded(
            item,
            tensor=normalise(resized),
            orig=(int(img.shape[0]), int(img.shape[1])),
            resized=(int(resized.shape[0]), int(resized.shape[1])),
        )

    @torch.inference_mode()
    def features(self, good: list[_Loaded]) -> tuple[torch.Tensor, list[tuple[int, int]]]:
        """Backbone features (B, C, h, w) of decoded images and each one's valid cell grid."""
        stride = self.backbone.saliency_stride
        x = pad_batch([b.tensor for b in good], self.backbone.size_divisor).to(self.device)
        # sizes: each image's valid pixels, so a batch-invariant backbone ignores the padding
        with autocast(self.precision, self.device):
            feats = self._features(x, [b.resized for b in good])  # (B,C,h,w)
        feats = feats.float()  # seeds, maps and maskness in fp32 whatever the backbone ran in
        valid = [
            (math.ceil(h / stride), math.ceil(w / stride)) for h, w in (b.resized for b in good)
        ]
        return feats, valid

    @torch.inference_mode()
    def _infer(self, batch: list[_Loaded]) -> list[ImageRecord]:
        """Backbone + saliency proposals for one batch; records in the batch's order."""
        good = [b for b in batch if b.tensor is not None]
        props = []
        if good:
            feats, valid = self.features(good)
            props = propose(
                feats,
                valid,
                [b.resized for b in good],
                [b.orig for b in good],
                float(self.backbone.saliency_stride),
                self.cfg,
            )
        return to_records(batch, props)

    def process_batch(self, items: list[ImageItem]) -> list[ImageRecord] | None:
        """One batch: decode in the thread pool, then backbone and proposals under the lock.

        Thread-safe; returns None, computing nothing, when cancelled while it waited for the
        backbone (another actor finished the same batch first)."""
        if self._pool is None:
            self._pool = ThreadPoolExecutor(self.decode_threads, thread_name_prefix="decode")
        loaded = list(self._pool.map(self.load, items))
        with self._infer_lock:
            if self.cancelled():
                return None
            return self._infer(loaded)

    def process_shard(
        self,
        index: int,
        items: list[ImageItem],
        on_batch: Callable[[int, int], None] | None = None,
    ) -> dict[str, Any]:
        """Compute and write shard ``index``; returns counts for the progress and summary.

        Batches as ``work_units.shard_batches`` forms them (images of like shape together for a
        batch-invariant backbone); records are written in the shard's order. Batch
        n+1..n+prefetch are decoded by the thread pool while batch n runs the backbone.
        ``on_batch(images, masks)`` is called after each batch (local progress bar).
        """
        t0 = time.perf_counter()
        batches = shard_batches(items, self.cfg.batch_size, self.by_shape)
        found: dict[int, ImageRecord] = {}  # position in the shard -> record
        with ThreadPoolExecutor(self.decode_threads, thread_name_prefix="decode") as pool:
            pending: deque = deque()
            ahead = 1 + max(0, int(self.cfg.prefetch))
            for b in batches[:ahead]:
                pending.append([pool.submit(self.load, items[i]) for i in b])
            nxt = ahead
            for positions in batches:
                futures = pending.popleft()
                if nxt < len(batches):
                    pending.append([pool.submit(self.load, items[i]) for i in batches[nxt]])
                    nxt += 1
                out = self._infer([f.result() for f in futures])
                found.update(zip(positions, out))
                if on_batch is not None:
                    on_batch(len(out), sum(r.num_masks for r in out))
        records = [found[i] for i in range(len(items))]
        write_shard(self.out_dir / shard_name(index), records, self.meta)
        summary = count_records(records)
        summary.update(index=index, seconds=time.perf_counter() - t0)
        return summary


def to_records(batch: list[_Loaded], props: list[Proposals]) -> list[ImageRecord]:
    """Shard records of a batch, in its order, from the proposals of its readable images."""
    found = iter(props)  # propose() answers the readable images in order
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
        if int(p.masks.shape[0]) == 0:
            # the shard's error column says why (schema v1 has it for every image)
            records.append(
                ImageRecord(it.file_name, int(it.image_id), h, w, STATUS_EMPTY, p.empty_reason)
            )
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


def count_records(records: list[ImageRecord]) -> dict[str, Any]:
    """A shard's counts for the progress bar and summary.json."""
    statuses = [r.status for r in records]
    return {
        "images": len(records),
        "ok": statuses.count(STATUS_OK),
        "empty": statuses.count(STATUS_EMPTY),
        "unreadable": statuses.count(STATUS_UNREADABLE),
        "masks": sum(r.num_masks for r in records),
        "errors": [[r.file_name, r.error] for r in records if r.status == STATUS_UNREADABLE],
    }


def count_existing(path: Path) -> dict[str, Any]:
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
