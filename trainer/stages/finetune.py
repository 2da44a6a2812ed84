"""Fine-tune K-Net on a labelled fraction of the training images (stage three).

    python -m trainer finetune --frac F [--init CKPT|none] [--out DIR] [--iters N] [--resume]
                               [--split-file FILE] [--split-fold K] [--tag NAME]

Chooses the low-data split (trainer/data/splits.py) and writes it into the run folder, builds a
plain
K-Net with the dataset's classes (no prompts, no kernel supervision), initialises it from a
pre-training checkpoint (default runs/<name>/pretrain/checkpoints/last.pt; every tensor but the
class layers, and says which were skipped) or, with ``--init none``, from the backbone weights
alone with fresh heads (the baseline). Backbone: stem and stages up to finetune.frozen_stages
frozen, BatchNorm statistics frozen, learning rate x finetune.backbone_lr_mult. Trains with the
shared engine, evaluating mask AP on the validation set every finetune.eval_every iterations and
at the end.

Writes runs/<name>/finetune-<frac>[-<tag>]/: config.toml, version.json, split.json (the chosen
images with all their annotations), metrics.jsonl (training and "eval" records), ap_curve.json
(AP vs iteration), metrics.json (final metrics, and the best evaluation labelled as such),
checkpoints/, tensorboard/, loss_curves.png.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import random
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pipeline.atomic_files import write_json, write_text
from pipeline.cli import UserError, record_run
from pipeline.inputs.image_files import ImageLimits
from pipeline.precision import stage_precision
from trainer.config import Config, load_config
from trainer.data.feature_cache import cache_dir, describe, frozen_inputs
from trainer.data.splits import write_split
from trainer.engine.optim import fit_schedule
from trainer.engine.resume import check_resume, refuse_existing
from trainer.stages.evaluate import format_table
from trainer.stages.finetune_eval import make_eval_fn, no_eval, summarise

NO_INIT = "none"


def run_name(frac: float, tag: str = "") -> str:
    """Folder name of a fine-tuning run: finetune-0.05, finetune-0.05-sp, ..."""
    return f"finetune-{frac:g}" + (f"-{tag}" if tag else "")


def default_init(cfg: Config) -> Path:
    """The pre-training run's last checkpoint (pretrain.out, else runs/<name>/pretrain)."""
    return Path(cfg.pretrain.out or f"runs/{cfg.name}/pretrain") / "checkpoints" / "last.pt"


def resolve(
    cfg: Config,
    *,
    frac: float | None = None,
    init: str | None = None,
    out: str | None = None,
    iters: int | None = None,
    split_file: str | None = None,
    split_fold: int | None = None,
    tag: str = "",
) -> Config:
    """A copy of ``cfg`` with the command-line choices written into its finetune section, so the
    recorded config.toml says exactly what the run did (init and out resolved to paths)."""
    cfg = dataclasses.replace(cfg, finetune=dataclasses.replace(cfg.finetune))
    ft = cfg.finetune
    if frac is not None:
        ft.frac = frac
    if not 0.0 < ft.frac <= 1.0:
        raise UserError(f"--frac must be in (0, 1], got {ft.frac}")
    note = fit_schedule(ft, "finetune", iters)
    if note:
        print(note, file=sys.stderr)
    if split_file is not None:
        ft.split_file = split_file
    if split_fold is not None:
        ft.split_fold = split_fold
    if init is not None:
        ft.init = init
    if ft.init.lower() != NO_INIT:
        ft.init = str(Path(ft.init) if ft.init else default_init(cfg))
    else:
        ft.init = NO_INIT
    if out is not None:
        ft.out = out
    elif ft.out:
        ft.out = ft.out + (f"-{tag}" if tag else "")  # two tagged runs must not share a folder
    else:
        ft.out = str(Path(f"runs/{cfg.name}") / run_name(ft.frac, tag))
    return cfg


def load_init(knet: torch.nn.Module, path: str | Path) -> list[str]:
    """Load a pre-trained K-Net into ``knet``: every tensor whose name and shape match.

    Only the model's class layers (its CLASS_LAYER_PREFIXES) may be skipped; anything else missing,
    unexpected or of another shape is a UserError. Returns the sorted skipped names.
    """
    from trainer.engine.checkpoint import load_checkpoint, load_matching, model_state

    state = load_checkpoint(path)
    try:
        return load_matching(
            knet, model_state(state, knet, path), allowed_skips=knet.CLASS_LAYER_PREFIXES
        )
    except UserError as e:
        raise UserError(f"--init {path}: {e}") from None


def init_record(init: str) -> dict[str, str | None]:
    """What a run was initialised from: {"init": path or "none", "sha256": file digest or None}."""
    from pipeline.backbones.weight_files import file_sha256

    if init == NO_INIT:
        return {"init": NO_INIT, "sha256": None}
    if not Path(init).is_file():
        raise UserError(
            f"pre-training checkpoint not found: {init} (run `make pretrain` first, pass "
            "--init CKPT, or --init none for the baseline)"
        )
    return {"init": init, "sha256": file_sha256(init)}


