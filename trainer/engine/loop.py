"""The training loop of pre-training and fine-tuning (docs/architecture.md "The training engine").

``train`` runs a fixed number of iterations over an endless loader with the optimiser and
learning-rate schedule it is given. It reads as three parts: set-up (precision, resume, DDP, the
records), the loop of steps (``step.OptimisationStep``), and what happens periodically (a
metrics record, a checkpoint, an evaluation). Callers read the loop's settings from a config
section once (``schedule.Schedule.from_section``); the optimiser and its learning-rate schedule
come from trainer/engine/optim.py. Exact resume is ``run_state``'s.
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.optim.lr_scheduler import LambdaLR

from pipeline.cli import UserError
from pipeline.precision import stage_precision
from trainer.data.loader import worker_error_line
from trainer.engine.checkpoint import capture_rng_state, restore_rng_state
from trainer.engine.distributed import barrier, dist_info
from trainer.engine.metrics_log import plot_curves
from trainer.engine.records import Recorder, has_eval
from trainer.engine.run_state import Checkpointer, TrainingParts, resume_run
from trainer.engine.schedule import Schedule
from trainer.engine.step import OptimisationStep, to_device
from trainer.engine.weight_average import WeightAverage

__all__ = ["compile_network", "train"]


def _network(objective: nn.Module) -> nn.Module:
    """The model inside an objective (its ``knet``), or the objective when it is the model."""
    knet = getattr(objective, "knet", None)
    return knet if isinstance(knet, nn.Module) else objective


def compile_network(objective: nn.Module) -> None:
    """Compile the network in place (state-dict keys unchanged); the objective's matching and
    losses stay eager (scipy's Hungarian solver would break the graph anyway)."""
    _network(objective).compile(dynamic=True)


def _cycle(loader: Iterable) -> Iterator:
    """Endless iteration: an infinite loader as is, a finite one restarted when exhausted."""
    while True:
        empty = True
        for batch in loader:
            empty = False
            yield batch
        if empty:
            raise UserError("the training loader yields no batch")


def _next_batch(batches: Iterator) -> Any:
    try:
        return next(batches)
    except UserError as e:
        # A DataLoader worker's error arrives with the worker's traceback in its message; its
        # last line is the error itself.
        raise UserError(worker_error_line(str(e))) from None


def _precision_and_scaler(schedule: Schedule, device: torch.device, is_main: bool):
    precision = stage_precision(schedule, device, "training")
    if schedule.amp and precision == "fp32" and is_main:
        warnings.warn("amp is used on CUDA only (precision = 'bf16' on a CPU); fp32", stacklevel=3)
    scaler = torch.amp.GradScaler("cuda") if precision == "fp16" else None  # bf16: no scaling
    return precision, scaler


def _evaluate(objective, eval_fn, iteration: int, recorder: Recorder, average=None) -> None:
    """``eval_fn`` on rank 0 in eval mode without gradients; every rank waits for it. With a
    weight average the averaged weights are scored too, as the same metrics prefixed "ema_"."""
    if recorder.is_main:
        # The evaluation's loaders draw from the global RNGs; restoring them keeps training
        # after it identical to a run resumed from the checkpoint saved just before it.
        rngs = capture_rng_state()
        objective.eval()
        with torch.no_grad():
            metrics = eval_fn(iteration)
            if average is not None:
                restore_rng_state(rngs)  # both scored on the same draws
                with average.applied():
                    metrics.update({f"ema_{k}": v for k, v in eval_fn(iteration).items()})
        objective.train()
        restore_rng_state(rngs)
        recorder.log_eval(iteration, metrics)
    barrier()


def train(
    objective: nn.Module,
    loader: Iterable,
    optimizer: torch.optim.Optimizer,
    scheduler: LambdaLR,
    schedule: Schedule,
    *,
    out_dir: str | Path,
    device: torch.device | str,
    resume: bool,
    config: dict[str, Any],
    eval_fn: Callable[[int], dict[str, float]] | None = None,
    desc: str = "train",
    inputs: Callable[[torch.Tensor, list[dict]], Any] | None = None,
    pins: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Train ``objective`` (returns {"loss_*": weighted scalars, "stat_*": detached scalars}) for
    ``schedule.iters`` iterations in total, counting any resumed ones (see :class:`Schedule`).

    Iterations are numbered 1..iters: a record or checkpoint at iteration t is the state after t
    optimiser steps. ``loader`` yields trainer Batches (or (images, targets)); an
    :class:`trainer.data.loader.InfiniteLoader` also saves and restores its position. ``resume``
    continues from ``out_dir/checkpoints/last.pt`` (or the newest ``iter_*.pt``) when there is one
    (a fresh start otherwise); without ``resume`` an existing checkpoint is an error.
    ``inputs(images, infos)``, when given, turns each batch's images into what the model takes
    (``trainer.data.frozen_features.FrozenFeatures``: a frozen backbone's levels, maybe cached).
    ``eval_fn(t)`` runs on rank 0 every ``schedule.eval_every`` iterations and at the end, in eval
    mode without gradients; its metrics go to metrics.jsonl as kind "eval". ``pins`` (such as
    the digest of the shards trained on) is stored in every checkpoint as ``pins``.

    Returns {"iteration", "trained" (iterations run by this call), "data_wait_share", "seconds",
    "last_checkpoint", "last_record"}. On resume, settings that differ from the checkpoint's
    config are named in a warning (the checkpoint's optimizer and schedule state win).
    Raises UserError at a non-finite loss or gradient, naming the iteration; the last good
    checkpoint is left as it was.
    """
    run = _set_up(objective, loader, optimizer, scheduler, schedule, out_dir, device, resume,
                  config, pins, desc)  # fmt: skip
    start, iters, recorder = run.start, schedule.iters, run.recorder
    evaluates = eval_fn is not None and schedule.eval_every > 0
    t_begin = time.perf_counter()
    try:
        if run.rng_state is not None:
            restore_rng_state(run.rng_state)  # last, after everything that was built
        if (  # single process only: the other ranks cannot tell whether rank 0 will evaluate
            run.world == 1
            and start < iters
            and evaluates
            and start % schedule.eval_every == 0
            and not has_eval(recorder.metrics_path, start)
        ):
            _evaluate(objective, eval_fn, start, recorder, run.average)  # a crash cut it off
        objective.train()
        _steps(run, loader, optimizer, eval_fn if evaluates else None, inputs)
    except KeyboardInterrupt:
        # Ctrl-C: say what was kept and how to go on (the command prints "interrupted: ...").
        last = run.checkpoints.last_saved
        kept = f"last checkpoint {last}" if last else "no checkpoint saved yet"
        raise KeyboardInterrupt(f"{kept}; run the same command with --resume to continue") from None
    finally:
        recorder.close()
    if run.rank == 0 and not (start < iters):
        plot_curves(recorder.metrics_path, Path(out_dir) / "loss_curves.png")  # a finished run
    barrier()
    return {
        "iteration": max(start, iters),
        "trained": max(0, iters - start),
        "data_wait_share": run.data_time / run.step_time if run.step_time > 0 else 0.0,
        "seconds": time.perf_counter() - t_begin,
        "last_checkpoint": run.checkpoints.last_saved,
        "last_record": recorder.last_record,
    }


@dataclass
class _Run:
    """A training run once set up: where it starts, and the parts its loop drives."""

    objective: nn.Module
    schedule: Schedule
    device: torch.device
    rank: int
    world: int
    start: int
    rng_state: Any
    recorder: Recorder
    checkpoints: Checkpointer
    step: OptimisationStep
    average: WeightAverage | None
    data_time: float = 0.0  # seconds waiting for batches, summed over this call's iterations
    step_time: float = 0.0  # seconds per iteration, summed


def _set_up(objective, loader, optimizer, scheduler, schedule: Schedule, out_dir, device,
            resume: bool, config, pins, desc: str) -> _Run:  # fmt: skip
    """Precision, resume, the records, DDP and the step, in an order that draws no random
    numbers before the resumed RNG state is restored."""
    schedule.check()
    device, out_dir = torch.device(device), Path(out_dir)
    rank, world = dist_info()
    objective.to(device)
    precision, scaler = _precision_and_scaler(schedule, device, rank == 0)
    if schedule.compile:
        compile_network(objective)
    average = None
    if schedule.ema_decay > 0:  # of the network only: a pre-training's extras train it alone
        average = WeightAverage(_network(objective), schedule.ema_decay)
    parts = TrainingParts(objective, optimizer, scheduler, scaler, loader, rank, world, average)
    resumed = resume_run(parts, out_dir, config, resume)
    start = resumed.start
    recorder = Recorder(out_dir, schedule.iters, start, resumed.log_window, rank == 0, desc)
    checkpoints = Checkpointer(
        parts, out_dir, schedule.keep_checkpoints, config, pins,
        str(resumed.path) if start else None,
    )  # fmt: skip
    model: nn.Module = objective
    if world > 1:
        ids = [device.index] if device.type == "cuda" else None
        model = DistributedDataParallel(objective, device_ids=ids, find_unused_parameters=True)
    step = OptimisationStep(
        model, optimizer, scheduler, scaler, schedule.clip_grad, precision, device, world,
        checkpoints.describe_last,
    )  # fmt: skip
    return _Run(
        objective, schedule, device, rank, world, start, resumed.rng_state, recorder, checkpoints,
        step, average,
    )  # fmt: skip


def _steps(run: _Run, loader, optimizer, eval_fn, inputs) -> None:
    """The loop of steps, each followed by what happens periodically: a metrics record, a
    checkpoint, an evaluation (the checkpoint first, so a failing evaluation never costs the
    iterations before it)."""
    schedule, recorder = run.schedule, run.recorder
    batches = _cycle(loader)
    for iteration in range(run.start + 1, schedule.iters + 1):
        t0 = time.perf_counter()
        batch = _next_batch(batches)
        data_time = time.perf_counter() - t0
        images, targets = to_device(batch, run.device)
        if inputs is not None:  # a frozen backbone's levels, from the feature cache or not
            images = inputs(images, batch.infos)
        named = run.step(images, targets, iteration)
        if run.average is not None:
            run.average.update()
        step_time = time.perf_counter() - t0
        run.data_time += data_time
        run.step_time += step_time
        recorder.step(named, data_time, step_time, images.shape[0] * run.world)
        if schedule.logs(iteration):
            recorder.log(iteration, optimizer.param_groups, schedule.log_every)
        if schedule.saves(iteration):
            run.checkpoints.save(iteration, recorder.window.state_dict())
        if eval_fn is not None and schedule.evaluates(iteration):
            _evaluate(run.objective, eval_fn, iteration, recorder, run.average)
