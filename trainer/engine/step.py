"""One optimisation step: forward under the stage's precision, the weighted losses summed, one
host sync for every logged number, a finiteness check that stops every DDP rank together, the
backward pass, clipping, the optimiser and the lr schedule."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from pipeline.cli import UserError
from pipeline.precision import autocast


def to_device(batch: Any, device: torch.device) -> tuple[torch.Tensor, list[dict]]:
    """(images, targets) on ``device`` from a trainer Batch or an (images, targets) pair."""
    non_blocking = device.type == "cuda"
    if hasattr(batch, "to") and hasattr(batch, "targets"):
        moved = batch.to(device, non_blocking=non_blocking)
        return moved.images, moved.targets
    images, targets = batch
    targets = [{k: v.to(device, non_blocking=non_blocking) for k, v in t.items()} for t in targets]
    return images.to(device, non_blocking=non_blocking), targets


class OptimisationStep:
    """``step(images, targets, iteration)`` -> {"loss", "loss_*", "stat_*", "grad_norm"} as
    floats. ``last_good()`` names the checkpoint a non-finite loss or gradient falls back to."""

    def __init__(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        scheduler: Any,
        scaler: Any,
        clip_grad: float,
        precision: str,
        device: torch.device,
        world: int,
        last_good: Callable[[], str],
    ) -> None:
        self.model, self.optimizer, self.scheduler, self.scaler = (
            model,
            optimizer,
            scheduler,
            scaler,
        )
        self.trainable = [p for p in model.parameters() if p.requires_grad]
        self.max_norm = clip_grad if clip_grad > 0 else math.inf
        self.precision, self.device, self.world = precision, device, world
        self.last_good = last_good

    def __call__(self, images: Any, targets: list[dict], iteration: int) -> dict[str, float]:
        with autocast(self.precision, self.device):
            out = self.model(images, targets)
        loss_keys = sorted(k for k in out if k.startswith("loss_"))
        stat_keys = sorted(k for k in out if k.startswith("stat_"))
        if not loss_keys:
            raise ValueError("the objective returned no loss_* term")
        loss = sum(out[k].float() for k in loss_keys)
        # One host sync per iteration for every logged number (and the finiteness check).
        parts = [loss.detach()] + [out[k].detach().float() for k in loss_keys + stat_keys]
        values = torch.stack([p.reshape(()) for p in parts]).cpu()
        self._check_finite(values[: 1 + len(loss_keys)], loss_keys, iteration)
        grad_norm = self._backward_and_step(loss, iteration)
        named = dict(zip(["loss"] + loss_keys + stat_keys, values.tolist()))
        named["grad_norm"] = float(grad_norm)
        return named

    def _check_finite(self, losses: torch.Tensor, loss_keys: list[str], iteration: int) -> None:
        finite = torch.isfinite(losses).all()
        if self.world > 1:  # every rank must stop together, or the others hang in all-reduce
            flag = torch.tensor([float(finite)], device=self.device)
            dist.all_reduce(flag, op=dist.ReduceOp.MIN)
            finite = bool(flag.item())
        if not finite:
            bad = [k for k, v in zip(loss_keys, losses[1:]) if not math.isfinite(v)]
            raise UserError(
                f"non-finite loss at iteration {iteration} ({', '.join(bad) or 'other rank'})"
                f"; the last good checkpoint is {self.last_good()}"
            )

    def _backward_and_step(self, loss: torch.Tensor, iteration: int) -> torch.Tensor:
        optimizer, scaler = self.optimizer, self.scaler
        optimizer.zero_grad(set_to_none=True)
        if scaler is not None:
            scaler.scale(loss).backward()
            scaler.unscale_(optimizer)
        else:
            loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(self.trainable, self.max_norm)
        if scaler is None and not torch.isfinite(grad_norm):
            raise UserError(
                f"non-finite gradient at iteration {iteration}; the last good checkpoint is "
                f"{self.last_good()}"
            )
        if scaler is not None:
            scaler.step(optimizer)  # skips the step (and lowers the scale) on inf/nan
            scaler.update()
        else:
            optimizer.step()
        self.scheduler.step()
        return grad_norm
