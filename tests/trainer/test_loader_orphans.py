"""DataLoader workers do not outlive their trainer: a trainer killed by SIGKILL (no cleanup runs)
leaves no worker, fork server or resource tracker behind."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

TRAINER = """
import os, sys, time
import torch
from torch.utils.data import Dataset
from trainer.data.loader import build_loader

class Tiny(Dataset):
    def __len__(self):
        return 8

    def __getitem__(self, key):
        masks = torch.zeros(0, 8, 8, dtype=torch.uint8)
        info = {"pid": os.getpid()}
        return {"image": torch.zeros(3, 8, 8), "target": {"masks": masks}, "info": info}

if __name__ == "__main__":
    loader = build_loader(Tiny(), 2, size_divisor=8, device="cpu", num_workers=2)
    pids = set()
    for batch in loader:
        pids |= {info["pid"] for info in batch.infos}
        if len(pids) == 2:
            break
    print(" ".join(map(str, sorted(pids))), flush=True)
    time.sleep(300)
"""


def _session(sid: int) -> list[int]:
    """Live (not zombie) processes of session ``sid``."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[3]) == sid and fields[0] != "Z":  # state, ppid, pgrp, session
            found.append(int(entry.name))
    return found


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads /proc (Linux)")
def test_sigkilled_trainer_leaves_no_worker_behind(tmp_path):
    script = tmp_path / "trainer_script.py"
    script.write_text(TRAINER)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen(
        [sys.executable, str(script)],
        stdout=subprocess.PIPE,
        text=True,
        env=env,
        start_new_session=True,  # its own session: every helper process it starts is in it
    )
    try:
        workers = [int(p) for p in proc.stdout.readline().split()]
        assert len(workers) == 2 and set(_session(proc.pid)) > set(workers)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        deadline = time.monotonic() + 20
        while _session(proc.pid) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert _session(proc.pid) == []
    finally:
        for pid in _session(proc.pid):  # on failure: only the processes this test started
            os.kill(pid, signal.SIGKILL)
