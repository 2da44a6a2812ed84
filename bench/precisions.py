"""bench/proposals.py's part (6): stage one's throughput per precision setting and batch size.

Separate from the other parts so that each file holds one question; the runs themselves are
proposals.py's ``bare_backbone`` and ``end_to_end``, passed in.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from pathlib import Path

import torch

from bench.flops import cpu_peak_gflops
from pipeline.executors.worker import ProposalWorker


def precision_runs(
    cfg, items: list, shard_size: int, out: Path, settings: list[str], bare: Callable, e2e: Callable
) -> dict:
    """(6) bare backbone and end-to-end throughput per precision setting, ratios to the first."""
    rows = {}
    for setting in settings:
        precision, *rest = setting.split(":")
        pcfg = dataclasses.replace(cfg.proposals, precision=precision, compile=rest == ["compile"])
        worker = ProposalWorker(cfg.backbone, pcfg, "unused")
        rows[setting] = {
            "bare_backbone": bare(worker, items, shard_size),
            "end_to_end_local": e2e(worker, items, shard_size, out / setting),
        }
        del worker
    first = rows[settings[0]]
    for row in rows.values():
        for part in ("bare_backbone", "end_to_end_local"):
            row[part]["ratio"] = row[part]["images_per_s"] / first[part]["images_per_s"]
        row["end_to_end_over_bare"] = (
            row["end_to_end_local"]["images_per_s"] / row["bare_backbone"]["images_per_s"]
        )
    return {"peak_gflops": cpu_peak_gflops(), "settings": rows}


def batch_size_runs(cfg, items: list, precision: str, sizes: list[int], bare: Callable) -> dict:
    """(6) bare backbone throughput at each batch size."""
    rows = {}
    for size in sizes:
        pcfg = dataclasses.replace(cfg.proposals, precision=precision, batch_size=size)
        worker = ProposalWorker(cfg.backbone, pcfg, "unused")
        rows[str(size)] = bare(worker, items, len(items))["images_per_s"]
        del worker
    return {"precision": precision, "images_per_s": rows}


def thread_runs(cfg, items: list, precision: str, counts: list[int], bare: Callable) -> dict:
    """(6) bare backbone throughput at each torch thread count (the config's batch size)."""
    before = torch.get_num_threads()
    rows = {}
    try:
        for n in counts:
            torch.set_num_threads(n)
            pcfg = dataclasses.replace(cfg.proposals, precision=precision)
            worker = ProposalWorker(cfg.backbone, pcfg, "unused", threads=n)
            rows[str(n)] = bare(worker, items, len(items))["images_per_s"]
            del worker
    finally:
        torch.set_num_threads(before)
    return {"precision": precision, "images_per_s": rows}
