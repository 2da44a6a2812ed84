"""The engine keeps work safe around evaluations and checkpoints: it saves before evaluating (and
resumed training stays exact although evaluations draw random numbers), redoes an evaluation a
crash cut off, keeps the last N checkpoints, and names the checkpoint when a resume does not fit."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from pipeline.cli import UserError
from tests.trainer.helpers import train_records
from tests.trainer.test_engine import _setup
from trainer.engine.checkpoint import numbered_checkpoints
from trainer.engine.loop import train
from trainer.engine.metrics_log import read_metrics
from trainer.engine.schedule import Schedule


def _run(out, iters, *, resume=False, eval_fn=None, keep=0, objective=None):
    made, loader, optimizer, scheduler = _setup()
    objective = objective or made
    if objective is not made:
        optimizer = torch.optim.SGD(objective.parameters(), lr=0.1)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0)
    schedule = Schedule(
        iters=iters,
        clip_grad=1.0,
        amp=False,
        log_every=1,
        ckpt_every=2,
        eval_every=2,
        keep_checkpoints=keep,
    )
    return train(
        objective,
        loader,
        optimizer,
        scheduler,
        schedule,
        out_dir=out,
        device="cpu",
        resume=resume,
        config={"name": "tiny"},
        eval_fn=eval_fn,
    )


def _noisy_eval(iteration: int) -> dict[str, float]:
    # Like a real evaluation's DataLoader: draws from the global generators.
    return {"AP": float(torch.rand(1)) + float(np.random.random())}  # noqa: NPY002


def test_resume_is_exact_across_evaluations_that_draw_random_numbers(tmp_path):
    _run(tmp_path / "straight", 6, eval_fn=_noisy_eval)
    _run(tmp_path / "cut", 4, eval_fn=_noisy_eval)
    _run(tmp_path / "cut", 6, resume=True, eval_fn=_noisy_eval)
    straight = [r["loss"] for r in train_records(tmp_path / "straight")]
    assert straight == [r["loss"] for r in train_records(tmp_path / "cut")]


def test_checkpoint_saved_before_a_failing_evaluation_and_the_evaluation_redone(tmp_path):
    def failing(iteration: int) -> dict[str, float]:
        raise UserError("cannot read validation image v/1.png: truncated")

    with pytest.raises(UserError, match="validation image"):
        _run(tmp_path, 4, eval_fn=failing)
    assert [p.name for p in numbered_checkpoints(tmp_path / "checkpoints")] == ["iter_0000002.pt"]
    _run(tmp_path, 4, resume=True, eval_fn=_noisy_eval)
    evals = [r["iter"] for r in read_metrics(tmp_path / "metrics.jsonl") if r["kind"] == "eval"]
    assert evals == [2, 4]  # iteration 2's evaluation, lost to the failure, was run on resume


def test_only_the_last_n_checkpoints_are_kept(tmp_path):
    _run(tmp_path, 6, keep=1)
    assert [p.name for p in numbered_checkpoints(tmp_path / "checkpoints")] == ["iter_0000006.pt"]
    assert (tmp_path / "checkpoints" / "last.pt").is_file()


def test_resume_into_another_model_names_the_checkpoint(tmp_path):
    _run(tmp_path, 2)
    other = nn.Sequential(nn.Linear(3, 3))
    with pytest.raises(UserError, match="cannot resume from .*last.pt: it does not fit"):
        _run(tmp_path, 4, resume=True, objective=other)


def test_ctrl_c_names_the_last_checkpoint_and_resume_and_the_plot_is_already_there(tmp_path):
    def interrupted(iteration: int) -> dict[str, float]:
        raise KeyboardInterrupt  # Ctrl-C during the evaluation after iteration 2's checkpoint

    with pytest.raises(KeyboardInterrupt, match=r"last checkpoint .*iter_0000002\.pt.*--resume"):
        _run(tmp_path, 6, eval_fn=interrupted)
    # The loss plot follows the checkpoints, so the interrupted run has its curves.
    assert (tmp_path / "loss_curves.png").is_file()
