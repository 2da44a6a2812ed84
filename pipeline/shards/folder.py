"""Whether a proposals folder is finished, and which shards it holds, for the readers of it.

A proposals run writes ``plan.json`` first (how many shards the run plans), the shards one by one,
and ``summary.json`` last (its ``failed_shards``), and holds ``.run.lock`` while it runs. A reader
that only lists ``shard-*.h5`` would train on whatever happens to exist: the first shards of a run
still writing, or what a failed run left. :func:`folder_problems` compares the folder with those
records; :func:`shards_digest` names the exact shards read (their fingerprint and per-dataset
checksums), so a checkpoint can pin them and a resume on other shards is refused.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import json
import os
from pathlib import Path

import h5py

from pipeline.run_folder import LOCK_FILE
from pipeline.shards.integrity import CHECKSUM_ATTR, DATASETS
from pipeline.shards.schema import list_shards, shard_index

PLAN_FILE, SUMMARY_FILE = "plan.json", "summary.json"


def in_use(folder: Path) -> bool:
    """True while a proposals run holds the folder's lock (its flock, not just the file)."""
    try:
        fd = os.open(folder / LOCK_FILE, os.O_RDONLY)
    except OSError:
        return False  # no lock file: no run ever held the folder
    try:
        # Shared: readers probing at once (torchrun's ranks) do not see each other as a writer.
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except OSError as e:
        return e.errno in (errno.EWOULDBLOCK, errno.EAGAIN)
    finally:
        os.close(fd)  # also drops the probe's own lock at once
    return False


def _read_json(path: Path) -> dict | None:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _ranges(indices: list[int]) -> str:
    shown = ", ".join(str(i) for i in indices[:5])
    return shown + (f" and {len(indices) - 5} more" if len(indices) > 5 else "")


def folder_problems(folder: Path) -> list[str]:
    """What makes ``folder`` an incomplete or busy proposals result ([] when it is finished):
    a run holding its lock, shards plan.json plans that are missing, failed shards recorded in
    summary.json, shards the plan does not have. Folders without plan.json (hand-made shards)
    are checked for the lock and summary only."""
    problems = []
    if in_use(folder):
        problems.append("a proposals run is still writing it (its .run.lock is held)")
    plan = _read_json(folder / PLAN_FILE)
    have = [shard_index(p) for p in list_shards(folder)]
    planned = plan.get("num_shards") if plan else None
    if isinstance(planned, int) and planned >= 0:
        missing = sorted(set(range(planned)) - set(have))
        extra = sorted(i for i in have if i >= planned)
        if missing:
            problems.append(
                f"{len(missing)} of the {planned} shards in {PLAN_FILE} are missing "
                f"(shard {_ranges(missing)})"
            )
        if extra:
            problems.append(f"shards {_ranges(extra)} are not in its {PLAN_FILE}")
    summary = _read_json(folder / SUMMARY_FILE) or {}
    failed = summary.get("failed_shards") or {}
    if failed and isinstance(failed, dict):
        problems.append(
            f"{SUMMARY_FILE} records {len(failed)} failed shard(s) ({_ranges(sorted(failed))})"
        )
    return problems


def shards_digest(paths: list[Path]) -> str:
    """sha256 over each shard's name, fingerprint and stored dataset checksums: the same for
    the same shards, different as soon as any shard was recomputed with other results."""
    h = hashlib.sha256()
    for path in paths:
        h.update(path.name.encode())
        with h5py.File(path, "r") as f:
            h.update(str(f.attrs.get("fingerprint", "")).encode())
            for name in DATASETS:
                value = f[name].attrs.get(CHECKSUM_ATTR, "") if name in f else ""
                h.update(f"{name}={value};".encode())
    return f"sha256:{h.hexdigest()}"
