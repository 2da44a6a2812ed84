"""The training loop of pre-training and fine-tuning (docs/architecture.md "The training engine").

``train`` runs a fixed number of iterations over an endless loader with the optimiser and
learning-rate schedule it is given: gradient clipping, optional mixed precision (bf16 autocast
on CUDA), a progress bar, ``metrics.jsonl`` + TensorBoard every ``log_every`` iterations, atomic
checkpoints, exact resume, and DDP when launched by ``torchrun``. Callers read the loop's settings
from a config section once (``Schedule.from_section``); the optimiser and its learning-rate
schedule come from trainer/optim.py (``optimizer_from_section``).

Exact resume: a checkpoint holds the model, optimizer, scheduler, scaler, the Python / NumPy /
torch RNG states, the sampler position and the partial logging window, saved after everything an
iteration does (step, log, evaluation). A resumed run therefore computes the same losses as an
uninterrupted one (bit for bit on CPU).
"""

from __future__ import annotations

import dataclasses
import math
import time
import warnings
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.optim.lr_scheduler import LambdaLR
from tqdm import tqdm

from pipeline.cli import UserError
from pipeline.precision import autocast, stage_precision
from trainer.checkpoint import (
    capture_rng_state,
    link_checkpoint,
    load_latest,
    model_state,
    prune_checkpoints,
    restore_rng_state,
    save_checkpoint,
    strip_frozen,
)
from trainer.distributed import barrier, dist_info
from trainer.loader import worker_error_line
from trainer.metrics_log import (
    LogWindow,
    append_metrics,
    plot_curves,
    read_metrics,
    truncate_metrics,
)

__all__ = ["Schedule", "checkpoint_path", "config_changes", "latest_checkpoint", "train"]

# --------------------------------------------------------------------------------------------
# The loop's schedule


@dataclass(frozen=True)
class Schedule:
    """How :func:`train` runs: its length and its clipping, precision, logging, checkpoint and
    evaluation intervals. Built from a config section with :meth:`from_section`, or written out
    with literal values.

    iters: total iterations, resumed ones included. clip_grad: maximum gradient norm (<= 0: no
    clipping, the norm is still logged). precision: "fp32", "bf16" or "fp16" (CUDA only) autocast
    for the forward pass (``pipeline.precision``); amp: the older key (autocast on CUDA only),
    read when precision is fp32. compile: torch.compile the model (its ``knet`` when it has one).
    log_every, ckpt_every: a metrics.jsonl record / a checkpoint every so many iterations and at
    the end. eval_every: ``eval_fn`` every so many iterations and at the end (0: never).
    keep_checkpoints: how many ``iter_*.pt`` to keep, newest first (<= 0: all).
    """

    iters: int
    clip_grad: float
    amp: bool | str
    log_every: int
    ckpt_every: int
    eval_every: int = 0
    keep_checkpoints: int = 0
    precision: str = "fp32"
    compile: bool = False

    @classmethod
    def from_section(cls, section: object, **changes: Any) -> Schedule:
        """The attributes of ``section`` (PretrainConfig, FinetuneConfig, ...) named like the
        fields, then ``changes``. A field with a default (eval_every) may be missing from the
        section; another one missing is a TypeError."""
        values = {}
        for f in dataclasses.fields(cls):
            if hasattr(section, f.name):
                values[f.name] = getattr(section, f.name)
            elif f.default is dataclasses.MISSING:
                raise TypeError(f"{type(section).__name__} has no '{f.name}' (a Schedule field)")
        values.update(changes)
        return cls(**values)


# --------------------------------------------------------------------------------------------
# Checkpoint state


def _split_state(objective: nn.Module) -> tuple[dict[str, Any], dict[str, Any]]:
    """(knet state, everything else) of an objective; a model without ``knet`` is all 'model'."""
    full = objective.state_dict()
    if not isinstance(getattr(objective, "knet", None), nn.Module):
        return full, {}
    model = {k[len("knet.") :]: v for k, v in full.items() if k.startswith("knet.")}
    extras = {k: v for k, v in full.items() if not k.startswith("knet.")}
    return model, extras


