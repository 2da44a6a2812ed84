"""Resume checks: settings that change what a run is, another stage's run, a model that does not
fit; each one line naming the checkpoint and the setting."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from pipeline.cli import UserError
from trainer.engine.checkpoint import save_checkpoint
from trainer.engine.resume import check_resume, meaning_changes, refuse_existing, stage_of


def _config(out: Path, stage: str, **changes) -> dict:
    cfg = {
        "model": {"num_kernels": 6},
        "backbone": {"kind": "resnet50", "weights": "random"},
        "pretrain": {"out": str(out) if stage == "pretrain" else "", "lr": 1e-3},
        "finetune": {"out": str(out) if stage == "finetune" else "", "frac": 0.05, "lr": 1e-4},
    }
    for dotted, value in changes.items():
        section, key = dotted.split("__")
        cfg[section][key] = value
    return cfg


def _save(out: Path, config: dict, model: dict | None = None) -> Path:
    path = out / "checkpoints" / "iter_0000002.pt"
    save_checkpoint(path, {"model": model or {}, "config": config, "iteration": 2})
    return path


def test_meaning_changes_ignore_the_learning_rate():
    then = _config(Path("r"), "finetune")
    assert meaning_changes("finetune", then, _config(Path("r"), "finetune", finetune__lr=1)) == []
    changed = meaning_changes("finetune", then, _config(Path("r"), "finetune", finetune__frac=0.1))
    assert changed == ["finetune.frac (0.05 -> 0.1)"]
    changed = meaning_changes(
        "pretrain", then, _config(Path("r"), "finetune", model__num_kernels=9)
    )
    assert changed == ["model.num_kernels (6 -> 9)"]


def test_resume_with_changed_frac_or_model_is_one_line(tmp_path):
    out = tmp_path / "ft"
    path = _save(out, _config(out, "finetune"))
    with pytest.raises(UserError, match=f"cannot resume {path}.*finetune.frac") as info:
        check_resume("finetune", out, _config(out, "finetune", finetune__frac=0.1))
    assert "\n" not in str(info.value)
    with pytest.raises(UserError, match="model.num_kernels"):
        check_resume("finetune", out, _config(out, "finetune", model__num_kernels=16))
    assert check_resume("finetune", out, _config(out, "finetune", finetune__lr=1.0)) == path


def test_out_pointing_at_another_stages_run(tmp_path):
    out = tmp_path / "pretrain"
    path = _save(out, _config(out, "pretrain"))
    assert stage_of(torch.load(path, weights_only=True), out) == "pretrain"
    with pytest.raises(UserError, match="is a pretrain checkpoint.*not a finetune one"):
        check_resume("finetune", out, _config(out, "finetune"))


def test_a_checkpoint_that_does_not_fit_names_itself(tmp_path):
    out = tmp_path / "ft"
    path = _save(
        out, _config(out, "finetune"), {"weight": torch.zeros(2, 3), "bias": torch.zeros(2)}
    )
    with pytest.raises(UserError, match=f"cannot resume {path}: .*shape-mismatched: weight"):
        check_resume("finetune", out, _config(out, "finetune"), nn.Linear(3, 4))


def test_refuse_existing_without_resume(tmp_path):
    refuse_existing(tmp_path / "new")  # nothing there: fine
    _save(tmp_path / "old", _config(tmp_path / "old", "finetune"))
    with pytest.raises(UserError, match="--resume"):
        refuse_existing(tmp_path / "old")
