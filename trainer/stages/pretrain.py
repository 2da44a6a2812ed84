"""Pre-train K-Net on saliency proposals with prompts and kernel supervision (stage two).

    python -m trainer pretrain [--shards DIR] [--out DIR] [--iters N] [--resume]

Reads the proposal shards (default runs/<name>/proposals), builds the frozen backbone and the
class-agnostic K-Net objective (docs/method.md stage two), and trains it with the shared engine.
Writes runs/<name>/pretrain/{config.toml, metrics.jsonl, tensorboard/, checkpoints/,
loss_curves.png}. With --resume it continues exactly from checkpoints/last.pt.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import os
import random
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pipeline.backbones.build import build_backbone
from pipeline.cli import UserError, record_run
from pipeline.inputs.image_files import ImageLimits
from pipeline.precision import stage_precision
from pipeline.run_folder import claim_run_folder
from pipeline.shards.folder import shards_digest
from pipeline.shards.schema import list_shards
from trainer.config import Config, load_config
from trainer.data.feature_cache import cache_dir, describe, frozen_inputs
from trainer.data.loader import build_loader
from trainer.data.shard_dataset import PseudoMaskSelection, ShardDataset
from trainer.data.transforms import Augment
from trainer.engine.checkpoint import load_latest
from trainer.engine.distributed import dist_info, init_distributed, shutdown_distributed
from trainer.engine.loop import train
from trainer.engine.optim import fit_schedule, optimizer_from_section
from trainer.engine.resume import check_resume
from trainer.engine.run_state import latest_checkpoint
from trainer.engine.schedule import Schedule
from trainer.stages.pretext import Pretext, eval_sides, held_out
from trainer.stages.pretrain_init import check_pinned_init, init_pins, start_from
from trainer.stages.pretrain_shards import (
    check_pinned_shards,
    check_shard_folder,
    check_shards,
    shards_folder,
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--shards",
        default=None,
        help="proposals folder (default: pretrain.shards, else runs/<name>/proposals)",
    )
    parser.add_argument(
        "--out",
        default=None,
        help="output folder (default: pretrain.out, else runs/<name>/pretrain)",
    )
    parser.add_argument("--iters", type=int, default=None, help="total iterations (pretrain.iters)")
    parser.add_argument(
        "--resume", action="store_true", help="continue from OUT/checkpoints/last.pt when it exists"
    )
    parser.add_argument(
        "--partial-shards",
        action="store_true",
        help="train on the shards there are in an unfinished proposals folder "
        "(recorded as pretrain.partial_shards)",
    )
    parser.add_argument(
        "--image-root",
        default=None,
        help="image folder the shards' file names are relative to "
        "(default: the one recorded in the proposals folder)",
    )


@dataclass
class Pretraining:
    """Everything stage two trains with, built from a config (the command and bench/train.py)."""

    dataset: Any  # ShardDataset, wrapped by the feature cache when it is on
    heldout: Any  # ShardDataset of the held-out images (resize only), or None
    # (trainer/stages/pretext.py)
    objective: Any
    loader: Any
    optimizer: torch.optim.Optimizer
    scheduler: Any
    frozen: (
        Any  # trainer.data.frozen_features.FrozenFeatures, or None when the model runs its backbone
    )
    store: Any  # trainer.data.feature_cache.FeatureStore, or None when the cache is off
    notes: list[str]


def build_pretraining(
    cfg: Config, shards: Path, image_root: str | None, device: torch.device
) -> Pretraining:
    """Seed, then build the shard dataset, the class-agnostic objective with prompts and kernel
    supervision as switched, the frozen-feature source, the loader and the optimiser."""
    from trainer.model.objective import build_objective

    p = cfg.pretrain
    random.seed(p.seed)
    np.random.seed(p.seed)  # noqa: NPY002 (seeds any library code using the global one)
    torch.manual_seed(p.seed)

    augment = Augment(p.short_side, p.max_side, flip=p.flip)
    limits = ImageLimits.from_data(cfg.data)
    selection = PseudoMaskSelection(p.pseudo_min_score, p.pseudo_max_masks, p.pseudo_min_area)

    def in_holdout(name: str) -> bool:
        return held_out(name, p.holdout, p.holdout_seed)

    dataset = ShardDataset(
        shards,
        augment,
        image_root,
        limits,
        keep_image=lambda name: not in_holdout(name),
        selection=selection,
    )
    heldout = None
    if p.holdout > 0:
        resize_only = Augment(*eval_sides(cfg))  # the pretext evaluation's size
        try:
            heldout = ShardDataset(
                shards, resize_only, image_root, limits, keep_image=in_holdout, selection=selection
            )
        except UserError:  # no held-out image has a pseudo mask (a tiny pool): no fit to score
            heldout = None
    backbone = build_backbone(cfg.backbone)
    notes = check_shards(dataset, backbone, cfg)
    try:
        objective = build_objective(
            backbone,
            cfg.model,
            num_classes=1,
            prompts=p.prompts,
            kernel_supervision=p.kernel_supervision,
            prompt_slots=p.prompt_slots,
            prompt_keep=p.prompt_keep,
            ks_target=p.ks_target,
            ks_decorrelation=p.ks_decorrelation,
            drop_loss_iou=p.drop_loss_iou,
        )
    except ValueError as e:  # a bad prompt or kernel-supervision setting: one line, not a trace
        raise UserError(f"pretrain: {e}") from None
    (dataset,), frozen, store = frozen_inputs(
        objective.knet.backbone,
        enabled=p.feature_cache,
        cache_dir=cache_dir(cfg, p),
        stage="pretrain",
        datasets=[dataset],
        precision=stage_precision(p, device, "pretrain"),
    )
    loader = build_loader(
        dataset,
        p.batch_size,
        size_divisor=objective.knet.size_divisor,
        device=device,
        num_workers=p.num_workers,
        seed=p.seed,
        setting="pretrain.batch_size",
    )
    optimizer, scheduler = optimizer_from_section(objective, p)
    return Pretraining(
        dataset, heldout, objective, loader, optimizer, scheduler, frozen, store, notes
    )


def run_pretrain(
    cfg: Config,
    *,
    shards: Path,
    out: Path,
    resume: bool,
    image_root: str | None = None,
    argv: list[str] | None = None,
) -> dict[str, Any]:
    """Stage two end to end, holding ``out`` exclusively for the run (rank 0 only: the other
    torchrun ranks write nothing there); returns the engine's summary."""
    from trainer.model.factory import QUERY_KINDS

    if cfg.model.kind not in QUERY_KINDS:
        raise UserError(
            f"pretrain: Saliency Prompt pre-trains query-based models ({', '.join(QUERY_KINDS)}), "
            f"not model.kind = '{cfg.model.kind}' (fine-tune it from the backbone: finetune "
            "--init none)"
        )
    rank = int(os.environ.get("RANK", "0"))  # torchrun's; the process group is not up yet
    claim = claim_run_folder(out, "pretrain") if rank == 0 else contextlib.nullcontext()
    with claim:
        return _pretrain(
            cfg, shards=shards, out=out, resume=resume, image_root=image_root, argv=argv
        )