def _load_objective(objective: nn.Module, state: dict[str, Any], path: Path) -> None:
    knet = getattr(objective, "knet", None)
    if isinstance(knet, nn.Module):
        full = {f"knet.{k}": v for k, v in model_state(state, knet, path).items()}
        full.update(state.get("extras") or {})
    else:
        full = model_state(state, objective, path)
    objective.load_state_dict(full)


def _restore(objective, optimizer, scheduler, scaler, loader, state, path: Path) -> None:
    """Load a checkpoint's states; a model or optimiser that does not fit (other settings) is
    one line naming the checkpoint, not load_state_dict's multi-line report."""
    try:
        _load_objective(objective, state, path)
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        if scaler is not None and state.get("scaler"):
            scaler.load_state_dict(state["scaler"])
        if hasattr(loader, "load_state_dict") and state.get("loader"):
            loader.load_state_dict(state["loader"])
    except (RuntimeError, ValueError, KeyError, TypeError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(
            f"cannot resume from {path}: it does not fit this model or optimiser ({first}); "
            "resume with the settings it was made with, or choose another --out"
        ) from None


def checkpoint_path(out_dir: str | Path, iteration: int) -> Path:
    return Path(out_dir) / "checkpoints" / f"iter_{iteration:07d}.pt"


def latest_checkpoint(out_dir: str | Path) -> Path | None:
    """``checkpoints/last.pt``, else the highest ``iter_*.pt``, else None."""
    folder = Path(out_dir) / "checkpoints"
    if (folder / "last.pt").is_file():
        return folder / "last.pt"
    numbered = sorted(folder.glob("iter_*.pt")) if folder.is_dir() else []
    return numbered[-1] if numbered else None


def config_changes(old: dict[str, Any], new: dict[str, Any], prefix: str = "") -> list[str]:
    """Dotted keys whose values differ between two config dicts (``iters`` excluded: extending
    a run is the usual reason to resume with another config)."""
    changed = []
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key), new.get(key)
        if isinstance(a, dict) or isinstance(b, dict):
            if isinstance(a or {}, dict) and isinstance(b or {}, dict):
                changed += config_changes(a or {}, b or {}, f"{prefix}{key}.")
            else:
                changed.append(f"{prefix}{key}")
        elif a != b and key != "iters":
            changed.append(f"{prefix}{key}")
    return changed


# --------------------------------------------------------------------------------------------
# Loop helpers


def _has_eval(metrics_path: Path, iteration: int, is_main: bool) -> bool:
    """Whether metrics.jsonl holds the evaluation of ``iteration`` (True off rank 0 and for
    iteration 0: nothing to redo there)."""
    if not is_main or iteration == 0:
        return True
    return any(
        r.get("kind") == "eval" and int(r.get("iter", -1)) == iteration
        for r in read_metrics(metrics_path)
    )


def _cycle(loader: Iterable) -> Iterator:
    """Endless iteration: an infinite loader as is, a finite one restarted when exhausted."""
    while True:
        empty = True
        for batch in loader:
            empty = False
            yield batch
        if empty:
            raise UserError("the training loader yields no batch")


def _to_device(batch: Any, device: torch.device) -> tuple[torch.Tensor, list[dict]]:
    """(images, targets) on ``device`` from a trainer Batch or an (images, targets) pair."""
    non_blocking = device.type == "cuda"
    if hasattr(batch, "to") and hasattr(batch, "targets"):
        moved = batch.to(device, non_blocking=non_blocking)
        return moved.images, moved.targets
    images, targets = batch
    targets = [{k: v.to(device, non_blocking=non_blocking) for k, v in t.items()} for t in targets]
    return images.to(device, non_blocking=non_blocking), targets


def _compile(objective: nn.Module) -> None:
    """Compile the network in place (state-dict keys unchanged); the objective's matching and
    losses stay eager (scipy's Hungarian solver would break the graph anyway)."""
    target = getattr(objective, "knet", None)
    (target if isinstance(target, nn.Module) else objective).compile(dynamic=True)


