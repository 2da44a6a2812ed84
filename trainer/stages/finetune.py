"""Fine-tune K-Net on a labelled fraction of the training images (stage three).

    python -m trainer finetune --frac F [--init CKPT|none] [--out DIR] [--iters N] [--resume]
                               [--split-file FILE] [--split-fold K] [--tag NAME]

Chooses the low-data split (trainer/data/splits.py) and writes it into the run folder, builds a
plain K-Net with the dataset's classes (no prompts, no kernel supervision), initialises it from a
pre-training checkpoint (default runs/<name>/pretrain/checkpoints/last.pt; every tensor but the
class layers, and says which were skipped) or, with ``--init none``, from the backbone weights alone
with fresh heads (the baseline). Backbone: stem and stages up to finetune.frozen_stages frozen,
BatchNorm statistics frozen, learning rate x finetune.backbone_lr_mult. Trains with the shared
engine, evaluating mask AP on the validation set every finetune.eval_every iterations and at the
end.

Writes runs/<name>/finetune-<frac>[-<tag>]/: config.toml, version.json, split.json (the chosen
images with all their annotations), metrics.jsonl (training and "eval" records), ap_curve.json
(AP vs iteration), metrics.json (final metrics, and the best evaluation labelled as such),
checkpoints/, tensorboard/, loss_curves.png.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import random
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pipeline.atomic_files import write_json, write_text
from pipeline.cli import record_run
from pipeline.precision import stage_precision
from trainer.config import Config, load_config
from trainer.data.feature_cache import cache_dir, describe, frozen_inputs
from trainer.engine.checkpoint import load_latest
from trainer.engine.resume import check_resume, refuse_existing
from trainer.stages.coco_metrics import format_table
from trainer.stages.finetune_eval import make_eval_fn, no_eval, summarise
from trainer.stages.finetune_init import check_init, init_record, initialise
from trainer.stages.finetune_setup import resolve, training_set


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)  # noqa: NPY002 (seeds any library code using the global one)
    torch.manual_seed(seed)


def finetune(cfg: Config, *, resume: bool = False, argv: list[str] | None = None) -> dict[str, Any]:
    """Stage three end to end with the choices already in ``cfg`` (see :func:`resolve`).

    Everything is checked before anything is written into the run folder (held exclusively for
    the run): the folder's state, the init checkpoint's identity and fit, the resumed checkpoint
    and the settings that must not change on resume, the split's and validation set's files.
    Returns the content of metrics.json: {"final": {metrics, "iteration"}, "best": {metrics,
    "iteration"}, "iterations", "train_seconds", "init", "skipped", "split", ...}.
    """
    from pipeline.run_folder import claim_run_folder
    from trainer.engine.distributed import dist_info, init_distributed, shutdown_distributed

    out = Path(cfg.finetune.out)
    init = init_record(cfg.finetune.init)
    device = init_distributed()
    try:
        rank, _ = dist_info()
        # Rank 0 holds the folder; the other ranks write nothing into it.
        claim = claim_run_folder(out, "finetune") if rank == 0 else contextlib.nullcontext()
        with claim, tempfile.TemporaryDirectory(prefix="finetune-split-") as scratch:
            return _finetune(cfg, init, device, resume, argv, Path(scratch))
    finally:
        shutdown_distributed()


def _finetune(
    cfg: Config,
    init: dict[str, str | None],
    device: torch.device,
    resume: bool,
    argv: list[str] | None,
    scratch: Path,
) -> dict[str, Any]:
    from trainer.data.loader import build_loader
    from trainer.engine.distributed import dist_info
    from trainer.engine.loop import train
    from trainer.engine.optim import optimizer_from_section

    ft = cfg.finetune
    out = Path(ft.out)
    rank, world = dist_info()
    say = print if rank == 0 else (lambda *a, **k: None)
    latest = None
    if resume:
        check_init(out, init)
        latest = load_latest(out)  # read once for both checks below
        # Settings first (frac, split, model, ...): the error then names the setting.
        check_resume("finetune", out, dataclasses.asdict(cfg), latest=latest)
    else:
        refuse_existing(out)
    _seed_everything(ft.seed)
    split, dataset = training_set(cfg, scratch, resume, say)
    objective, skipped, init_note = _model(cfg, dataset)
    knet = objective.knet
    (dataset,), frozen, store = frozen_inputs(
        knet.backbone,
        enabled=ft.feature_cache,
        cache_dir=cache_dir(cfg, ft),
        stage="finetune",
        datasets=[dataset],
        rotate_prob=ft.rotate_prob,
        rotate_deg=ft.rotate_deg,
        precision=stage_precision(ft, device, "finetune"),
    )
    resolved = dataclasses.asdict(cfg)
    if resume:
        check_resume("finetune", out, resolved, knet, latest)
        del latest  # the engine loads what it resumes; no second copy of the weights in memory

    loader = build_loader(
        dataset,
        ft.batch_size,
        size_divisor=knet.size_divisor,
        device=device,
        num_workers=ft.num_workers,
        seed=ft.seed,
        setting="finetune.batch_size",
    )
    recipe = optimiser_section(cfg)
    optimizer, scheduler = optimizer_from_section(objective, recipe)
    # The engine evaluates on rank 0 only, but every rank must take the same path through it.
    eval_fn = (
        make_eval_fn(cfg, knet, dataset.cat_ids, device, frozen, store) if rank == 0 else no_eval
    )

    # Everything is checked: only now may the folder's records change.
    if rank == 0:
        write_text(out / "split.json", (scratch / "split.json").read_text())
        record_run(out, resolved, argv)
        write_json(out / "init.json", init)
        _announce(cfg, split, dataset, world, device, [init_note, describe(store)])
    result = train(
        objective, loader, optimizer, scheduler, _schedule(ft, recipe.clip_grad),
        out_dir=out, device=device, resume=resume, config=resolved, eval_fn=eval_fn,
        # The folder's name already says "finetune" in the default layout (finetune-0.05).
        desc=out.name if "finetune" in out.name else f"finetune {out.name}",
        inputs=frozen,
    )  # fmt: skip
    if rank != 0:
        return {}
    summary = summarise(out, ft.iters, eval_fn, result)
    summary.update(init=ft.init, init_sha256=init["sha256"], skipped=skipped, split=split)
    summary.update(train_images=len(dataset), num_classes=dataset.num_classes)
    write_json(out / "metrics.json", summary)
    return summary


def _schedule(ft: Any, clip_grad: float) -> Any:
    """The engine's schedule from the finetune section; eval_every <= 0 still evaluates once, at
    the end: the run's metrics need it."""
    from trainer.engine.schedule import Schedule

    every = ft.eval_every if ft.eval_every > 0 else ft.iters
    return Schedule.from_section(ft, eval_every=every, clip_grad=clip_grad)


