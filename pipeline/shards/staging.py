"""``proposals --overwrite`` without losing the old result before a new one exists.

An overwriting run over a folder that already holds shards writes everything (plan, config,
shards, summary) into a staging folder inside it, ``.overwrite-staging``; only when that run has
computed every shard are the old shards and records replaced by the staged ones. A run that
cannot start, fails part-way, or is killed leaves the old shards untouched and its finished staged
shards in place: the next ``--overwrite`` run with the same plan and fingerprint resumes them (a
preempted, requeued job makes progress), one with another plan starts the staging afresh.

The replacement itself is rolled forward: :func:`commit` first writes the list of staged names
(``.commit``) into the staging folder, so a run killed among the renames is finished by the next
run before it does anything else, instead of leaving old and new shards mixed.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from pipeline.atomic_files import write_json
from pipeline.shards.schema import list_shards, list_temp_files

STAGING = ".overwrite-staging"
COMMIT = ".commit"  # inside the staging folder: the staged names being moved into place
REPLACED = ("plan.json", "summary.json")  # run records that describe the old shards


def _staged_plan(staging: Path) -> dict:
    try:
        plan = json.loads((staging / "plan.json").read_text())
    except (OSError, ValueError):
        return {}
    return plan if isinstance(plan, dict) else {}


def begin(out: Path, overwrite: bool, plan_hash: str = "", fingerprint: str = "") -> Path:
    """The folder a run writes into: ``out`` itself, or for an overwriting run over existing
    shards the staging folder inside it, kept from an interrupted run when that run had the same
    ``plan_hash`` and ``fingerprint`` (else made afresh). An interrupted commit is finished first.
    """
    staging = out / STAGING
    if (staging / COMMIT).is_file():
        roll_forward(out, staging)
    if staging.exists():
        plan = _staged_plan(staging)
        same = plan.get("plan_hash") == plan_hash and plan.get("fingerprint") == fingerprint
        if not (overwrite and same and plan_hash):
            shutil.rmtree(staging)  # our own staging, for another plan or a run without it
    if not overwrite or not list_shards(out):
        return out
    staging.mkdir(parents=True, exist_ok=True)
    return staging


def commit(out: Path, staging: Path) -> None:
    """Replace ``out``'s shards and records by the staged ones, then remove the staging folder.
    The names are recorded first, so a commit cut short is completed by :func:`roll_forward`."""
    names = sorted(p.name for p in staging.iterdir() if p.name != COMMIT)
    write_json(staging / COMMIT, {"staged": names})
    roll_forward(out, staging)


def roll_forward(out: Path, staging: Path) -> None:
    """Finish a recorded commit (idempotent): old shards the new plan does not have go first;
    every staged file then replaces its old namesake with one atomic rename (records last), so
    a reader sees either the old or the new file."""
    staged = set(json.loads((staging / COMMIT).read_text())["staged"])
    for p in list_shards(out) + list_temp_files(out):
        if p.name not in staged:
            p.unlink()
    for name in REPLACED:
        if name not in staged:
            (out / name).unlink(missing_ok=True)
    for name in sorted(staged, key=lambda n: n in REPLACED):  # records after the shards
        if (staging / name).exists():  # not yet moved by the run that was cut short
            os.replace(staging / name, out / name)
    shutil.rmtree(staging)
