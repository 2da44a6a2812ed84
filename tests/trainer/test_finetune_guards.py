"""Fine-tuning defends its run folder: everything is checked before a record is written, settings
that change a run's meaning are refused on resume, bad labelled items are found up front, the
checkpoint is saved before an evaluation that fails, and one process holds the folder."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from pipeline.cli import UserError
from pipeline.run_folder import claim_run_folder
from tests.trainer.test_finetune import _finetune, tiny_project  # noqa: F401 (fixture)

RUN = Path("runs/tiny/finetune-0.5")
RECORDS = ("config.toml", "version.json", "split.json", "init.json", "metrics.json")


def _records() -> dict[str, str]:
    return {name: (RUN / name).read_text() for name in RECORDS}


def test_refused_runs_leave_a_finished_runs_records_alone(tiny_project):  # noqa: F811
    toml, ckpt = tiny_project
    code, _, err = _finetune(toml, 2)
    assert code == 0, err
    before = _records()
    # Not resumed: refused, nothing rewritten (it used to say frac 0.25, init none).
    code, _, err = _finetune(toml, 2, "--init", "none", "--out", str(RUN))
    assert code == 2 and "--resume" in err and _records() == before
    # Resumed with settings that change what the run is: refused by name, nothing rewritten.
    for extra in (
        ["--frac", "0.25", "--out", str(RUN)],
        ["--set", "model.num_kernels=8"],
    ):
        code, _, err = _finetune(toml, 2, "--resume", *extra)
        assert code == 2 and _records() == before, err
        line = err.strip().splitlines()[-1]
        assert "cannot resume" in line and "last.pt" in line, err
    # The pre-training behind the init path is re-run: a resume is refused, even after a
    # refused fresh start (which used to record the new sha for the resume to accept).
    state = torch.load(ckpt, weights_only=True)
    state["iteration"] = 99
    torch.save(state, ckpt)
    assert _finetune(toml, 2)[0] == 2
    code, _, err = _finetune(toml, 2, "--resume")
    assert code == 2 and "initialised from a different checkpoint" in err
    assert _records() == before


def test_bad_items_are_found_up_front(tiny_project):  # noqa: F811
    toml, _ = tiny_project
    split_ids = json.loads(Path("data/annotations/instances_train.json").read_text())["images"]
    # Val: a missing image refuses the run before anything is written.
    val = json.loads(Path("data/annotations/instances_val.json").read_text())["images"]
    moved = Path("data/val") / val[0]["file_name"]
    moved.rename(moved.with_suffix(".bak"))
    code, _, err = _finetune(toml, 1)
    assert code == 2 and "validation image" in err and "file not found" in err
    assert len(err.strip().splitlines()) == 1 and not (RUN / "config.toml").exists()
    moved.with_suffix(".bak").rename(moved)
    # Train: a truncated image is skipped with one line, the run goes on.
    bad = Path("data/train") / split_ids[0]["file_name"]
    bad.write_bytes(bad.read_bytes()[:60])
    code, _, err = _finetune(toml, 1, "--frac", "1.0", "--out", str(RUN))
    assert code == 0, err
    skipped = [line for line in err.splitlines() if "skipping training image" in line]
    assert len(skipped) == 1 and split_ids[0]["file_name"] in skipped[0]


def test_checkpoint_saved_before_a_failing_evaluation(tiny_project, monkeypatch):  # noqa: F811
    toml, _ = tiny_project

    def broken(*args, **kwargs):
        raise UserError(
            "Caught UserError in DataLoader worker process 0.\nOriginal Traceback (most recent "
            "call last):\n  ...\npipeline.cli.UserError: cannot read training image "
            "data/val/3.png: truncated"
        )

    monkeypatch.setattr("trainer.stages.finetune_eval.evaluate", broken)
    code, _, err = _finetune(toml, 2)
    assert code == 2
    assert (
        err.strip()
        .splitlines()[-1]
        .endswith("error: cannot read validation image data/val/3.png: truncated")
    )
    assert (RUN / "checkpoints" / "iter_0000002.pt").is_file()


def test_a_folder_in_use_is_refused(tiny_project):  # noqa: F811
    toml, _ = tiny_project
    with claim_run_folder(RUN, "finetune"):
        code, _, err = _finetune(toml, 1)
    assert code == 2 and "is in use by pid" in err
