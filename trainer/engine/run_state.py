"""What a training checkpoint holds and how a run comes back from it (exact resume).

A checkpoint holds the model, optimizer, scheduler, scaler, the Python / NumPy / torch RNG states
(every rank's under DDP), the sampler position and the partial logging window, saved after
everything an iteration does (step, log, evaluation). A resumed run therefore computes the same
losses as an uninterrupted one (bit for bit on CPU).
"""

from __future__ import annotations

import copy
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch.distributed as dist
from torch import nn

from pipeline.cli import UserError
from trainer.config_compat import with_later_defaults
from trainer.engine.checkpoint import (
    capture_rng_state,
    link_checkpoint,
    load_latest,
    model_state,
    prune_checkpoints,
    save_checkpoint,
    strip_frozen,
)
from trainer.engine.metrics_log import plot_curves


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


def _split_state(objective: nn.Module) -> tuple[dict[str, Any], dict[str, Any]]:
    """(knet state, everything else) of an objective; a model without ``knet`` is all 'model'."""
    full = objective.state_dict()
    if not isinstance(getattr(objective, "knet", None), nn.Module):
        return full, {}
    model = {k[len("knet.") :]: v for k, v in full.items() if k.startswith("knet.")}
    extras = {k: v for k, v in full.items() if not k.startswith("knet.")}
    return model, extras


def load_objective(
    objective: nn.Module, state: dict[str, Any], path: Path, *, averaged: bool = False
) -> None:
    """Load a checkpoint's model (its frozen backbone restored from ``objective``'s own) and
    extras into ``objective``, strictly. ``averaged``: the run's weight average where it kept
    one (a new run starting from it), not the trained weights (a resume)."""
    knet = getattr(objective, "knet", None)
    if isinstance(knet, nn.Module):
        weights = model_state(state, knet, path, averaged=averaged)
        full = {f"knet.{k}": v for k, v in weights.items()}
        full.update(state.get("extras") or {})
    else:
        full = model_state(state, objective, path, averaged=averaged)
    objective.load_state_dict(full)


