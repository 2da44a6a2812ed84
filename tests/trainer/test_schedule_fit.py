"""``--iters`` shorter or longer than the configured schedule: the warm-up and lr steps scale with
it, and a schedule that would never decay is refused naming lr_steps (pre-training and
fine-tuning)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from pipeline.cli import UserError
from tests.trainer.helpers import run_cli
from trainer.config import FinetuneConfig, PretrainConfig
from trainer.engine.optim import WarmupStepSchedule, fit_schedule

DEMO = Path(__file__).resolve().parents[2] / "configs" / "demo.toml"
# A random ResNet: the commands stop at their missing data without loading the demo's ViT.
QUICK = ("--set", "backbone.kind=resnet50", "--set", "backbone.weights=random")


def test_a_shorter_run_scales_the_warmup_and_the_lr_steps():
    p = PretrainConfig(iters=300, warmup_iters=30, lr_steps=[220, 280])
    note = fit_schedule(p, "pretrain", 120)
    assert (p.iters, p.warmup_iters, p.lr_steps) == (120, 12, [88, 112])
    assert "lr_steps [220, 280] -> [88, 112]" in note and "warmup_iters 30 -> 12" in note
    # The rate decays twice inside the run: it never runs flat.
    schedule = WarmupStepSchedule(p.warmup_iters, 0.001, p.lr_steps, 0.1)
    assert schedule(119) == pytest.approx(0.01)


def test_a_longer_run_scales_the_schedule_too():
    # Unscaled, steps at 400 and 475 of a 1,000-iteration run would leave 525 iterations at 1%.
    ft = FinetuneConfig(iters=500, warmup_iters=50, lr_steps=[400, 475])
    note = fit_schedule(ft, "finetune", 1000)
    assert (ft.iters, ft.warmup_iters, ft.lr_steps) == (1000, 100, [800, 950])
    assert "is longer than finetune.iters = 500" in note and "[400, 475] -> [800, 950]" in note
    assert (
        fit_schedule(FinetuneConfig(iters=500, warmup_iters=0, lr_steps=[]), "finetune", 900) != ""
    )


def test_a_schedule_that_fits_is_left_alone():
    ft = FinetuneConfig(iters=500, warmup_iters=50, lr_steps=[400, 475])
    assert fit_schedule(ft, "finetune", 480) == ""
    assert (ft.iters, ft.warmup_iters, ft.lr_steps) == (480, 50, [400, 475])
    assert fit_schedule(FinetuneConfig(iters=500, warmup_iters=1, lr_steps=[]), "finetune", 5) == ""


def test_steps_past_the_end_without_iters_are_refused_naming_lr_steps():
    p = PretrainConfig(iters=120, warmup_iters=30, lr_steps=[220, 280])
    with pytest.raises(
        UserError, match=r"pretrain\.lr_steps \[220, 280\] lie past pretrain\.iters"
    ):
        fit_schedule(p, "pretrain", None)
    with pytest.raises(UserError, match="--iters must be >= 1"):
        fit_schedule(PretrainConfig(), "pretrain", 0)


def test_the_commands_scale_or_refuse(tmp_path):
    # Pre-training on the demo config: the note comes before any data is read (no shards here).
    args = ("pretrain", "--config", str(DEMO), *QUICK, "--shards", str(tmp_path / "none"))
    code, _, err = run_cli(*args, "--out", str(tmp_path / "p"), "--iters", "120")
    assert "lr_steps [800, 950] -> [96, 114]" in err
    code, _, err = run_cli(*args, "--out", str(tmp_path / "q"), "--set", "pretrain.iters=120")
    assert code == 2 and "pretrain.lr_steps [800, 950] lie past pretrain.iters = 120" in err
    assert len(err.strip().splitlines()) == 1
    # Fine-tuning: the same, through its own --iters.
    base = (
        "finetune",
        "--config",
        str(DEMO),
        *QUICK,
        "--init",
        "none",
        "--out",
        str(tmp_path / "f"),
    )
    code, _, err = run_cli(*base, "--iters", "100", "--set", "data.train_json=/nonexistent.json")
    assert "lr_steps [400, 475] -> [80, 95]" in err
    code, _, err = run_cli(*base, "--set", "finetune.iters=100")
    assert code == 2 and "finetune.lr_steps [400, 475] lie past finetune.iters = 100" in err


def test_scaled_steps_reach_the_optimizer():
    ft = FinetuneConfig(iters=500, warmup_iters=50, lr_steps=[400, 475], lr=1.0)
    fit_schedule(ft, "finetune", 100)
    from trainer.engine.optim import optimizer_from_section

    layer = torch.nn.Linear(2, 2)
    optimizer, scheduler = optimizer_from_section(layer, ft)
    for _ in range(99):
        optimizer.step()
        scheduler.step()
    assert optimizer.param_groups[0]["lr"] == pytest.approx(0.01)
