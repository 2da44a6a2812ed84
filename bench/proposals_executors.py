"""bench/proposals.py's part (3): the local executor against Ray at each worker count, over the
same images and shard plan, as ratios to local (the work alone, and with each one's start-up).
"""

from __future__ import annotations

import time
from pathlib import Path

from pipeline.executors.dispatch import run_local, run_ray
from pipeline.executors.ray_cluster import ray_init
from pipeline.executors.worker import ProposalWorker
from pipeline.shards.plan import make_plan


def executor_runs(cfg, items: list, out: Path, worker_counts: list[int], fingerprint: str) -> dict:
    """(3) local, then Ray at each worker count, over the same images and plan."""
    jobs = list(enumerate(make_plan(items, cfg.proposals.shard_size)))
    t0 = time.perf_counter()
    worker = ProposalWorker(cfg.backbone, cfg.proposals, out / "cmp-local")
    start = time.perf_counter() - t0
    t0 = time.perf_counter()
    failed = run_local(worker, jobs, lambda s: None)
    work = time.perf_counter() - t0
    del worker
    local = {
        "start_s": start,
        "seconds": work,
        "images_per_s": len(items) / work,
        "images_per_s_with_start": len(items) / (work + start),
        "failed_shards": len(failed),
    }
    t0 = time.perf_counter()
    ray, started = ray_init()
    init_s = time.perf_counter() - t0
    results = {}
    try:
        for n in worker_counts:
            stats: dict = {}
            t0 = time.perf_counter()
            failed = run_ray(
                cfg.backbone, cfg.proposals, out / f"ray{n}", jobs, n, fingerprint,
                lambda s: None, stats,
            )  # fmt: skip
            wall = time.perf_counter() - t0
            work = wall - stats["spawn_s"]
            results[str(n)] = {
                "actors": stats["actors"],
                "threads_per_actor": stats["threads"],
                "spawn_s": stats["spawn_s"],
                "seconds": work,
                "images_per_s": len(items) / work,
                "images_per_s_with_start": len(items) / (wall + init_s),
                "failed_shards": len(failed),
            }
    finally:
        if started:
            ray.shutdown()
    ratios = {}
    for n, r in results.items():
        ratios[f"ray_{n}_over_local"] = round(r["images_per_s"] / local["images_per_s"], 4)
        ratios[f"ray_{n}_over_local_with_start"] = round(
            r["images_per_s_with_start"] / local["images_per_s_with_start"], 4
        )
    return {
        "images": len(items),
        "shards": len(jobs),
        "ray_init_s": init_s,
        "local": local,
        "ray": results,
        "ratios": ratios,
    }
