"""The shard plan and the result fingerprint of a proposals run.

The sorted image list is cut into shards by a deterministic plan (shard i holds images
[i * shard_size, (i + 1) * shard_size)). The fingerprint (backbone weights + result-changing
settings + schema version) is stored in every shard, so a re-run can tell shards it may reuse
from shards made with other weights or settings.

Its own module so that the worker (which stamps shards with the fingerprint) and the
``proposals`` command (which checks them) both import it without importing each other.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from typing import Any

from pipeline.backbones import BACKBONE_CLASSES
from pipeline.cli import UserError
from pipeline.config import ProposalConfig
from pipeline.images import ImageItem
from pipeline.shards import SCHEMA_VERSION

# ProposalConfig fields that change how work is done but not what is computed. Every other
# field (including any added later) enters the fingerprint, so a new knob is safe by default.
# batch_size is one only for batch-invariant backbones (the ViT): a ResNet's border cells see
# how far pad_batch padded, so there it enters the fingerprint (see result_settings).
NON_RESULT_FIELDS = ("batch_size", "shard_size", "workers", "executor", "prefetch", "images", "out")


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
    return {k: v for k, v in dataclasses.asdict(cfg).items() if k not in skip}


def _batch_invariant(backbone_kind: str) -> bool:
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
        batch_invariant = _batch_invariant(backbone_kind)
    payload = {
        "schema_version": SCHEMA_VERSION,
        "backbone": backbone_kind,
        "weights": weights_hash,
        "settings": result_settings(cfg, batch_invariant),
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()
