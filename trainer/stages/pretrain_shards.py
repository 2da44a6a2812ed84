"""What pre-training trains on: the proposals folder (finished, or --partial-shards), its shards'
fingerprint against the configured backbone's weights (stage one's or a self-training round's),
and the digest every checkpoint pins so a resume after proposals re-ran is refused."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from pipeline.backbones.backbone import Backbone, weights_fingerprint
from pipeline.cli import UserError
from pipeline.config import ConfigError, ProposalConfig, from_dict
from pipeline.shards.folder import folder_problems
from trainer.config import Config
from trainer.data.shard_dataset import ShardDataset
from trainer.stages.self_training import claimed_stage_one


def check_shards(dataset: ShardDataset, backbone: Backbone, cfg: Config) -> list[str]:
    """Refuse shards that do not come from this backbone; return notes on harmless differences.

    All shards must share one fingerprint; their backbone kind and seed width must be the
    configured backbone's; and the fingerprint recomputed from *these* backbone weights and the
    shards' own recorded settings must equal theirs (so the seeds S_l live in this backbone's
    feature space). A self-training round's shards (trainer/stages/self_training.py) are checked by
    their chain: their record must match their fingerprint, and the stage-one fingerprint it
    names must be the recomputed one. Proposal settings that differ from the current config
    only give a note.
    """
    folder = dataset.folder
    fingerprints = {m.get("fingerprint") for m in dataset.metas}
    if len(fingerprints) > 1:
        raise UserError(
            f"{folder} mixes shards of {len(fingerprints)} different proposal runs "
            "(fingerprints differ); re-run proposals into an empty folder"
        )
    meta = dataset.meta
    if meta.get("backbone") != cfg.backbone.kind:
        raise UserError(
            f"{folder} was made with backbone '{meta.get('backbone')}' but "
            f"backbone.kind is '{cfg.backbone.kind}'"
        )
    if int(meta.get("embed_dim", -1)) != backbone.embed_dim:
        raise UserError(
            f"{folder} holds {meta.get('embed_dim')}-d seeds but the "
            f"{cfg.backbone.kind} backbone gives {backbone.embed_dim}-d features"
        )
    claimed, notes = claimed_stage_one(meta, folder)
    try:
        from pipeline.shards.plan import compute_fingerprint, result_settings

        stored = json.loads(meta.get("settings", "{}"))
        made_with = from_dict(ProposalConfig, stored)
    except (ImportError, ValueError, ConfigError, TypeError) as e:
        return [*notes, f"cannot verify the shards' backbone weights ({e}); checked kind and width"]
    expected = compute_fingerprint(cfg.backbone.kind, weights_fingerprint(backbone), made_with)
    if expected != claimed:
        raise UserError(
            f"{folder} was made with other {cfg.backbone.kind} weights than "
            f"backbone.weights='{cfg.backbone.weights}' (fingerprint mismatch); "
            "re-run proposals with this backbone or point --shards elsewhere"
        )
    current = result_settings(cfg.proposals, backbone.batch_invariant)
    changed = sorted(k for k in set(current) | set(stored) if current.get(k) != stored.get(k))
    if changed:
        notes.append(
            "the shards were made with other proposal settings than this config "
            f"({', '.join(changed)}); training on them as they are"
        )
    return notes


def check_shard_folder(shards: Path, partial: bool) -> list[str]:
    """Refuse an unfinished proposals folder (a run still writing, missing or failed shards)
    before any work; with ``partial`` (--partial-shards) train on it, returning a note."""
    problems = folder_problems(shards)
    if not problems:
        return []
    if not partial:
        raise UserError(
            f"{shards} is not a finished proposals result: {'; '.join(problems)}; let proposals "
            "finish (or re-run it), or pass --partial-shards to train on the shards there are"
        )
    return [f"training on an unfinished proposals folder (--partial-shards): {problems[0]}"]


def check_pinned_shards(latest: tuple[Path | None, Any], shards: Path, digest: str) -> None:
    """A resume must read the shards the checkpoint learnt from (their digest is pinned in it):
    shards recomputed since, with other settings or images, are refused. ``latest``: the run's
    ``load_latest`` (path, state)."""
    path, state = latest
    pinned = ((state or {}).get("pins") or {}).get("shards_digest")
    if path is not None and pinned is not None and pinned != digest:
        raise UserError(
            f"cannot resume {path}: the shards in {shards} are not the ones it was trained on "
            "(their digest changed: proposals re-ran there); choose another --out"
        )


def shards_folder(cfg: Config, given: str | None = None) -> Path:
    """The proposals folder pre-training reads: ``given`` (--shards), else pretrain.shards, else
    runs/<name>/proposals."""
    return Path(given or cfg.pretrain.shards or f"runs/{cfg.name}/proposals")
