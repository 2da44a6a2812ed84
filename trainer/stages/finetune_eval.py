"""Evaluation during fine-tuning and the run's metrics: the validation set's eval_fn (checked up
front, worker errors as one "validation image" line), the AP-vs-iteration curve, the training
time and metrics.json's summary, all read back from metrics.jsonl.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from pipeline.atomic_files import write_json
from pipeline.cli import UserError
from pipeline.precision import stage_precision
from trainer.config import Config
from trainer.data.eval_inputs import check_validation_images, validation_error
from trainer.engine.metrics_log import append_metrics, read_metrics
from trainer.stages.coco_metrics import METRIC_NAMES, load_coco
from trainer.stages.evaluate import build_eval_loader, evaluate


def ap_curve(metrics_jsonl: Path) -> list[dict[str, Any]]:
    """The "eval" records of a run's metrics.jsonl as [{"iteration", AP, AP50, ...}], by iteration.

    The engine truncates metrics.jsonl to the resumed checkpoint, so this is always the curve of
    the iterations that the final model went through.
    """
    by_iter: dict[int, dict[str, Any]] = {}
    for r in read_metrics(metrics_jsonl):
        if r.get("kind") == "eval":
            by_iter[int(r["iter"])] = {
                "iteration": int(r["iter"]),
                **{k: v for k, v in r.items() if k not in ("kind", "iter")},
            }
    return [by_iter[i] for i in sorted(by_iter)]


def train_seconds(metrics_jsonl: Path) -> float:
    """Seconds spent in training steps plus evaluations, summed from metrics.jsonl (so a resumed
    run counts every iteration it kept once, and start-up time is not counted)."""
    total, prev = 0.0, 0
    for r in read_metrics(metrics_jsonl):
        if r.get("kind") == "train":
            total += float(r["seconds_per_iter"]) * (int(r["iter"]) - prev)
            prev = int(r["iter"])
        elif r.get("kind") == "eval":
            total += float(r.get("eval_seconds", 0.0))
    return total


def no_eval(iteration: int) -> dict[str, float]:
    return {}


def make_eval_fn(
    cfg: Config,
    knet: torch.nn.Module,
    cat_ids: list[int],
    device: torch.device,
    frozen: Callable | None = None,
    store: Any | None = None,
) -> Callable[[int], dict[str, float]]:
    """eval_fn(iteration) -> mask AP of ``knet`` on the validation set (+ "eval_seconds").

    ``frozen``, ``store``: the run's frozen-feature source and cache (None when not used)."""
    ft = cfg.finetune
    val_loader = build_eval_loader(cfg, knet.size_divisor, store=store)
    if list(val_loader.dataset.cat_ids) != list(cat_ids):
        raise UserError(
            f"{cfg.data.val_json} and {cfg.data.train_json} have different "
            "categories: the classes the model learns would not be scored"
        )
    coco_gt = load_coco(cfg.data.val_json)
    check_validation_images(cfg, coco_gt.dataset)

    # The last evaluation's detections stay beside metrics.json (COCO results, pycocotools).
    final = Path(ft.out) / "detections-val.json" if ft.out else None

    precision = stage_precision(ft, device, "finetune")  # checked once, not per evaluation

    def eval_fn(iteration: int) -> dict[str, float]:
        t0 = time.perf_counter()
        try:
            metrics = evaluate(
                knet,
                val_loader,
                coco_gt,
                device,
                category_ids=cat_ids,
                mask_threshold=ft.test_mask_threshold,
                max_detections=ft.max_detections,
                inputs=frozen,
                precision=precision,
                results_path=final if iteration == ft.iters else None,
            )
        except UserError as e:  # one line, not the loader worker's traceback
            raise validation_error(e) from None
        return {**metrics, "eval_seconds": time.perf_counter() - t0}

    return eval_fn


def summarise(out: Path, iters: int, eval_fn, result: dict[str, Any]) -> dict[str, Any]:
    """metrics.json and ap_curve.json from the run's metrics.jsonl (evaluating the last
    checkpoint once more only if its evaluation is missing, e.g. an old finished run)."""
    curve = ap_curve(out / "metrics.jsonl")
    if not curve or curve[-1]["iteration"] != iters:
        # A finished run whose final evaluation was lost (cut short after its last checkpoint):
        # the engine loaded that checkpoint and had nothing to do, so evaluate it here.
        metrics = eval_fn(iters)
        append_metrics(out / "metrics.jsonl", {"kind": "eval", "iter": iters, **metrics})
        curve = ap_curve(out / "metrics.jsonl")
    write_json(out / "ap_curve.json", curve)
    final = curve[-1]
    best = max(curve, key=lambda r: r["AP"])
    keep = (*METRIC_NAMES, "iteration")
    return {
        "final": {k: final[k] for k in keep},
        "best": {k: best[k] for k in keep},
        "iterations": int(result["iteration"]),
        "train_seconds": train_seconds(out / "metrics.jsonl"),
        "checkpoint": str(out / "checkpoints" / "last.pt"),
    }