def _restore(objective, optimizer, scheduler, scaler, loader, average, state, path: Path) -> None:
    """Load a checkpoint's states; a model or optimiser that does not fit (other settings) is
    one line naming the checkpoint, not load_state_dict's multi-line report."""
    try:
        load_objective(objective, state, path)
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        if scaler is not None and state.get("scaler"):
            scaler.load_state_dict(state["scaler"])
        if hasattr(loader, "load_state_dict") and state.get("loader"):
            loader.load_state_dict(state["loader"])
        if average is not None:
            if not state.get("ema"):
                raise KeyError("it kept no weight average (ema_decay was 0 then)")
            average.load_state_dict(state["ema"])
    except (RuntimeError, ValueError, KeyError, TypeError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(
            f"cannot resume from {path}: it does not fit this model or optimiser ({first}); "
            "resume with the settings it was made with, or choose another --out"
        ) from None


@dataclass
class Resumed:
    """Where a run starts: iteration 0, or a checkpoint's iteration with its logging window and
    this rank's RNG state (restored last, after everything that draws random numbers is built)."""

    start: int = 0
    path: Path | None = None
    log_window: dict[str, Any] | None = None
    rng_state: Any = None


def resume_run(
    parts: TrainingParts, out_dir: Path, config: dict[str, Any], resume: bool
) -> Resumed:
    """Load ``out_dir``'s newest checkpoint into ``parts`` when ``resume`` (a fresh start when
    there is none); without ``resume`` an existing checkpoint is a UserError."""
    rank, world = parts.rank, parts.world
    path, state = load_latest(out_dir) if resume else (None, None)
    if path is None:
        ckpt_dir = out_dir / "checkpoints"
        if not resume and ckpt_dir.is_dir() and any(ckpt_dir.glob("*.pt")):
            raise UserError(
                f"{out_dir} already holds checkpoints: pass --resume to continue that run, "
                "or choose another --out"
            )
        return Resumed()
    # Keys added after the checkpoint was written read as the values it was made with.
    recorded = with_later_defaults(copy.deepcopy(state.get("config") or {}))
    changed = config_changes(recorded, config)
    if changed and rank == 0:
        warnings.warn(
            f"resuming {path} with changed settings ({', '.join(changed)}); the "
            "checkpoint's optimizer and lr-schedule state are kept",
            stacklevel=3,
        )
    _restore(
        parts.objective, parts.optimizer, parts.scheduler, parts.scaler, parts.loader,
        parts.average, state, path,
    )  # fmt: skip
    per_rank = state.get("rng_ranks")
    rng = per_rank[rank] if per_rank and len(per_rank) == world else state["rng"]
    return Resumed(int(state["iteration"]), path, state.get("log_window"), rng)


@dataclass
class TrainingParts:
    """What a checkpoint saves and restores, and where this process stands in a DDP group."""

    objective: nn.Module
    optimizer: Any
    scheduler: Any
    scaler: Any
    loader: Any
    rank: int = 0
    world: int = 1
    average: Any = None  # a WeightAverage of the network, or None


class Checkpointer:
    """Writes a run's checkpoints atomically (``iter_*.pt`` and ``last.pt``), prunes old ones and
    redraws the loss plot; remembers the last one saved for error messages."""

    def __init__(
        self,
        parts: TrainingParts,
        out_dir: Path,
        keep: int,
        config: dict[str, Any],
        pins: dict[str, Any] | None,
        last_saved: str | None,
    ) -> None:
        self.parts, self.out_dir, self.keep = parts, out_dir, keep
        self.config, self.pins = config, pins or {}
        self.last_saved = last_saved
        self._frozen_print: list[str] = []  # a frozen backbone's fingerprint, computed once

    def describe_last(self) -> str:
        return self.last_saved or "none (none saved yet)"

    def save(self, iteration: int, log_window: dict[str, Any]) -> None:
        parts = self.parts
        rngs = capture_rng_state()
        all_rngs = None
        if parts.world > 1:
            all_rngs = [None] * parts.world
            dist.all_gather_object(all_rngs, rngs)
        if parts.rank != 0:
            return
        state = self._state(iteration, rngs, all_rngs, log_window)
        path = checkpoint_path(self.out_dir, iteration)
        save_checkpoint(path, state)
        link_checkpoint(path, self.out_dir / "checkpoints" / "last.pt")
        self.last_saved = str(path)
        prune_checkpoints(self.out_dir / "checkpoints", self.keep)
        # The loss plot follows the checkpoints, so a long run can be watched (and a killed one
        # still has its curves up to the last checkpoint).
        plot_curves(self.out_dir / "metrics.jsonl", self.out_dir / "loss_curves.png")

    def _state(self, iteration, rngs, all_rngs, log_window) -> dict[str, Any]:
        parts = self.parts
        knet_state, extras = _split_state(parts.objective)
        knet = getattr(parts.objective, "knet", None)
        frozen = None
        if isinstance(knet, nn.Module):
            knet_state, frozen = strip_frozen(knet, knet_state, *self._frozen_print[:1])
            if frozen and not self._frozen_print:
                self._frozen_print.append(frozen["fingerprint"])
        loader = parts.loader
        return {
            "model": knet_state,
            "frozen_backbone": frozen,
            "extras": extras,
            "optimizer": parts.optimizer.state_dict(),
            "scheduler": parts.scheduler.state_dict(),
            "scaler": parts.scaler.state_dict() if parts.scaler is not None else None,
            "rng": rngs,
            "rng_ranks": all_rngs,
            "loader": loader.state_dict() if hasattr(loader, "state_dict") else None,
            "log_window": log_window,
            "ema": parts.average.state_dict() if parts.average is not None else None,
            "iteration": iteration,
            "config": self.config,
            "pins": self.pins,
            "num_classes": getattr(knet, "num_classes", None),
            # (COCO id, name) per class where the model was given them (fine-tuning), so
            # evaluation can check the categories it scores are the ones trained.
            "categories": getattr(knet, "categories", None),
        }
