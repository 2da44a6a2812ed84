"""Where pre-training starts: the backbone alone, or ``pretrain.init``, an earlier pre-training's
checkpoint whose weights (the model and the kernel-supervision layers) begin this run while the
optimiser, schedule and sampler start fresh. That continues a pre-training under other settings,
for example a second phase at the teacher's input size after a first at a smaller one.

The init's sha256 is pinned in the run's checkpoints, so a resume refuses an init file rewritten
since (as it refuses shards recomputed since); on resume the run's own checkpoint holds the
weights and the init is not read again.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from torch import nn

from pipeline.backbones.weight_files import file_sha256
from pipeline.cli import UserError
from trainer.engine.checkpoint import load_checkpoint
from trainer.engine.run_state import load_objective

PIN = "init_sha256"


def init_pins(init: str) -> dict[str, str]:
    """{"init_sha256": digest} for a configured init (checked to exist), else {}."""
    if not init:
        return {}
    if not Path(init).is_file():
        raise UserError(f"pretrain.init: no checkpoint at {init}")
    return {PIN: file_sha256(init)}


def start_from(objective: nn.Module, init: str) -> None:
    """Load ``init``'s model (its weight average where it kept one) and extras into
    ``objective``; every tensor must fit (same model settings), and a fine-tuning checkpoint
    (it has classes) is refused."""
    state = load_checkpoint(init)
    if state.get("categories"):
        raise UserError(
            f"pretrain.init: {init} is a fine-tuning checkpoint (it has classes); give a "
            "pre-training's"
        )
    try:
        load_objective(objective, state, Path(init), averaged=True)
    except (RuntimeError, ValueError, KeyError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(
            f"pretrain.init: {init} does not fit this model ({first}); pre-train from it with "
            "the model settings it was made with"
        ) from None


def check_pinned_init(latest: tuple[Path | None, Any], pins: dict[str, Any]) -> None:
    """A resume must continue from the init its checkpoint was started from (same bytes).
    ``latest``: the run's ``load_latest`` (path, state)."""
    path, state = latest
    pinned = ((state or {}).get("pins") or {}).get(PIN)
    if path is not None and pinned != pins.get(PIN):
        raise UserError(
            f"cannot resume {path}: pretrain.init is not the checkpoint this run started from "
            "(its sha256 differs, or one of the two has no init); choose another --out"
        )
