"""An exponential moving average of the network's weights (``pretrain.ema_decay``).

A query-based set predictor trained at a high learning rate moves between evaluations by more
than it improves: Mask2Former's pretext val AP swung by 3.5 AP from one evaluation to the next
(docs/results.md). Averaging the weights over the last few hundred steps (Polyak averaging, the
"mean teacher" of semi-supervised detection) smooths that walk, and averaging two of K-Net's
checkpoints 500 iterations apart already lifted its held-out fit (9.70 -> 9.97 AP).

The average is kept beside the trained weights, never instead of them: the optimiser steps the
trained weights, a checkpoint stores both (``"model"`` and ``"ema"``), a resume restores both,
and every reader of a finished checkpoint (fine-tuning's init, evaluation, prediction, kernels,
a later pre-training's init) takes the averaged weights where they exist
(:func:`trainer.engine.checkpoint.model_state`).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

from trainer.engine.checkpoint import frozen_backbone


def _averaged_names(network: nn.Module) -> list[str]:
    """State-dict names of the floating tensors that training changes: a wholly frozen backbone
    is skipped (it never moves, and copying a ViT per step would cost time for nothing)."""
    skip = "backbone." if frozen_backbone(network) is not None else None
    return [
        name
        for name, tensor in network.state_dict().items()
        if torch.is_floating_point(tensor) and not (skip and name.startswith(skip))
    ]


class WeightAverage:
    """EMA of ``network``'s trainable state with the usual warm-up: after ``n`` updates the decay
    is ``min(decay, (1 + n) / (10 + n))``, so the average does not remember the random start.
    The warm-up is slow: at decay 0.999 it ends after about 9,000 updates, so at the end of a
    4,000-iteration run the decay is 0.9978, an average over roughly the last 450 steps.
    """

    def __init__(self, network: nn.Module, decay: float) -> None:
        if not 0.0 < decay < 1.0:
            raise ValueError(f"ema_decay must be in (0, 1), got {decay}")
        self.network, self.decay, self.updates = network, float(decay), 0
        state = network.state_dict()
        self.names = _averaged_names(network)
        # fp32 copies: a bf16 average would round away the (1 - decay) share of each step.
        self.shadow = {n: state[n].detach().clone().float() for n in self.names}

    def current_decay(self) -> float:
        n = self.updates
        return min(self.decay, (1.0 + n) / (10.0 + n))

    @torch.no_grad()
    def update(self) -> None:
        """Move the average towards the network's weights after an optimiser step."""
        weight = 1.0 - self.current_decay()
        state = self.network.state_dict()
        for name in self.names:
            self.shadow[name].lerp_(state[name].detach().float(), weight)
        self.updates += 1

    @contextmanager
    @torch.no_grad()
    def applied(self) -> Iterator[None]:
        """The network holds the averaged weights inside the block, its own after it."""
        state = self.network.state_dict()
        kept = {n: state[n].detach().clone() for n in self.names}
        try:
            for name in self.names:
                state[name].copy_(self.shadow[name])
            yield
        finally:
            for name in self.names:
                state[name].copy_(kept[name])

    def state_dict(self) -> dict[str, Any]:
        return {"decay": self.decay, "updates": self.updates, "state": dict(self.shadow)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        missing = [n for n in self.names if n not in state["state"]]
        if missing:
            raise KeyError(f"the checkpoint's weight average lacks {missing[0]}")
        self.updates = int(state["updates"])
        self.shadow = {n: state["state"][n].detach().clone().float() for n in self.names}
