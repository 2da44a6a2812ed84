"""How the training loop runs: its length and its clipping, precision, logging, checkpoint and
evaluation intervals, read from a config section once."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from pipeline.cli import UserError


@dataclass(frozen=True)
class Schedule:
    """How :func:`trainer.engine.loop.train` runs. Built from a config section with
    :meth:`from_section`, or written out with literal values.

    iters: total iterations, resumed ones included. clip_grad: maximum gradient norm (<= 0: no
    clipping, the norm is still logged). precision: "fp32", "bf16" or "fp16" (CUDA only) autocast
    for the forward pass (``pipeline.precision``); amp: the older key (autocast on CUDA only),
    read when precision is fp32. compile: torch.compile the model (its ``knet`` when it has one).
    log_every, ckpt_every: a metrics.jsonl record / a checkpoint every so many iterations and at
    the end. eval_every: ``eval_fn`` every so many iterations and at the end (0: never).
    keep_checkpoints: how many ``iter_*.pt`` to keep, newest first (<= 0: all). ema_decay: keep
    an exponential moving average of the weights (trainer/engine/weight_average.py), scored
    beside the trained weights at every evaluation (0: none).
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
    ema_decay: float = 0.0

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

    def check(self) -> None:
        """UserError for an interval or length below 1."""
        for name in ("iters", "log_every", "ckpt_every"):
            if getattr(self, name) < 1:
                raise UserError(f"{name} must be >= 1, got {getattr(self, name)}")

    def logs(self, iteration: int) -> bool:
        return iteration % self.log_every == 0 or iteration == self.iters

    def saves(self, iteration: int) -> bool:
        return iteration % self.ckpt_every == 0 or iteration == self.iters

    def evaluates(self, iteration: int) -> bool:
        every = self.eval_every
        return every > 0 and (iteration % every == 0 or iteration == self.iters)
