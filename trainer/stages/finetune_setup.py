"""A fine-tuning run's settings and data: the command line written into the finetune section (so
config.toml says what ran), the run's folder name, and the labelled training set (the split,
checked up front, and its dataset)."""

from __future__ import annotations

import dataclasses
import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from pipeline.cli import UserError
from pipeline.inputs.image_files import ImageLimits
from trainer.config import Config
from trainer.data.splits import write_split
from trainer.engine.optim import fit_schedule
from trainer.stages.finetune_init import NO_INIT, default_init


def run_name(frac: float, tag: str = "") -> str:
    """Folder name of a fine-tuning run: finetune-0.05, finetune-0.05-sp, ..."""
    return f"finetune-{frac:g}" + (f"-{tag}" if tag else "")


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


def training_set(cfg: Config, scratch: Path, resume: bool, say: Callable) -> tuple[dict, Any]:
    """(split summary, CocoDataset) of the run's split, chosen into ``scratch`` (the run folder
    is not written yet); on resume the split must be the recorded one. Bad images are skipped
    with one line each."""
    from trainer.data.coco_dataset import CocoDataset
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