def check_init(out: Path, record: dict[str, str | None]) -> None:
    """Refuse to continue or reuse a run folder initialised from another checkpoint.

    The init checkpoint is a path, and re-running pre-training rewrites the file behind the same
    path; without this check a resumed (or reused, see trainer/experiments/compare.py) fine-tuning
    would mix
    or report weights that came from the old pre-training. The same bytes under another path
    (a copied run folder and its checkpoint) are the same init.
    """
    path = out / "init.json"
    if not path.is_file():
        return
    then = json.loads(path.read_text())
    # The bytes decide, not the path: a checkpoint copied or moved elsewhere is the same init.
    same_bytes = then.get("sha256") is not None and then.get("sha256") == record["sha256"]
    if not same_bytes and then != record:
        what = "a different" if then.get("init") == record["init"] else "another"
        raise UserError(
            f"{out} was initialised from {what} checkpoint ({then.get('init')}, sha256 "
            f"{str(then.get('sha256'))[:12]}; now {record['init']}, "
            f"{str(record['sha256'])[:12]}): delete that folder or choose another --out"
        )


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
    from trainer.engine.schedule import Schedule

    ft = cfg.finetune
    out = Path(ft.out)
    rank, world = dist_info()
    say = print if rank == 0 else (lambda *a, **k: None)
    if resume:
        check_init(out, init)
        # Settings first (frac, split, model, ...): the error then names the setting.
        check_resume("finetune", out, dataclasses.asdict(cfg))
    else:
        refuse_existing(out)
    _seed_everything(ft.seed)
    split, dataset = _training_set(cfg, scratch, resume, say)
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
        check_resume("finetune", out, resolved, knet)

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
        objective,
        loader,
        optimizer,
        scheduler,
        # eval_every <= 0 still evaluates once, at the end: the run's metrics need it.
        Schedule.from_section(
            ft,
            eval_every=ft.eval_every if ft.eval_every > 0 else ft.iters,
            clip_grad=recipe.clip_grad,
        ),
        out_dir=out,
        device=device,
        resume=resume,
        config=resolved,
        eval_fn=eval_fn,
        # The folder's name already says "finetune" in the default layout (finetune-0.05).
        desc=out.name if "finetune" in out.name else f"finetune {out.name}",
        inputs=frozen,
    )
    if rank != 0:
        return {}
    summary = summarise(out, ft.iters, eval_fn, result)
    summary.update(
        init=ft.init,
        init_sha256=init["sha256"],
        skipped=skipped,
        split=split,
        train_images=len(dataset),
        num_classes=dataset.num_classes,
    )
    write_json(out / "metrics.json", summary)
    return summary


def _model(cfg: Config, dataset: Any) -> tuple[Any, list[str], str]:
    """The objective over a fresh backbone, initialised from ``finetune.init`` (skipped keys and a
    note saying what was loaded), with the dataset's categories and the frozen stages set."""
    from pipeline.backbones.build import build_backbone

    objective = _objective(cfg, build_backbone(cfg.backbone), dataset.num_classes)
    knet = objective.knet
    knet.categories = [list(c) for c in dataset.categories]  # saved in every checkpoint
    skipped, init_note = _initialise(cfg, knet)
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


def _training_set(cfg: Config, scratch: Path, resume: bool, say: Callable) -> tuple[dict, Any]:
    """(split summary, CocoDataset) of the run's split, chosen into ``scratch`` (the run folder
    is not written yet); on resume the split must be the recorded one. Bad images are skipped
    with one line each."""
    from trainer.data.datasets import CocoDataset
    from trainer.data.labelled_check import usable_training_ids
    from trainer.data.transforms import Augment

    ft = cfg.finetune
    split = write_split(
        cfg.data.train_json,
        scratch / "split.json",
        frac=ft.frac,
        seed=ft.split_seed,
        split_file=ft.split_file,
        split_fold=ft.split_fold,
    )
    chosen = json.loads((scratch / "split.json").read_text())
    recorded = Path(ft.out) / "split.json"
    if resume and recorded.is_file():
        ids = sorted(int(im["id"]) for im in json.loads(recorded.read_text())["images"])
        if ids != sorted(int(im["id"]) for im in chosen["images"]):
            raise UserError(
                f"{recorded} lists other images than this split ({split['method']}, frac "
                f"{ft.frac:g}): resume with the run's own settings or choose another --out"
            )
    good = usable_training_ids(
        chosen,
        cfg.data.train_images,
        lambda m: say(f"finetune: {m}", file=sys.stderr),
        ImageLimits.from_data(cfg.data),
    )
    augment = Augment(
        ft.short_side,
        ft.max_side,
        flip=ft.flip,
        rotate_deg=ft.rotate_deg,
        rotate_prob=ft.rotate_prob,
        multiscale=tuple(ft.multiscale),
    )
    dataset = CocoDataset(
        scratch / "split.json",
        cfg.data.train_images,
        augment,
        image_ids=good,
        train=True,
        limits=ImageLimits.from_data(cfg.data),
        allow_outside_root=cfg.data.allow_outside_root,
    )
    return split, dataset


def _objective(cfg: Config, backbone: torch.nn.Module, num_classes: int) -> torch.nn.Module:
    from trainer.model.objective import build_objective

    return build_objective(
        backbone, cfg.model, num_classes=num_classes, prompts=False, kernel_supervision=False
    )


def _initialise(cfg: Config, knet: torch.nn.Module) -> tuple[list[str], str]:
    """Load the init checkpoint into ``knet`` (nothing for the baseline): (skipped tensors, a
    line saying what the run starts from)."""
    if cfg.finetune.init == NO_INIT:
        return [], (
            f"baseline: backbone weights only ({cfg.backbone.kind} "
            f"'{cfg.backbone.weights or 'default'}'), fresh heads"
        )
    from pipeline.backbones.backbone import weights_fingerprint

    configured = weights_fingerprint(knet.backbone)
    skipped = load_init(knet, cfg.finetune.init)
    same = weights_fingerprint(knet.backbone) == configured
    return skipped, (
        f"initialised from {cfg.finetune.init}; skipped {len(skipped)} tensors (class layers): "
        f"{', '.join(skipped) or 'none'}; backbone "
        f"{'identical to' if same else 'differs from'} backbone.weights"
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
