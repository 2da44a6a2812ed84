"""``pretrain.init``: a pre-training that starts from an earlier one's weights (a second phase at
another input size), its pinned init on resume, and the one-line refusals of an init that cannot
start it."""

from __future__ import annotations

import shutil

import torch

from tests.trainer.helpers import run_cli
from tests.trainer.test_pretrain import _args, make_shards
from tests.trainer.test_pretrain_guards import _one_line
from trainer.engine.checkpoint import load_checkpoint


def _weights(path) -> dict[str, torch.Tensor]:
    state = load_checkpoint(path)
    return {**state["model"], **{f"extras.{k}": v for k, v in state["extras"].items()}}


def _max_difference(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    return max((a[k].float() - b[k].float()).abs().max().item() for k in a)


def test_second_phase_starts_from_the_first_and_pins_it(tmp_path):
    shards = make_shards(tmp_path)
    first = tmp_path / "first"
    code, _, stderr = run_cli(*_args(shards, first, 2))
    assert code == 0, stderr
    init = first / "checkpoints" / "last.pt"

    # A second phase at a larger input size, with an lr too small to move the weights in one
    # step: its checkpoint holds the first phase's weights, model and kernel-supervision layers.
    second = tmp_path / "second"
    phase_two = ("--set", f"pretrain.init={init}", "--set", "pretrain.short_side=84",
                 "--set", "pretrain.max_side=112", "--set", "pretrain.lr=1e-12")  # fmt: skip
    code, _, stderr = run_cli(*_args(shards, second, 1, *phase_two))
    assert code == 0, stderr
    assert f"initialised from {init}" in stderr
    started = _weights(second / "checkpoints" / "last.pt")
    assert _max_difference(started, _weights(init)) < 1e-6
    # ... which a run from the backbone alone, same settings and seed, does not: it holds the
    # seeded initial weights, two of the first phase's steps away.
    code, _, stderr = run_cli(*_args(shards, tmp_path / "fresh", 1, *phase_two[2:]))
    assert code == 0, stderr
    assert _max_difference(_weights(tmp_path / "fresh" / "checkpoints" / "last.pt"), started) > 1e-4
    assert load_checkpoint(second / "checkpoints" / "last.pt")["iteration"] == 1

    # The init's bytes are pinned: rewritten since, a resume is refused in one line.
    shutil.copyfile(tmp_path / "fresh" / "checkpoints" / "last.pt", init)
    code, _, stderr = run_cli(*_args(shards, second, 2, *phase_two, "--resume"))
    line = _one_line(stderr)
    assert code == 2 and "not the checkpoint this run started from" in line


def test_an_init_that_cannot_start_the_run_is_one_line(tmp_path):
    shards = make_shards(tmp_path)
    out = tmp_path / "out"
    code, _, stderr = run_cli(*_args(shards, out, 1, "--set", f"pretrain.init={tmp_path / 'x.pt'}"))
    assert code == 2 and "pretrain.init: no checkpoint at" in _one_line(stderr)
    assert not out.exists() or not (out / "checkpoints").exists()

    first = tmp_path / "first"
    code, _, stderr = run_cli(*_args(shards, first, 1))
    assert code == 0, stderr
    init = first / "checkpoints" / "last.pt"
    # A model of another width: the init does not fit.
    wider = ("--set", f"pretrain.init={init}", "--set", "model.channels=32")
    code, _, stderr = run_cli(*_args(shards, out, 1, *wider))
    line = _one_line(stderr)
    assert code == 2 and "does not fit this model" in line and str(init) in line
    assert not (out / "checkpoints").exists()
