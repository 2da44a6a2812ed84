"""Run folders: one process at a time, stale temporary files removed on claim."""

from __future__ import annotations

import os

import pytest

from pipeline.cli import UserError
from pipeline.run_folder import LOCK_FILE, claim_run_folder


def test_second_claim_is_refused_with_the_holders_pid(tmp_path):
    folder = tmp_path / "run"
    with claim_run_folder(folder, "pretrain"):
        # flock locks belong to an open file, so a second open in this process conflicts
        # exactly as another process would.
        with pytest.raises(UserError, match=f"in use by pid {os.getpid()}") as info:
            with claim_run_folder(folder, "pretrain"):
                pass
        assert "\n" not in str(info.value)
    with claim_run_folder(folder, "pretrain"):  # released at the end of the block
        pass
    assert (folder / LOCK_FILE).is_file()


def test_claim_removes_stale_temporary_files_only(tmp_path):
    folder = tmp_path / "run"
    (folder / "checkpoints").mkdir(parents=True)
    stale = [
        folder / "checkpoints" / ".iter_0000100.pt.4242.tmp",
        folder / ".metrics.json.4242.tmp",
        folder / "shard-00003.h5.4242.tmp",
    ]
    kept = [folder / "checkpoints" / "iter_0000100.pt", folder / "metrics.json"]
    for p in stale + kept:
        p.write_text("x")
    with claim_run_folder(folder, "finetune") as removed:
        assert sorted(removed) == sorted(stale)
    assert not any(p.exists() for p in stale)
    assert all(p.exists() for p in kept)
