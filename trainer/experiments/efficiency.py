"""Label efficiency: Saliency Prompt, the baseline and a CNN reference against the labelled share.

    python -m trainer efficiency [--fracs 0.025,0.05,0.10,0.20] [--seeds 0,1,2] [--init CKPT]
                                 [--reference maskrcnn] [--iters N] [--out DIR]
    make efficiency ARGS="--reference maskrcnn"

The paper's Figure 1: query-based models fall behind CNN models when few images are labelled, and
Saliency Prompt pre-training closes the gap. For every labelled fraction (default
efficiency.fracs) this runs ``compare`` (trainer/experiments/compare.py) with its protocol
unchanged: the
pre-trained init (row "sp": ``--init``, else finetune.init, else
runs/<name>/pretrain/checkpoints/last.pt), the baseline (``--init none``) and any ``--reference``
kind, each over the fine-tuning seeds (default compare.seeds), all on the same split and budget.
The seeded split is a prefix of one permutation (trainer/data/splits.py), so a larger fraction's
images contain every smaller fraction's. A fraction whose split holds fewer than
:data:`MIN_LABELLED` images is refused before anything trains.

Budget: one ``finetune.iters`` per fraction, the same for every init there. ``--iters N`` gives N
at every fraction; else ``efficiency.iters`` (one per entry of ``efficiency.fracs``; choose them
on the baseline only); else finetune.iters everywhere. A budget other than finetune.iters scales
the warm-up and lr steps of [finetune] and [maskrcnn] by budget / finetune.iters, so the schedule
keeps its shape at every fraction (compare's ``--iters`` only ever shortens it).

Layout: the efficiency folder (default runs/<name>/efficiency) holds one compare folder per
fraction, ``frac-<f>/<row>-seed<s>/`` with compare's own results.json/md and ap_vs_iter.png.
They are not compare's default folders (runs/<name>/compare-<f>): a fraction's budget here may
differ from a compare's at the same fraction, and compare refuses a folder made with other
settings, so sharing them would make each command refuse the other's runs. Reuse follows
compare's rule (same settings and init sha256: reused; unfinished: resumed), and where a run lives
is not a setting, so a compare's finished runs copied into ``frac-<f>/`` are reused, e.g.
``cp -r runs/demo/compare-0.1/*-seed* runs/demo/efficiency/frac-0.1/`` (same budget only).

Writes into the efficiency folder (trainer/experiments/efficiency_report.py): results.json (per
fraction, init and seed: AP, AP50, labelled images, run folder; per fraction and init: mean ± sd;
paired SP - baseline and SP - reference per seed with mean ± sd), results.md (one table: a row per
fraction) and efficiency.png (mask AP against labelled images, log x, sd over seeds as bars).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from pipeline.cli import UserError
from pipeline.inputs.coco_file import load_coco_file
from trainer.config import Config, load_config
from trainer.data.splits import chosen_image_ids
from trainer.engine.optim import scaled_schedule
from trainer.experiments.compare import (
    LABELS,
    REFERENCE_LABELS,
    add_reference_argument,
    comma_list,
    compare,
    parse_references,
    parse_seeds,
    reference_lines,
)
from trainer.experiments.efficiency_report import fraction_entry, print_efficiency, write_efficiency
from trainer.stages.finetune_init import NO_INIT

# Below this a fraction's AP mostly measures which few images were drawn, not label efficiency.
MIN_LABELLED = 10


def parse_fracs(text: str | None, default: Sequence[float]) -> list[float]:
    """ "0.025,0.05" -> [0.025, 0.05] (None -> ``default``): each in (0, 1], increasing."""
    fracs = comma_list(text, default, float, "--fracs must be numbers")
    bad = [f for f in fracs if not 0.0 < f <= 1.0]
    if bad:
        raise UserError(f"--fracs must lie in (0, 1], got {bad[0]:g}")
    if not fracs or any(a >= b for a, b in zip(fracs, fracs[1:])):
        raise UserError(f"--fracs must be increasing without repeats, got {text or fracs}")
    return fracs


def labelled_counts(cfg: Config, fracs: Sequence[float]) -> dict[float, int]:
    """The number of labelled images each fraction's split holds (the split finetune will write),
    computed before any run; UserError for a fraction with fewer than :data:`MIN_LABELLED`."""
    ft = cfg.finetune
    train_json = Path(cfg.data.train_json)
    if not train_json.is_file():
        raise UserError(f"training annotations not found: {train_json}")
    coco = load_coco_file(train_json, allow_outside_root=True).data
    counts = {}
    for frac in fracs:
        ids, _ = chosen_image_ids(
            coco,
            frac=frac,
            seed=ft.split_seed,
            split_file=ft.split_file,
            split_fold=ft.split_fold,
        )
        if len(ids) < MIN_LABELLED:
            raise UserError(
                f"fraction {frac:g} gives {len(ids)} labelled images (of {len(coco['images'])} "
                f"in {train_json}); the label-efficiency curve needs at least {MIN_LABELLED} per "
                "fraction: drop it from --fracs or use a larger one"
            )
        counts[frac] = len(ids)
    return counts


def budgets(cfg: Config, fracs: Sequence[float], iters: int | None) -> dict[float, int]:
    """Fine-tuning iterations per fraction: ``iters``, else efficiency.iters, else
    finetune.iters."""
    if iters is not None:
        if iters < 1:
            raise UserError(f"--iters must be >= 1, got {iters}")
        return {f: iters for f in fracs}
    eff = cfg.efficiency
    if not eff.iters:
        return {f: cfg.finetune.iters for f in fracs}
    out = {}
    for frac in fracs:
        match = [n for f, n in zip(eff.fracs, eff.iters) if math.isclose(f, frac, rel_tol=1e-9)]
        if not match:
            raise UserError(
                f"efficiency.iters has no budget for fraction {frac:g} (efficiency.fracs = "
                f"{eff.fracs}): add it there, or give every fraction one with --iters"
            )
        out[frac] = match[0]
    return out


def budget_config(cfg: Config, iters: int) -> Config:
    """``cfg`` with finetune.iters = ``iters``; for another budget than finetune.iters, the
    warm-up and lr steps of [finetune] and [maskrcnn] (written for finetune.iters) are scaled by
    iters / finetune.iters."""
    if iters == cfg.finetune.iters:
        return cfg
    factor = iters / cfg.finetune.iters
    ft, mr = dataclasses.replace(cfg.finetune), dataclasses.replace(cfg.maskrcnn)
    ft.lr_steps, ft.warmup_iters = scaled_schedule(cfg.finetune, factor, iters)
    mr.lr_steps, mr.warmup_iters = scaled_schedule(cfg.maskrcnn, factor, iters)
    ft.iters = iters
    return dataclasses.replace(cfg, finetune=ft, maskrcnn=mr)


def efficiency(
    cfg: Config,
    *,
    fracs: Sequence[float],
    seeds: Sequence[int],
    init: str | None = None,
    iters: int | None = None,
    out: str | None = None,
    references: Sequence[str] = (),
) -> dict[str, Any]:
    """Run (or reuse) a compare per fraction and write the efficiency report; returns
    write_efficiency's dict (empty on non-zero torch.distributed ranks)."""
    labelled_counts(cfg, fracs)  # refuses a fraction with too few images before any run
    budget = budgets(cfg, fracs, iters)
    folder = Path(out) if out else Path(f"runs/{cfg.name}/efficiency")
    fractions = []
    for frac in fracs:
        result = compare(
            budget_config(cfg, budget[frac]),
            frac=frac,
            pretrained=init,
            out=str(folder / f"frac-{frac:g}"),
            seeds=seeds,
            references=references,
        )
        if not result:
            return {}  # a non-zero rank: it trains along, rank 0 reports
        fractions.append(fraction_entry(frac, budget[frac], result))
    labels = {**LABELS, **{k: REFERENCE_LABELS[k] for k in references}}
    # How the splits were chosen, as the first run recorded it (every fraction chose alike).
    split = json.loads((Path(fractions[0]["runs"][0]["out"]) / "split.json").read_text())["split"]
    ft = cfg.finetune
    settings = {
        "command": "efficiency",
        "config": cfg.name,
        "fracs": list(fracs),
        "iters": {f"{f:g}": budget[f] for f in fracs},
        "seeds": list(seeds),
        "references": list(references),
        "batch_size": ft.batch_size,
        "lr": ft.lr,
        "eval_every": ft.eval_every,
        "split_seed": ft.split_seed,
        "split_method": split["method"],
        "pool_images": split["total_images"],
        "val_json": cfg.data.val_json,
    }
    nested = (
        "; larger fractions hold the smaller ones' images" if split["method"] == "seeded" else ""
    )
    intro = [
        f"Every run: batch {ft.batch_size}, lr {ft.lr:g}, evaluated on {cfg.data.val_json} every "
        f"{ft.eval_every} iterations; fine-tuning seeds {', '.join(map(str, seeds))} "
        f"(finetune.seed). At a fraction every init trains on the same images ({split['method']} "
        f"split of {split['total_images']}, split seed {ft.split_seed}{nested}) for the same "
        f"number of iterations; a budget other than finetune.iters ({ft.iters}) scales the "
        "warm-up and lr steps with it.",
        *reference_lines(cfg, references),
    ]
    return write_efficiency(
        folder,
        title=f"Label efficiency: {cfg.name}",
        intro=intro,
        fractions=fractions,
        labels=labels,
        settings=settings,
    )


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--fracs",
        default=None,
        help="labelled fractions, increasing, e.g. 0.025,0.05,0.10,0.20 (efficiency.fracs)",
    )
    parser.add_argument(
        "--seeds", default=None, help="fine-tuning seeds, e.g. 0,1,2 (default: compare.seeds)"
    )
    parser.add_argument(
        "--init",
        default=None,
        help="pre-training checkpoint of the Saliency Prompt rows (default: finetune.init, "
        "else runs/<name>/pretrain/checkpoints/last.pt)",
    )
    parser.add_argument(
        "--iters",
        type=int,
        default=None,
        help="fine-tuning iterations at every fraction (default: efficiency.iters, one per "
        "fraction, else finetune.iters)",
    )
    parser.add_argument(
        "--out", default=None, help="output folder (default: runs/<name>/efficiency)"
    )
    add_reference_argument(parser)


def run(args: argparse.Namespace) -> int:
    cfg = load_config(args.config, args.overrides)
    if args.init is not None and args.init.lower() == NO_INIT:
        raise UserError("--init needs a checkpoint; the baseline runs are made anyway")
    result = efficiency(
        cfg,
        fracs=parse_fracs(args.fracs, cfg.efficiency.fracs),
        seeds=parse_seeds(args.seeds, cfg.compare.seeds),
        init=args.init,
        iters=args.iters,
        out=args.out,
        references=parse_references(args.reference, cfg),
    )
    if result:
        print_efficiency(result)
    return 0
