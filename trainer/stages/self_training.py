"""Self-training rounds (as in CutLER): what a round's shards record, and how they are verified.

Stage one's saliency proposals are round 1. ``trainer pseudo-label`` turns a pre-training
checkpoint's confident predictions on the images of a round ``n - 1`` folder into a round ``n``
folder. Its shards keep the source's ``settings`` attribute (stage one's proposal settings, which
fix the seeds' feature space: backbone input size and precision) and add a ``self_training``
attribute, a JSON record::

    {"round": n, "source_fingerprint": ..., "stage_one_fingerprint": ...,
     "checkpoint_sha256": ..., "labelling": {score_threshold, max_masks, nms, mask_threshold,
     short_side, max_side}}

The shards' ``fingerprint`` is the sha256 of that record and the schema version, so a resumed
round reuses only shards of the same source, checkpoint and labelling settings. The stage-one
fingerprint (backbone weights + settings) cannot be recomputed from a round's own fingerprint;
instead :func:`claimed_stage_one` checks the record against the fingerprint and hands its
stage-one fingerprint to the weight check (``trainer.stages.pretrain_shards.check_shards``), which
recomputes it
from the configured backbone's weights as it does for stage-one shards. :func:`check_out` keeps a
round from writing into a folder that holds anything but the same round (which it resumes).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from pipeline.cli import UserError
from pipeline.run_folder import LOCK_FILE
from pipeline.shards.folder import PLAN_FILE
from pipeline.shards.schema import SCHEMA_VERSION

ATTR = "self_training"
_REQUIRED = ("round", "source_fingerprint", "stage_one_fingerprint", "checkpoint_sha256")


def round_fingerprint(record: dict[str, Any]) -> str:
    """The fingerprint of a round's shards: sha256 over its record and the schema version."""
    payload = {"schema_version": SCHEMA_VERSION, ATTR: record}
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


def read_record(meta: dict[str, Any], where: str | Path) -> dict[str, Any] | None:
    """A shard's self-training record (None for stage-one shards); UserError naming ``where``
    when it is unreadable, incomplete or does not hash to the shard's fingerprint."""
    raw = meta.get(ATTR)
    if raw is None:
        return None
    try:
        record = json.loads(raw)
    except (TypeError, ValueError):
        record = None
    if not isinstance(record, dict) or any(k not in record for k in _REQUIRED):
        raise UserError(f"{where}: its '{ATTR}' attribute is not a self-training record")
    if round_fingerprint(record) != meta.get("fingerprint"):
        raise UserError(
            f"{where}: its '{ATTR}' record does not match the shards' fingerprint "
            "(edited shards?); re-run pseudo-label"
        )
    return record


def next_round(source_meta: dict[str, Any], where: str | Path) -> tuple[int, str]:
    """(round number, stage-one fingerprint) of a round made from shards with ``source_meta``:
    round 2 from stage-one shards, one more than the source's round otherwise."""
    record = read_record(source_meta, where)
    if record is None:
        return 2, str(source_meta.get("fingerprint"))
    return int(record["round"]) + 1, str(record["stage_one_fingerprint"])


def claimed_stage_one(meta: dict[str, Any], where: str | Path) -> tuple[str, list[str]]:
    """The stage-one fingerprint the shards' seeds go back to (their own for stage-one shards,
    their record's for a round, checked against their fingerprint), with a note for a round."""
    record = read_record(meta, where)
    if record is None:
        return str(meta.get("fingerprint")), []
    note = (
        f"self-training round {record['round']}: pseudo masks of checkpoint sha256 "
        f"{str(record['checkpoint_sha256'])[:12]} on the images of proposals "
        f"{str(record['source_fingerprint'])[:12]}"
    )
    return str(record["stage_one_fingerprint"]), [note]


def check_out(out: Path, fingerprint: str) -> None:
    """Refuse a non-empty ``out`` unless its plan is this round's (same fingerprint: a resume)."""
    if not out.is_dir() or not [p for p in out.iterdir() if p.name != LOCK_FILE]:
        return
    try:
        planned = json.loads((out / PLAN_FILE).read_text()).get("fingerprint")
    except (OSError, ValueError, AttributeError):
        planned = None
    if planned != fingerprint:
        raise UserError(
            f"{out} is not empty and not this pseudo-label job's folder: choose an empty --out "
            "(a re-run of the same command resumes its own folder)"
        )
