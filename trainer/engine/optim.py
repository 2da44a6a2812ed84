"""The optimiser and learning-rate schedule both training stages use.

AdamW over the trainable parameters, the backbone's at a fraction of the heads' rate (K-Net
fine-tuning's 0.25), and mmcv's "linear warm-up then step decay" as a per-iteration LambdaLR.
A section may ask for SGD with momentum instead (``optimizer = "sgd"``: the Mask R-CNN reference's
torchvision recipe, [maskrcnn]).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import nn
from torch.optim.lr_scheduler import LambdaLR

from pipeline.cli import UserError

BACKBONE_PREFIX = "knet.backbone."


def build_optimizer(
    objective: nn.Module,
    lr: float,
    weight_decay: float,
    backbone_lr_mult: float = 1.0,
    kind: str = "adamw",
    momentum: float = 0.9,
) -> torch.optim.Optimizer:
    """AdamW (``kind`` "adamw") or SGD with ``momentum`` ("sgd") over the trainable parameters;
    ``knet.backbone.*`` ones get ``lr * backbone_lr_mult``.

    Groups are named ("heads", "backbone") so logs can tell their learning rates apart.
    """
    heads, backbone = [], []
    for name, p in objective.named_parameters():
        if p.requires_grad:
            (backbone if name.startswith(BACKBONE_PREFIX) else heads).append(p)
    groups = []
    if heads:
        groups.append({"params": heads, "lr": lr, "name": "heads"})
    if backbone:
        groups.append({"params": backbone, "lr": lr * backbone_lr_mult, "name": "backbone"})
    if not groups:
        raise UserError("the model has no trainable parameter")
    if kind == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=momentum, weight_decay=weight_decay)
    return torch.optim.AdamW(groups, lr=lr, weight_decay=weight_decay)


class WarmupStepSchedule:
    """lr factor at iteration t: gamma ** #{s in steps: t >= s}, times the linear warm-up
    ratio + (1 - ratio) * t / warmup_iters while t < warmup_iters (mmcv's "linear" warm-up)."""

    def __init__(self, warmup_iters: int, warmup_ratio: float, steps: Iterable[int], gamma: float):
        self.warmup_iters = int(warmup_iters)
        self.warmup_ratio = float(warmup_ratio)
        self.steps = sorted(int(s) for s in steps)
        self.gamma = float(gamma)

    def __call__(self, t: int) -> float:
        factor = self.gamma ** sum(1 for s in self.steps if t >= s)
        if t < self.warmup_iters:
            factor *= self.warmup_ratio + (1.0 - self.warmup_ratio) * t / self.warmup_iters
        return factor


def build_scheduler(
    optimizer: torch.optim.Optimizer,
    warmup_iters: int,
    warmup_ratio: float,
    lr_steps: Iterable[int],
    gamma: float,
) -> LambdaLR:
    """Per-iteration LambdaLR (call ``step()`` once after every optimiser step)."""
    return LambdaLR(optimizer, WarmupStepSchedule(warmup_iters, warmup_ratio, lr_steps, gamma))


def optimizer_from_section(
    objective: nn.Module, section: object
) -> tuple[torch.optim.AdamW, LambdaLR]:
    """:func:`build_optimizer` and :func:`build_scheduler` with a config section's settings.

    ``section`` (PretrainConfig, FinetuneConfig, MaskRCNNConfig) has lr, weight_decay,
    warmup_iters, warmup_ratio, lr_steps and lr_gamma; backbone_lr_mult where it has one, else 1.0
    (a section without it trains a frozen backbone, or the backbone at the heads' rate);
    optimizer and momentum where it has them, else AdamW.
    """
    optimizer = build_optimizer(
        objective,
        section.lr,
        section.weight_decay,
        getattr(section, "backbone_lr_mult", 1.0),
        getattr(section, "optimizer", "adamw"),
        getattr(section, "momentum", 0.9),
    )
    scheduler = build_scheduler(
        optimizer, section.warmup_iters, section.warmup_ratio, section.lr_steps, section.lr_gamma
    )
    return optimizer, scheduler


def scaled_schedule(section: Any, factor: float, iters: int) -> tuple[list[int], int]:
    """(lr_steps, warmup_iters) of ``section`` scaled by ``factor`` for a run of ``iters``
    iterations: every step kept inside [1, iters - 1], so it still happens, and the warm-up ends
    before the run does."""
    steps = [max(1, min(iters - 1, round(s * factor))) for s in section.lr_steps]
    return steps, min(iters - 1, round(section.warmup_iters * factor))


def fit_schedule(section: Any, stage: str, iters: int | None) -> str:
    """Apply a command's ``--iters`` to a config section so its lr schedule never runs flat.

    The warm-up and lr_steps are written for ``section.iters``. A shorter ``--iters`` that cuts
    into them, or a longer one, scales both by iters / section.iters (the schedule keeps its
    shape, as ``trainer efficiency`` scales a fraction's budget), and the returned note says so.
    Unscaled, a longer run would spend everything past the last step at the final rate (a budget
    check at twice the iterations would train its second half at 1% of the lr). A shorter run
    that still holds every step is left alone. A schedule that still reaches past the run's end
    (set that way, e.g. ``--set pretrain.iters=120`` with steps at 220 and 280) is a UserError
    naming lr_steps. Returns "" when nothing was changed.
    """
    note = ""
    if iters is not None:
        if iters < 1:
            raise UserError(f"--iters must be >= 1, got {iters}")
        configured = int(section.iters)
        beyond = any(s > iters for s in section.lr_steps) or section.warmup_iters > iters
        if (iters < configured and beyond) or iters > configured:
            factor = iters / configured
            steps, warmup = scaled_schedule(section, factor, iters)
            than = "shorter" if iters < configured else "longer"
            note = (
                f"{stage}: --iters {iters} is {than} than {stage}.iters = {configured}, so the "
                f"lr schedule is scaled by {factor:.3g}: lr_steps {list(section.lr_steps)} -> "
                f"{steps}, warmup_iters {section.warmup_iters} -> {warmup}"
            )
            section.lr_steps, section.warmup_iters = steps, warmup
        section.iters = iters
    late = [s for s in section.lr_steps if s > section.iters]
    if late:
        raise UserError(
            f"{stage}.lr_steps {list(section.lr_steps)} lie past {stage}.iters = "
            f"{section.iters}, so the learning rate would never decay: set {stage}.lr_steps, "
            "or shorten the run with --iters, which scales them"
        )
    return note
