"""Whether a run folder may be continued with the settings given now, decided before anything is
written into it.

A run's meaning is fixed by some settings (the model, the backbone, the labelled fraction and its
split, the pre-training data and objective): resuming with another value would relabel or mix a
run, so that is an error naming the checkpoint and the setting. Other settings (iterations, log
intervals, the learning rate) may change; the engine names them in a warning. A folder holding
another stage's run, or a checkpoint that does not fit the model built now, is one line too,
never a load_state_dict traceback.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

from torch import nn

from pipeline.cli import UserError
from trainer.config_compat import comparable
from trainer.engine.checkpoint import load_latest, load_matching, model_state

# Dotted config keys (or section prefixes) that change what a run is, per stage.
MEANING_KEYS = {
    "finetune": (
        "model.",
        "backbone.",
        "data.train_json",
        "finetune.frac",
        "finetune.split_seed",
        "finetune.split_file",
        "finetune.split_fold",
        "finetune.init",
        "finetune.frozen_stages",
        "finetune.precision",
    ),
    "pretrain": (
        "model.",
        "backbone.",
        "pretrain.shards",
        "pretrain.prompts",
        "pretrain.kernel_supervision",
        "pretrain.prompt_slots",
        "pretrain.ks_target",
        "pretrain.precision",
        "pretrain.holdout",
        "pretrain.pseudo_",
        "pretrain.ema_decay",  # a resume must find the average it continues
    ),
}


def _flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, dict):
            flat.update(_flatten(v, f"{prefix}{k}."))
        else:
            flat[f"{prefix}{k}"] = v
    return flat


def meaning_changes(stage: str, then: dict[str, Any], now: dict[str, Any]) -> list[str]:
    """'key (then -> now)' for every meaning-changing setting that differs."""
    a, b = _flatten(comparable(copy.deepcopy(then))), _flatten(comparable(copy.deepcopy(now)))
    keys = sorted(k for k in set(a) | set(b) if k.startswith(MEANING_KEYS[stage]))
    return [f"{k} ({a.get(k)!r} -> {b.get(k)!r})" for k in keys if a.get(k) != b.get(k)]


def _same_folder(a: Any, b: Path) -> bool:
    return bool(a) and Path(str(a)).expanduser().resolve() == b.expanduser().resolve()


def stage_of(state: dict[str, Any], out: Path) -> str | None:
    """Which command wrote the checkpoint: the stage whose ``out`` setting is this folder
    (each command records its resolved output folder in the checkpoint's config)."""
    cfg = state.get("config") or {}
    found = [s for s in ("pretrain", "finetune") if _same_folder(cfg.get(s, {}).get("out"), out)]
    return found[0] if len(found) == 1 else None


def check_resume(
    stage: str,
    out: Path,
    config: dict[str, Any],
    knet: nn.Module | None = None,
    latest: tuple[Path | None, dict[str, Any] | None] | None = None,
) -> Path | None:
    """The checkpoint a ``--resume`` of ``stage`` into ``out`` would continue from (None for a
    fresh start), after checking that it may: written by the same stage, no meaning-changing
    setting changed, and (given ``knet``) its tensors fit the model built now. ``latest``:
    ``load_latest(out)`` when the caller already loaded it (a checkpoint is read once)."""
    path, state = latest if latest is not None else load_latest(out)
    if path is None:
        return None
    other = stage_of(state, out)
    if other is not None and other != stage:
        raise UserError(
            f"{path} is a {other} checkpoint: {out} holds a {other} run, not a {stage} one; "
            "choose another --out"
        )
    changed = meaning_changes(stage, state.get("config") or {}, config)
    if changed:
        raise UserError(
            f"cannot resume {path} with other settings that change what the run is: "
            f"{'; '.join(changed[:3])}{' ...' if len(changed) > 3 else ''}; resume with the "
            "recorded ones or choose another --out"
        )
    if knet is not None:
        try:
            load_matching(knet, model_state(state, knet, path, averaged=False), allowed_skips=())
        except UserError as e:
            raise UserError(f"cannot resume {path}: {e}") from None
    return path


def refuse_existing(out: Path) -> None:
    """Without --resume a folder that already holds checkpoints is refused (before any write,
    so the earlier run's records stay its own)."""
    folder = out / "checkpoints"
    if folder.is_dir() and any(folder.glob("*.pt")):
        raise UserError(
            f"{out} already holds checkpoints: pass --resume to continue that run, "
            "or choose another --out"
        )
