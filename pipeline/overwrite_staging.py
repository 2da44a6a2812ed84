"""``proposals --overwrite`` without losing the old result before a new one exists.

An overwriting run over a folder that already holds shards writes everything (plan, config,
shards, summary) into a staging folder inside it, ``.overwrite-staging``; only when that run has
computed every shard are the old shards and records replaced by the staged ones. A run that
cannot start (a bad ``RAY_ADDRESS``, Ray missing), fails part-way, or is killed leaves the old
shards untouched; its staging folder is discarded, at once or by the next run.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from pipeline.shards import list_shards, list_temp_files

STAGING = ".overwrite-staging"
REPLACED = ("plan.json", "summary.json")  # run records that describe the old shards


def begin(out: Path, overwrite: bool) -> Path:
    """The folder a run writes into: ``out`` itself, or for an overwriting run over existing
    shards a fresh staging folder inside it. Any stale staging folder is removed first."""
    staging = out / STAGING
    if staging.exists():  # left by a killed or failed overwriting run: never a result
        shutil.rmtree(staging)
    if not overwrite or not list_shards(out):
        return out
    staging.mkdir(parents=True)
    return staging


def commit(out: Path, staging: Path) -> None:
    """Replace ``out``'s shards and records by the staged ones, then remove the staging folder.

    Old shards the new plan does not have go first; every staged file then replaces its old
    namesake with one atomic rename, so a reader sees either the old or the new file."""
    staged = {p.name for p in staging.iterdir()}
    for p in list_shards(out) + list_temp_files(out):
        if p.name not in staged:
            p.unlink()
    for name in REPLACED:
        if name not in staged:
            (out / name).unlink(missing_ok=True)
    for name in sorted(staged, key=lambda n: n in REPLACED):  # records after the shards
        os.replace(staging / name, out / name)
    staging.rmdir()


def discard(staging: Path) -> None:
    shutil.rmtree(staging, ignore_errors=True)
