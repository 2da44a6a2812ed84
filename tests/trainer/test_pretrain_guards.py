"""Pre-training reads only a finished proposals folder, and a resume only the shards it started
on: an unfinished folder is refused before any work (unless --partial-shards says to train on
what is there, which config.toml records), and a checkpoint pins the digest of its shards."""

from __future__ import annotations

import json
import shutil

from pipeline.run_folder import claim_run_folder
from tests.trainer.helpers import run_cli
from tests.trainer.test_pretrain import _args, make_shards
from trainer.config import load_config


def _one_line(stderr: str) -> str:
    """The error, which must be one line; the note that a short --iters scales the lr schedule
    (printed before any check) is not part of it."""
    lines = [
        line for line in stderr.strip().splitlines() if line and " is shorter than " not in line
    ]
    assert len(lines) == 1, stderr
    return lines[0]


def test_missing_planned_shard_is_refused_unless_partial_is_asked(tmp_path):
    shards = make_shards(tmp_path)
    (shards / "plan.json").write_text(json.dumps({"num_shards": 3}))
    out = tmp_path / "out"
    code, _, stderr = run_cli(*_args(shards, out, 1))
    line = _one_line(stderr)
    assert code == 2 and str(shards) in line and "1 of the 3 shards" in line
    assert "--partial-shards" in line and not (out / "config.toml").exists()

    code, _, stderr = run_cli(*_args(shards, out, 1, "--partial-shards"))
    assert code == 0, stderr
    assert "unfinished proposals folder" in stderr
    assert load_config(out / "config.toml").pretrain.partial_shards is True


def test_failed_shards_in_the_summary_are_refused(tmp_path):
    shards = make_shards(tmp_path)
    (shards / "summary.json").write_text(json.dumps({"failed_shards": {"2": "OOM"}}))
    code, _, stderr = run_cli(*_args(shards, tmp_path / "out", 1))
    assert code == 2 and "1 failed shard(s) (2)" in _one_line(stderr)


def test_a_folder_proposals_is_still_writing_is_refused(tmp_path):
    shards = make_shards(tmp_path)
    with claim_run_folder(shards, "proposals"):
        code, _, stderr = run_cli(*_args(shards, tmp_path / "out", 1))
    assert code == 2 and "still writing it" in _one_line(stderr)
    assert not (tmp_path / "out" / "checkpoints").exists()


def test_resume_on_recomputed_shards_is_refused(tmp_path):
    shards = make_shards(tmp_path)
    out = tmp_path / "out"
    code, _, stderr = run_cli(*_args(shards, out, 2))
    assert code == 0, stderr
    # proposals re-ran into the folder: shard 1 now holds other pseudo masks
    shutil.copyfile(shards / "shard-00000.h5", shards / "shard-00001.h5")
    code, _, stderr = run_cli(*_args(shards, out, 3, "--resume"))
    line = _one_line(stderr)
    assert code == 2 and "not the ones it was trained on" in line and "last.pt" in line


def test_a_batch_larger_than_the_shards_is_refused(tmp_path):
    shards = make_shards(tmp_path)  # 4 usable images
    out = tmp_path / "out"
    code, _, stderr = run_cli(*_args(shards, out, 1, "--set", "pretrain.batch_size=5"))
    line = _one_line(stderr)
    assert code == 2 and "pretrain.batch_size = 5" in line and "at most 4" in line
    assert not (out / "checkpoints").exists()
