"""Exclusive use of a run folder: one process at a time, and its dead predecessors' litter removed.

Two commands writing into one folder (a SLURM requeue next to the original job, array tasks given
the same ``--out``) would each succeed and leave the folder mixed. ``claim_run_folder`` takes an
exclusive ``fcntl.flock`` on ``FOLDER/.run.lock`` for the whole run, so the second one stops with
one line naming the holder's pid. The kernel drops the lock when the holder dies (even by
SIGKILL), so a crashed run never blocks its resume.

Because no other process can be writing into a folder we hold, every temporary file left in it
(``.name.<pid>.tmp`` from the atomic writers, ``shard-*.h5.<pid>.tmp``) belongs to a dead run and
is deleted on claim.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import re
from collections.abc import Iterator
from pathlib import Path

from pipeline.cli import UserError

LOCK_FILE = ".run.lock"
# Temporary names of pipeline/atomic_files.py, trainer/engine/checkpoint.py and
# pipeline/shards/schema.py.
_TEMP_RE = re.compile(r"^(\..+\.\d+\.tmp|shard-\d{5,}\.h5\.[^.]+\.tmp)$")


def stale_temp_files(folder: Path, subfolders: tuple[str, ...] = ("checkpoints",)) -> list[Path]:
    """Temporary files in ``folder`` and its ``subfolders`` (not recursive beyond them)."""
    found = []
    for d in (folder, *(folder / s for s in subfolders)):
        if d.is_dir():
            found += [p for p in d.iterdir() if _TEMP_RE.match(p.name) and p.is_file()]
    return sorted(found)


def _holder(lock_path: Path) -> str:
    try:
        pid = lock_path.read_text().strip()
    except OSError:
        pid = ""
    return f"pid {pid}" if pid.isdigit() else "another process"


@contextlib.contextmanager
def claim_run_folder(folder: str | Path, command: str) -> Iterator[list[Path]]:
    """Hold an exclusive lock on ``folder`` (created if needed) for the ``with`` block; yields the
    stale temporary files it removed. UserError (one line) when another process holds it."""
    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        fd = os.open(folder / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as e:
        raise UserError(f"{command}: cannot use {folder}: {e.strerror}") from None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise UserError(
                f"{folder} is in use by {_holder(folder / LOCK_FILE)} (another {command} run); "
                "wait for it or choose another output folder"
            ) from None
        # The pid is informational (for the message above); the lock itself is the flock.
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        removed = stale_temp_files(folder)
        for p in removed:
            p.unlink(missing_ok=True)
        yield removed
    finally:
        os.close(fd)  # releases the flock