# --------------------------------------------------------------------------------------------
# The loop


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
    :class:`trainer.loader.InfiniteLoader` also saves and restores its position. ``resume``
    continues from ``out_dir/checkpoints/last.pt`` (or the newest ``iter_*.pt``) when there is one
    (a fresh start otherwise); without ``resume`` an existing checkpoint is an error.
    ``inputs(images, infos)``, when given, turns each batch's images into what the model takes
    (``trainer.frozen_features.FrozenFeatures``: a frozen backbone's levels, maybe cached).
    ``eval_fn(t)`` runs on rank 0 every ``schedule.eval_every`` iterations and at the end, in eval
    mode without gradients; its metrics go to metrics.jsonl as kind "eval". ``pins`` (such as
    the digest of the shards trained on) is stored in every checkpoint as ``pins``.

    Returns {"iteration", "trained" (iterations run by this call), "data_wait_share", "seconds",
    "last_checkpoint", "last_record"}. On resume, settings that differ from the checkpoint's
    config are named in a warning (the checkpoint's optimizer and schedule state win).
    Raises UserError at a non-finite loss or gradient, naming the iteration; the last good
    checkpoint is left as it was.
    """
    iters, clip_grad, amp = schedule.iters, schedule.clip_grad, schedule.amp
    log_every, ckpt_every, eval_every = schedule.log_every, schedule.ckpt_every, schedule.eval_every
    for name, value in (("iters", iters), ("log_every", log_every), ("ckpt_every", ckpt_every)):
        if value < 1:
            raise UserError(f"{name} must be >= 1, got {value}")
    device = torch.device(device)
    out_dir = Path(out_dir)
    ckpt_dir = out_dir / "checkpoints"
    last_path = ckpt_dir / "last.pt"
    metrics_path = out_dir / "metrics.jsonl"
    rank, world = dist_info()
    is_main = rank == 0
    objective.to(device)

    precision = stage_precision(schedule, device, "training")
    if amp and precision == "fp32" and is_main:
        warnings.warn("amp is used on CUDA only (precision = 'bf16' on a CPU); fp32", stacklevel=2)
    if schedule.compile:
        _compile(objective)
    scaler = None
    if precision == "fp16":  # bf16 needs no loss scaling
        scaler = torch.amp.GradScaler("cuda")
    window = LogWindow()
    start = 0
    rng_state = None
    resume_from, state = load_latest(out_dir) if resume else (None, None)
    if resume_from is not None:
        changed = config_changes(state.get("config") or {}, config)
        if changed and is_main:
            warnings.warn(
                f"resuming {resume_from} with changed settings ({', '.join(changed)}); the "
                "checkpoint's optimizer and lr-schedule state are kept",
                stacklevel=2,
            )
        _restore(objective, optimizer, scheduler, scaler, loader, state, resume_from)
        window.load_state_dict(state.get("log_window"))
        start = int(state["iteration"])
        per_rank = state.get("rng_ranks")
        rng_state = per_rank[rank] if per_rank and len(per_rank) == world else state["rng"]
    elif not resume and ckpt_dir.is_dir() and any(ckpt_dir.glob("*.pt")):
        raise UserError(
            f"{out_dir} already holds checkpoints: pass --resume to continue that run, "
            "or choose another --out"
        )

    if is_main:
        out_dir.mkdir(parents=True, exist_ok=True)
        if start:
            truncate_metrics(metrics_path, start)
        else:
            metrics_path.write_text("")
    trainable = [p for p in objective.parameters() if p.requires_grad]
    model: nn.Module = objective
    if world > 1:
        ids = [device.index] if device.type == "cuda" else None
        model = DistributedDataParallel(objective, device_ids=ids, find_unused_parameters=True)

    writer = None
    if is_main and start < iters:
        from torch.utils.tensorboard import SummaryWriter

        purge = start + 1 if start else None  # hide the dead run's points after the checkpoint
        writer = SummaryWriter(str(out_dir / "tensorboard"), purge_step=purge)
    bar = tqdm(total=iters, initial=start, desc=desc, dynamic_ncols=True, disable=not is_main)
    total_data = total_time = 0.0
    last_record: dict[str, Any] = {}
    last_saved = str(resume_from) if start else None
    t_begin = time.perf_counter()
    frozen_print: list[str] = []  # a frozen backbone's fingerprint, computed once

    def save(iteration: int) -> None:
        nonlocal last_saved
        rngs = capture_rng_state()
        all_rngs = None
        if world > 1:
            all_rngs = [None] * world
            dist.all_gather_object(all_rngs, rngs)
        if is_main:
            knet_state, extras = _split_state(objective)
            knet = getattr(objective, "knet", None)
            frozen = None
            if isinstance(knet, nn.Module):
                knet_state, frozen = strip_frozen(knet, knet_state, *frozen_print[:1])
                if frozen and not frozen_print:
                    frozen_print.append(frozen["fingerprint"])
            state = {
                "model": knet_state,
                "frozen_backbone": frozen,
                "extras": extras,
                "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(),
                "scaler": scaler.state_dict() if scaler is not None else None,
                "rng": rngs,
                "rng_ranks": all_rngs,
                "loader": loader.state_dict() if hasattr(loader, "state_dict") else None,
                "log_window": window.state_dict(),
                "iteration": iteration,
                "config": config,
                "pins": pins or {},
                "num_classes": getattr(knet, "num_classes", None),
                # (COCO id, name) per class where the model was given them (fine-tuning), so
                # evaluation can check the categories it scores are the ones trained.
                "categories": getattr(knet, "categories", None),
            }
            path = checkpoint_path(out_dir, iteration)
            save_checkpoint(path, state)
            link_checkpoint(path, last_path)
            last_saved = str(path)
            prune_checkpoints(ckpt_dir, schedule.keep_checkpoints)
            # The loss plot follows the checkpoints, so a long run can be watched (and a killed
            # one still has its curves up to the last checkpoint).
            plot_curves(metrics_path, out_dir / "loss_curves.png")

    def run_eval(iteration: int) -> None:
        if is_main:
            # The evaluation's loaders draw from the global RNGs; restoring them keeps training
            # after it identical to a run resumed from the checkpoint saved just before it.
            rngs = capture_rng_state()
            objective.eval()
            with torch.no_grad():
                metrics = eval_fn(iteration)
            objective.train()
            restore_rng_state(rngs)
            append_metrics(metrics_path, {"kind": "eval", "iter": iteration, **metrics})
            for k, v in metrics.items():
                if isinstance(v, (int, float)):
                    writer.add_scalar(f"eval/{k}", v, iteration)
        barrier()

    try:
        if rng_state is not None:
            # Last, after everything that was built (and may have drawn random numbers).
            restore_rng_state(rng_state)
        if (  # single process only: the other ranks cannot tell whether rank 0 will evaluate
            world == 1
            and start < iters
            and eval_fn is not None
            and eval_every > 0
            and start % eval_every == 0
            and not _has_eval(metrics_path, start, is_main)
        ):
            run_eval(start)  # the evaluation a crash cut off after its checkpoint was saved
        objective.train()
        batches = _cycle(loader)
        for iteration in range(start + 1, iters + 1):
            t0 = time.perf_counter()
            try:
                batch = next(batches)
            except UserError as e:
                # A DataLoader worker's error arrives with the worker's traceback in its
                # message; its last line is the error itself.
                raise UserError(worker_error_line(str(e))) from None
            data_time = time.perf_counter() - t0
            images, targets = _to_device(batch, device)
            if inputs is not None:  # a frozen backbone's levels, from the feature cache or not
                images = inputs(images, batch.infos)
            with autocast(precision, device):
                out = model(images, targets)
            loss_keys = sorted(k for k in out if k.startswith("loss_"))
            stat_keys = sorted(k for k in out if k.startswith("stat_"))
            if not loss_keys:
                raise ValueError("the objective returned no loss_* term")
            loss = sum(out[k].float() for k in loss_keys)
            # One host sync per iteration for every logged number (and the finiteness check).
            parts = [loss.detach()] + [out[k].detach().float() for k in loss_keys + stat_keys]
            values = torch.stack([p.reshape(()) for p in parts]).cpu()
            finite = torch.isfinite(values[: 1 + len(loss_keys)]).all()
            if world > 1:  # every rank must stop together, or the others hang in all-reduce
                flag = torch.tensor([float(finite)], device=device)
                dist.all_reduce(flag, op=dist.ReduceOp.MIN)
                finite = bool(flag.item())
            if not finite:
                bad = [k for k, v in zip(loss_keys, values[1:]) if not math.isfinite(v)]
                raise UserError(
                    f"non-finite loss at iteration {iteration} ({', '.join(bad) or 'other rank'})"
                    f"; the last good checkpoint is {last_saved or 'none (none saved yet)'}"
                )

            optimizer.zero_grad(set_to_none=True)
            if scaler is not None:
                scaler.scale(loss).backward()
                scaler.unscale_(optimizer)
            else:
                loss.backward()
            grad_norm = torch.nn.utils.clip_grad_norm_(
                trainable, clip_grad if clip_grad > 0 else math.inf
            )
            if scaler is None and not torch.isfinite(grad_norm):
                raise UserError(
                    f"non-finite gradient at iteration {iteration}; the last good checkpoint is "
                    f"{last_saved or 'none (none saved yet)'}"
                )
            if scaler is not None:
                scaler.step(optimizer)  # skips the step (and lowers the scale) on inf/nan
                scaler.update()
            else:
                optimizer.step()
            scheduler.step()
            step_time = time.perf_counter() - t0
            total_data += data_time
            total_time += step_time

            named = dict(zip(["loss"] + loss_keys + stat_keys, values.tolist()))
            named["grad_norm"] = float(grad_norm)
            window.add(named, data_time, step_time, images.shape[0] * world)
            if is_main:
                bar.update(1)
                bar.set_postfix(
                    loss=f"{named['loss']:.3f}",
                    img_s=f"{images.shape[0] * world / max(step_time, 1e-9):.1f}",
                    refresh=False,
                )

            if iteration % log_every == 0 or iteration == iters:
                record = {"kind": "train", "iter": iteration}
                for group in optimizer.param_groups:
                    name = group.get("name", "heads")
                    record["lr" if name == "heads" else f"lr_{name}"] = group["lr"]
                record.update(window.averages())
                if iteration % log_every == 0:
                    # The extra record at a run's end keeps its window open, so a run resumed
                    # from that end logs the same windows as an uninterrupted one.
                    window = LogWindow()
                last_record = record
                if is_main:
                    append_metrics(metrics_path, record)
                    for k, v in record.items():
                        if k not in ("kind", "iter"):
                            writer.add_scalar(f"train/{k}", v, iteration)

            # Saved before evaluating, so a failing evaluation never costs the iterations
            # before it.
            if iteration % ckpt_every == 0 or iteration == iters:
                save(iteration)
            if (
                eval_fn is not None
                and eval_every > 0
                and (iteration % eval_every == 0 or iteration == iters)
            ):
                run_eval(iteration)
    except KeyboardInterrupt:
        # Ctrl-C: say what was kept and how to go on (the command prints "interrupted: ...").
        kept = f"last checkpoint {last_saved}" if last_saved else "no checkpoint saved yet"
        raise KeyboardInterrupt(f"{kept}; run the same command with --resume to continue") from None
    finally:
        bar.close()
        if writer is not None:
            writer.close()

    if is_main and not (start < iters):
        plot_curves(metrics_path, out_dir / "loss_curves.png")  # a finished run re-read
    barrier()
    return {
        "iteration": max(start, iters),
        "trained": max(0, iters - start),
        "data_wait_share": total_data / total_time if total_time > 0 else 0.0,
        "seconds": time.perf_counter() - t_begin,
        "last_checkpoint": last_saved,
        "last_record": last_record,
    }
