"""The shard plan and the result fingerprint of a proposals run.

The sorted image list is cut into shards by a deterministic plan (shard i holds images
[i * shard_size, (i + 1) * shard_size)). The fingerprint (backbone weights + result-changing
settings + schema version) is stored in every shard, so a re-run can tell shards it may reuse
from shards made with other weights or settings.

Its own module so that the worker (which stamps shards with the fingerprint) and the
``proposals`` command (which checks them) both import it without importing each other.

The plan's inputs (source, absolute image root, the listing's hash and each file's size in bytes)
go into the proposals folder's plan.json, outside the shard schema. Every later reader takes the
image root from there unless told otherwise, and checks that a file it opens has the size the
proposals read, so a folder never silently pairs its masks with other pictures of the same name.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from pathlib import Path
from typing import Any

from pipeline.backbones.build import BACKBONE_CLASSES
from pipeline.cli import UserError
from pipeline.config import ProposalConfig
from pipeline.inputs.listing import ImageItem
from pipeline.shards.schema import SCHEMA_VERSION

# ProposalConfig fields that change how work is done but not what is computed. Every other
# field (including any added later) enters the fingerprint, so a new knob is safe by default.
# batch_size is one only for batch-invariant backbones (the ViT): a ResNet's border cells see
# how far pad_batch padded, so there it enters the fingerprint (see result_settings).
NON_RESULT_FIELDS = ("batch_size", "shard_size", "workers", "executor", "prefetch", "images", "out")
# Settings added after shards existed, at the value that reproduces the older results: left out of
# ``settings`` at that value, so every older shard keeps its fingerprint (and still resumes).
LATER_FIELDS = {"precision": "fp32", "compile": False}
# The clean-up switches (issue 22) enter the settings only when one of them is on, so shards made
# in the paper's form before the switches existed keep their fingerprint and stay reusable.
CLEANUP_FIELDS = ("keep_component", "piece_share", "split_share", "hole_share", "dup_iou")


def make_plan(items: list[ImageItem], shard_size: int) -> list[list[ImageItem]]:
    """Shard i = items[i * shard_size:(i + 1) * shard_size] of the (already sorted) list."""
    if shard_size < 1:
        raise UserError(f"proposals.shard_size must be >= 1, got {shard_size}")
    return [items[i : i + shard_size] for i in range(0, len(items), shard_size)]


def items_key(items: list[ImageItem]) -> list[list[Any]]:
    return [[it.file_name, int(it.image_id)] for it in items]


def plan_hash(shards: list[list[ImageItem]]) -> str:
    """Hash of the plan: which images (name and id) go to which shard."""
    data = json.dumps([items_key(s) for s in shards], separators=(",", ":"))
    return hashlib.sha256(data.encode()).hexdigest()


def result_settings(cfg: ProposalConfig, batch_invariant: bool = True) -> dict[str, Any]:
    """The proposal settings that change results (stored in every shard as ``settings``);
    ``batch_size`` among them when the backbone is not ``batch_invariant``."""
    skip = NON_RESULT_FIELDS if batch_invariant else tuple(set(NON_RESULT_FIELDS) - {"batch_size"})
    if not cfg.cleans():
        skip = (*skip, *CLEANUP_FIELDS)
    return {
        k: v
        for k, v in dataclasses.asdict(cfg).items()
        if k not in skip and not (k in LATER_FIELDS and v == LATER_FIELDS[k])
    }


def is_batch_invariant(backbone_kind: str) -> bool:
    """Whether the ``backbone_kind``'s features of an image are the same in any batch."""
    cls = BACKBONE_CLASSES.get(backbone_kind)
    return bool(cls is not None and cls.batch_invariant)


def compute_fingerprint(
    backbone_kind: str,
    weights_hash: str,
    cfg: ProposalConfig,
    batch_invariant: bool | None = None,
) -> str:
    """sha256 over backbone kind + weights hash + result-changing settings + schema version.

    ``batch_invariant``: the backbone's; None reads it from the class of ``backbone_kind``."""
    if batch_invariant is None:
        batch_invariant = is_batch_invariant(backbone_kind)
    payload = {
        "schema_version": SCHEMA_VERSION,
        "backbone": backbone_kind,
        "weights": weights_hash,
        "settings": result_settings(cfg, batch_invariant),
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


# --------------------------------------------------------------------------------------------
# The plan's inputs, recorded in plan.json for every later reader

PLAN_FILE = "plan.json"


def image_root_of(items: list[ImageItem]) -> Path:
    """The absolute folder the items' file names are relative to."""
    first = items[0]
    depth = len(Path(first.file_name).parts)
    return Path(first.path).absolute().parents[depth - 1]


def _file_bytes(path: Path) -> int:
    try:
        return os.stat(path).st_size
    except OSError:
        return -1  # missing: the worker records it as unreadable


def plan_inputs(source: str | Path, items: list[ImageItem]) -> dict[str, Any]:
    """{"source", "image_root" (absolute), "listing_hash", "file_bytes": {file_name: size}} of
    the images a proposals run reads (sizes -1 for files that are not there)."""
    sizes = {it.file_name: _file_bytes(Path(it.path)) for it in items}
    listing = [[it.file_name, int(it.image_id), sizes[it.file_name]] for it in items]
    digest = hashlib.sha256(json.dumps(listing, separators=(",", ":")).encode()).hexdigest()
    return {
        "source": str(Path(source).absolute()),
        "image_root": str(image_root_of(items)),
        "listing_hash": digest,
        "file_bytes": sizes,
    }


def recorded_inputs(folder: str | Path) -> dict[str, Any]:
    """The inputs a proposals folder's plan.json records ({} for folders made before they were
    recorded, or without a plan)."""
    try:
        plan = json.loads((Path(folder) / PLAN_FILE).read_text())
    except (OSError, ValueError):
        return {}
    return plan if isinstance(plan, dict) and "image_root" in plan else {}


def check_image_file(path: Path, file_name: str, file_bytes: dict[str, int], root: Path) -> None:
    """UserError naming the file when ``path`` is not the file the proposals read (another size
    on disk than plan.json records); nothing when the plan records no size for it."""
    want = file_bytes.get(file_name, -1)
    if want < 0:
        return
    got = _file_bytes(path)
    if got != want:
        what = "is missing" if got < 0 else f"has {got} bytes"
        raise UserError(
            f"{path} {what}, but the proposals read {want} bytes from "
            f"{Path(root) / file_name}: not the image the shards describe (wrong --image-root?)"
        )
