"""bench/proposals.py's part (5): where stage one's time goes, each stage timed alone (fractions
of their sum) and cProfile's view of the end-to-end loop; plus the batching and device-sync helpers
that every part of that benchmark shares.
"""

from __future__ import annotations

import cProfile
import math
import pstats
import time
from pathlib import Path

import torch

from pipeline.executors.work_units import shard_batches
from pipeline.executors.worker import ProposalWorker, masks_to_rles
from pipeline.inputs.images import decode_image, normalise, pad_batch, resize_keep_ratio
from pipeline.saliency.propose import propose
from pipeline.shards.plan import make_plan
from pipeline.shards.schema import ImageRecord, write_shard


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def plan_batches(items: list, shard_size: int, batch_size: int, by_shape: bool) -> list[list]:
    """The batches the worker forms (work_units.shard_batches) in each shard of the plan."""
    return [
        [s[i] for i in positions]
        for s in make_plan(items, shard_size)
        for positions in shard_batches(s, batch_size, by_shape)
    ]


def stage_profile(worker: ProposalWorker, items: list, out: Path) -> dict:
    """(5) each stage alone, sequentially, as fractions of their sum; then cProfile's view."""
    cfg, net, dev = worker.cfg, worker.backbone, worker.device
    t = dict.fromkeys(("decode", "resize_normalise", "forward", "saliency", "rle", "write"), 0.0)
    records = []
    for b in plan_batches(items, len(items), cfg.batch_size, worker.by_shape):
        t0 = time.perf_counter()
        imgs = [decode_image(it.path, worker.min_side) for it in b]
        t1 = time.perf_counter()
        resized = [resize_keep_ratio(im, cfg.short_side, cfg.max_side)[0] for im in imgs]
        tensors = [normalise(r) for r in resized]
        x = pad_batch(tensors, net.size_divisor).to(dev)
        sync(dev)
        t2 = time.perf_counter()
        with torch.inference_mode():
            feats = net.saliency_features(x)
            sync(dev)
            t3 = time.perf_counter()
            stride = net.saliency_stride
            sizes = [r.shape[:2] for r in resized]
            valid = [(math.ceil(h / stride), math.ceil(w / stride)) for h, w in sizes]
            props = propose(feats, valid, sizes, [im.shape[:2] for im in imgs], float(stride), cfg)
            sync(dev)
        t4 = time.perf_counter()
        rles = [masks_to_rles(p.masks.cpu().numpy()) for p in props]
        t5 = time.perf_counter()
        for it, im, p, r in zip(b, imgs, props, rles):
            records.append(
                ImageRecord(
                    it.file_name,
                    it.image_id,
                    im.shape[0],
                    im.shape[1],
                    0 if r else 1,
                    rles=r,
                    boxes=p.boxes.cpu().numpy(),
                    scores=p.scores.cpu().numpy(),
                    seeds=p.seeds.cpu().numpy().astype("float16"),
                    seed_pos=p.seed_pos.cpu().numpy().astype("int16"),
                )
            )
        for k, v in zip(t, (t1 - t0, t2 - t1, t3 - t2, t4 - t3, t5 - t4)):
            t[k] += v
    t0 = time.perf_counter()
    write_shard(out / "profile" / "shard-00000.h5", records, worker.meta)
    t["write"] = time.perf_counter() - t0
    total = sum(t.values())
    stages = {k: round(v / total, 4) for k, v in t.items()}

    worker.out_dir = out / "cprofile"
    prof = cProfile.Profile()
    prof.enable()
    worker.process_shard(0, items)
    prof.disable()
    st = pstats.Stats(prof)
    whole = max(v[3] for v in st.stats.values())  # the outermost cumulative time
    top = sorted(st.stats.items(), key=lambda kv: kv[1][2], reverse=True)[:12]
    entries = [
        {
            "function": f"{Path(f).name}:{line}({fn})",
            "self_fraction": round(v[2] / whole, 4),
            "cumulative_fraction": round(v[3] / whole, 4),
        }
        for (f, line, fn), v in top
    ]
    return {
        "stage_seconds": {k: round(v, 4) for k, v in t.items()},
        "stage_fractions": stages,
        "cprofile_top_self": entries,
    }