def _model(cfg: Config, dataset: Any) -> tuple[Any, list[str], str]:
    """The objective over a fresh backbone, initialised from ``finetune.init`` (skipped keys and a
    note saying what was loaded), with the dataset's categories and the frozen stages set."""
    from pipeline.backbones.build import build_backbone

    objective = _objective(cfg, build_backbone(cfg.backbone), dataset.num_classes)
    knet = objective.knet
    knet.categories = [list(c) for c in dataset.categories]  # saved in every checkpoint
    skipped, init_note = initialise(cfg, knet)
    knet.backbone.freeze(cfg.finetune.frozen_stages)
    return objective, skipped, init_note


def _announce(cfg: Config, split, dataset, world: int, device, notes: list[str]) -> None:
    """The run's first lines on stderr: which images, how many, where it goes, and ``notes``."""
    ft = cfg.finetune
    print(
        f"finetune: {split['num_images']} of the {split['total_images']} images of "
        f"{cfg.data.train_json} ({split['method']}; frac {ft.frac:g} = --frac or "
        f"finetune.frac, 1.0 for all), {len(dataset)} with objects, "
        f"{dataset.num_classes} classes; batch {ft.batch_size} x {world} process(es) on "
        f"{device}; {ft.iters} iterations -> {Path(ft.out)}",
        file=sys.stderr,
    )
    for note in notes:
        print(f"finetune: {note}", file=sys.stderr)


def optimiser_section(cfg: Config) -> Any:
    """Where fine-tuning's optimiser, lr schedule and clipping come from: [maskrcnn] for the Mask
    R-CNN reference (its own recipe, torchvision's), else [finetune]. The budget is finetune's."""
    return cfg.maskrcnn if cfg.model.kind == "maskrcnn" else cfg.finetune


def _objective(cfg: Config, backbone: torch.nn.Module, num_classes: int) -> torch.nn.Module:
    from trainer.model.objective import build_objective

    return build_objective(
        backbone, cfg.model, num_classes=num_classes, prompts=False, kernel_supervision=False
    )


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--frac",
        type=float,
        default=None,
        help="fraction of the training images (default: finetune.frac)",
    )
    parser.add_argument(
        "--init",
        default=None,
        help="pre-training checkpoint, or 'none' for the backbone-only baseline "
        "(default: finetune.init, else runs/<name>/pretrain/checkpoints/"
        "last.pt)",
    )
    parser.add_argument(
        "--out", default=None, help="output folder (default: runs/<name>/finetune-<frac>[-<tag>])"
    )
    parser.add_argument("--iters", type=int, default=None, help="total iterations (finetune.iters)")
    parser.add_argument(
        "--resume", action="store_true", help="continue from OUT/checkpoints/last.pt when it exists"
    )
    parser.add_argument(
        "--split-file",
        default=None,
        help="Unbiased-Teacher COCO_supervision.txt (overrides the seeded split)",
    )
    parser.add_argument(
        "--split-fold",
        type=int,
        default=None,
        help="fold of --split-file (finetune.split_fold; the paper used 1)",
    )
    parser.add_argument("--tag", default="", help="suffix of the default output folder name")


def run(args: argparse.Namespace) -> int:
    cfg = resolve(
        load_config(args.config, args.overrides),
        frac=args.frac,
        init=args.init,
        out=args.out,
        iters=args.iters,
        split_file=args.split_file,
        split_fold=args.split_fold,
        tag=args.tag,
    )
    summary = finetune(cfg, resume=args.resume)
    if summary:
        out = Path(cfg.finetune.out)
        best = summary["best"]
        print(
            format_table(
                {
                    f"{out.name} (final)": summary["final"],
                    f"{out.name} (best, iter {best['iteration']})": best,
                }
            )
        )
        print(
            f"finetune: {summary['iterations']} iterations, {summary['train_seconds']:.1f} s "
            f"training + evaluation; metrics {out / 'metrics.json'}, curve "
            f"{out / 'ap_curve.json'}"
        )
    return 0