def _pretrain(
    cfg: Config,
    *,
    shards: Path,
    out: Path,
    resume: bool,
    image_root: str | None = None,
    argv: list[str] | None = None,
) -> dict[str, Any]:
    p = cfg.pretrain
    if not resume and latest_checkpoint(out) is not None:
        # Refused before anything is written, so the earlier run's config.toml stays its own.
        raise UserError(
            f"{out} already holds checkpoints: pass --resume to continue that run, "
            "or choose another --out"
        )
    partial = check_shard_folder(shards, p.partial_shards)
    init = init_pins(p.init)  # a missing init is refused before anything is built
    device = init_distributed()
    rank, world = dist_info()
    built = build_pretraining(cfg, shards, image_root, device)
    dataset, objective, store = built.dataset, built.objective, built.store
    built.notes += partial
    resolved = dataclasses.asdict(cfg)
    pins = {"shards_digest": shards_digest(list_shards(shards)), **init}
    if resume:  # checked before record_run, so a refused resume leaves the run's records alone
        latest = load_latest(out)  # read once for the three checks
        check_resume("pretrain", out, resolved, objective.knet, latest)
        check_pinned_shards(latest, shards, pins["shards_digest"])
        check_pinned_init(latest, pins)
    if p.init and latest_checkpoint(out) is None:  # a resume's own checkpoint holds the weights
        start_from(objective, p.init)
        built.notes.append(f"initialised from {p.init} (sha256 {pins['init_sha256'][:12]})")
    if rank == 0:
        record_run(out, resolved, argv)
        skipped = ", ".join(
            f"{n} with status {s}" for s, n in sorted(dataset.skipped.items(), key=str)
        )
        print(
            f"pretrain: {len(dataset)} images from {len(dataset.metas)} shards in {shards}, "
            f"pixels from {dataset.image_root}"
            f"{' (skipped ' + skipped + ')' if skipped else ''}; batch {p.batch_size} x "
            f"{world} process(es) on {device}; {p.iters} iterations -> {out}",
            file=sys.stderr,
        )
        for note in built.notes:
            print(f"pretrain: note: {note}", file=sys.stderr)
        print(f"pretrain: {describe(store)}", file=sys.stderr)
    pretext = Pretext.start(cfg, built, device, out, rank)
    try:
        result = train(
            objective,
            built.loader,
            built.optimizer,
            built.scheduler,
            Schedule.from_section(p),
            out_dir=out,
            device=device,
            resume=resume,
            config=resolved,
            desc="pretrain",
            inputs=built.frozen,
            pins=pins,
            eval_fn=pretext.eval_fn,
        )
    except BaseException:
        shutdown_distributed(barrier=False)
        raise
    shutdown_distributed()
    if rank == 0:
        result["pretext"] = pretext.finish(result)
    return {**result, "rank": rank}


def run(args: argparse.Namespace) -> int:
    cfg = load_config(args.config, args.overrides)
    p = cfg.pretrain
    note = fit_schedule(p, "pretrain", args.iters)
    if note:
        print(note, file=sys.stderr)
    shards = shards_folder(cfg, args.shards)
    out = Path(args.out or p.out or f"runs/{cfg.name}/pretrain")
    p.shards, p.out = str(shards), str(out)
    p.partial_shards = p.partial_shards or args.partial_shards
    result = run_pretrain(
        cfg, shards=shards, out=out, resume=args.resume, image_root=args.image_root
    )
    if result["rank"] == 0 and not result["trained"]:
        print(f"pretrain: already complete ({result['iteration']} iterations) in {out}")
    elif result["rank"] == 0:
        record = result["last_record"]
        losses = f"; final loss {record['loss']:.4f}" if "loss" in record else ""
        print(
            f"pretrain: {result['iteration']} iterations in {result['seconds']:.1f} s{losses}; "
            f"data-wait share {100 * result['data_wait_share']:.1f}% of step time; "
            f"checkpoint {result['last_checkpoint']}"
        )
    return 0
