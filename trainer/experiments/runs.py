"""One fine-tuning run of an experiment: its config (fraction, init, seed, budget, folder), and
running it or reusing a finished one with the same settings and the same init checkpoint bytes
(where a run lives is not a setting, so copied runs are recognised)."""

from __future__ import annotations

import dataclasses
import json
import sys
import tomllib
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from pipeline.cli import UserError
from pipeline.config import dump_toml
from trainer.config import Config
from trainer.config_compat import comparable
from trainer.stages.finetune import finetune
from trainer.stages.finetune_init import check_init, init_record
from trainer.stages.finetune_setup import resolve

# Sections that say what a compare, study or efficiency repeats, not what one run does: a run
# folder made under other seeds lists (or another study's variants or fractions) is the same run.
# A fine-tuning run reads no [pretrain] or [proposals] key (the pre-training it starts from is
# pinned by its checkpoint's sha256), so a changed pre-training setting, e.g. pretrain.eval_size,
# does not make a finished baseline run a different run.
IGNORED_SECTIONS = ("compare", "efficiency", "pretrain", "proposals")


# Keys that say where things live, not what a run computes: the folder itself and the init
# checkpoint (pinned by its sha256 instead, so a copied or moved checkpoint is the same init). A run
# folder copied from a compare into a study is reused, not refused.
LOCATION_KEYS = ("finetune.out", "finetune.init")


def drop_keys(tree: dict[str, Any], dotted: Sequence[str]) -> None:
    """Remove "section.key" entries from a config dict, in place (absent ones are fine)."""
    for name in dotted:
        section, key = name.split(".")
        tree.get(section, {}).pop(key, None)


def _differences(a: Any, b: Any, where: str = "") -> list[str]:
    """Dotted keys whose values differ between two nested dicts."""
    if isinstance(a, dict) and isinstance(b, dict):
        out = []
        for k in sorted(set(a) | set(b)):
            out += _differences(a.get(k), b.get(k), f"{where}.{k}" if where else k)
        return out
    return [] if a == b else [f"{where} ({b!r} recorded, {a!r} now)"]


def check_same_settings(cfg: Config) -> None:
    """Refuse to reuse or resume a run folder made with other settings (other iters, split...)."""
    recorded = Path(cfg.finetune.out) / "config.toml"
    if not recorded.is_file():
        return
    now = tomllib.loads(dump_toml(dataclasses.asdict(cfg)))
    now = comparable(now)
    then = comparable(tomllib.loads(recorded.read_text()))
    for section in IGNORED_SECTIONS:
        now.pop(section, None)
        then.pop(section, None)
    drop_keys(now, LOCATION_KEYS)
    drop_keys(then, LOCATION_KEYS)
    diff = _differences(now, then)
    if diff:
        raise UserError(
            f"{recorded.parent} was made with other settings: {'; '.join(diff[:3])}"
            f"{' ...' if len(diff) > 3 else ''}. Delete it or choose another --out"
        )


def _finished(cfg: Config, sha256: str | None) -> dict[str, Any] | None:
    """metrics.json of a run folder that completed ``cfg.finetune.iters`` iterations from the
    init checkpoint with this sha256, else None (a finished run from other bytes is an error)."""
    path = Path(cfg.finetune.out) / "metrics.json"
    if not path.is_file():
        return None
    summary = json.loads(path.read_text())
    done = summary.get("iterations") == cfg.finetune.iters
    if not (done and summary["final"]["iteration"] == cfg.finetune.iters):
        return None
    if summary.get("init_sha256") != sha256:
        raise UserError(
            f"{cfg.finetune.out} finished from another checkpoint (sha256 "
            f"{str(summary.get('init_sha256'))[:12]}, now {str(sha256)[:12]}): delete that "
            "folder or choose another --out"
        )
    return summary


def run_config(
    cfg: Config, *, frac: float | None, init: str, iters: int | None, out: Path, seed: int
) -> Config:
    """The resolved config of one fine-tuning run: ``cfg`` with this init, folder and seed."""
    run_cfg = resolve(cfg, frac=frac, init=init, iters=iters, out=str(out))
    run_cfg.finetune.seed = seed
    return run_cfg


def run_or_reuse(run_cfg: Config) -> dict[str, Any]:
    """metrics.json of the run described by ``run_cfg``: reused when it finished with the same
    settings and init bytes, else trained (resuming a partial run). Empty on non-zero ranks."""
    check_same_settings(run_cfg)
    record = init_record(run_cfg.finetune.init)
    check_init(Path(run_cfg.finetune.out), record)
    summary = _finished(run_cfg, record["sha256"])
    if summary is not None:
        print(f"compare: reusing the finished run {run_cfg.finetune.out}", file=sys.stderr)
        return summary
    return finetune(run_cfg, resume=True)


def run_record(
    run_cfg: Config, summary: dict[str, Any], row: str, pretrain_seed: int | None = None
) -> dict[str, Any]:
    """One run as trainer/experiments/results.py reads it (its curve from the run's
    ap_curve.json)."""
    out = Path(run_cfg.finetune.out)
    return {
        "row": row,
        "seed": run_cfg.finetune.seed,
        "pretrain_seed": pretrain_seed,
        "out": str(out),
        "init": run_cfg.finetune.init,
        "init_sha256": summary.get("init_sha256"),
        "iterations": summary["iterations"],
        "train_seconds": summary["train_seconds"],
        "final": summary["final"],
        "best": summary["best"],
        "curve": json.loads((out / "ap_curve.json").read_text()),
    }
