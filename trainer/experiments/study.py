"""The paper's ablations as one command, under compare's protocol (trainer/experiments/compare.py).

    python -m trainer study --frac F [--seeds 0,1,2] [--pretrain-seeds 0,1]
                            [--variants full,no_prompts,no_ks,neither,ks_frozen] [--out DIR]
                            [--iters N] [--pretrain-iters N] [--reference maskrcnn]

For every pre-training variant (default compare.variants) and pre-training seed (default
compare.pretrain_seeds, pretrain.seed) pre-trains into the study folder (default
runs/<name>/study-<frac>) as ``pretrain-<variant>-p<seed>/``, then fine-tunes each checkpoint over
the fine-tuning seeds (default compare.seeds) as ``finetune/<variant>-p<p>-seed<s>/``, plus the
baseline (``--init none``, shared by every variant: ``finetune/baseline-seed<s>/``) and any
``--reference`` kind (``finetune/<kind>-seed<s>/``, e.g. the Mask R-CNN reference). Every
fine-tuning uses the same split and budget. Variants (pretrain.* switches):

    full         the paper's Saliency Prompt (prompts + kernel supervision)
    no_prompts   no prompt-kernel matching                (pretrain.prompts = false)
    no_ks        no kernel supervision                    (pretrain.kernel_supervision = false)
    neither      pseudo masks only                        (both false)
    ks_detached  kernel supervision, targets detached     (pretrain.ks_target = "detached")
    ks_frozen    kernel supervision, fixed orthogonal t_l (pretrain.ks_target = "frozen_orthogonal")
    NAME:key=value+key=value   any other pretrain.* settings, e.g. decor:ks_decorrelation=0.1

A finished pre-training (same backbone, model and pretrain settings, pretrain.iters done) or
fine-tuning (compare's rule: same settings and init sha256) is reused, an unfinished one resumed,
so a killed study picks up where it stopped. Writes results.json, results.md (one table: each
variant per pre-training seed and pooled, the baseline, paired differences, convergence; then the
pre-training runs' loss terms and statistics) and ap_vs_iter.png in the study folder.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from pipeline.cli import UserError
from pipeline.config import apply_override, from_dict
from trainer.config import Config, load_config
from trainer.engine.checkpoint import load_checkpoint
from trainer.engine.optim import fit_schedule
from trainer.experiments.compare import (
    REFERENCE_LABELS,
    add_reference_argument,
    check_same_split,
    default_folder,
    intro_lines,
    parse_references,
    parse_seeds,
    print_summary,
    reference_config,
    reference_lines,
    settings_record,
)
from trainer.experiments.pretrain_record import pretrain_summary, pretrain_table
from trainer.experiments.results import write_report
from trainer.experiments.runs import drop_keys, run_config, run_or_reuse, run_record
from trainer.stages.finetune_init import NO_INIT

VARIANTS: dict[str, tuple[str, dict[str, Any]]] = {
    "full": ("full Saliency Prompt", {}),
    "no_prompts": ("no prompt-kernel matching", {"prompts": False}),
    "no_ks": ("no kernel supervision", {"kernel_supervision": False}),
    "neither": ("neither (pseudo masks only)", {"prompts": False, "kernel_supervision": False}),
    "ks_detached": ("kernel supervision, detached targets", {"ks_target": "detached"}),
    "ks_frozen": (
        "kernel supervision, frozen orthogonal targets",
        {"ks_target": "frozen_orthogonal"},
    ),
}
BASELINE = "baseline"
# Sections whose settings a pre-training run depends on (fine-tuning settings may change freely).
PRETRAIN_SECTIONS = ("backbone", "model", "pretrain")


def parse_variants(names: Sequence[str]) -> dict[str, tuple[str, list[str]]]:
    """Variant names -> {name: (label, ["pretrain.key=value", ...])}; NAME:k=v+k=v is custom."""
    out: dict[str, tuple[str, list[str]]] = {}
    for name in names:
        name = name.strip()
        if ":" in name:
            name, spec = name.split(":", 1)
            sets = [f"pretrain.{a.strip()}" for a in spec.split("+") if a.strip()]
            label = f"{name} ({', '.join(s.removeprefix('pretrain.') for s in sets)})"
        elif name in VARIANTS:
            label, changes = VARIANTS[name]
            sets = [f"pretrain.{k}={_toml(v)}" for k, v in changes.items()]
        else:
            raise UserError(
                f"unknown study variant '{name}' (known: {', '.join(VARIANTS)}; or "
                "NAME:key=value+key=value for other pretrain.* settings)"
            )
        if not name or name == BASELINE or name in out:
            raise UserError(f"study variant names must be unique and not '{BASELINE}': '{name}'")
        out[name] = (label, sets)
    if not out:
        raise UserError("the study needs at least one variant")
    return out


def _toml(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    return f'"{value}"' if isinstance(value, str) else str(value)


def variant_config(cfg: Config, sets: Sequence[str], *, seed: int, out: Path) -> Config:
    """``cfg`` with a variant's pretrain.* assignments, this pre-training seed and folder
    (type-checked like ``--set``)."""
    raw = copy.deepcopy(dataclasses.asdict(cfg))
    for assignment in sets:
        apply_override(raw, assignment)
    vcfg = from_dict(Config, raw)
    vcfg.pretrain.seed, vcfg.pretrain.out = seed, str(out)
    return vcfg


def _check_pretrain_settings(cfg: Config, out: Path) -> None:
    """Refuse to reuse a pre-training folder made with other backbone, model or pretrain
    settings (``iters`` aside: a longer run may extend a shorter one)."""
    from trainer.engine.run_state import config_changes

    recorded = out / "config.toml"
    if not recorded.is_file():
        return
    then = dataclasses.asdict(load_config(recorded))
    now = dataclasses.asdict(cfg)
    # Where the run lives is not a setting: a finished pre-training copied into the study folder
    # (e.g. the compare's runs/<name>/pretrain) is the same run. Its shards are: other proposals
    # are other training data.
    drop_keys(then, ["pretrain.out"])
    drop_keys(now, ["pretrain.out"])
    changed = [
        c
        for section in PRETRAIN_SECTIONS
        for c in config_changes(then[section], now[section], f"{section}.")
    ]
    if changed:
        raise UserError(
            f"{out} was pre-trained with other settings ({', '.join(changed[:3])}): delete it "
            "or choose another --out"
        )


def pretrain_or_reuse(cfg: Config) -> Path:
    """The last checkpoint of the pre-training ``cfg`` describes (pretrain.out), trained,
    resumed or reused."""
    from trainer.engine.run_state import latest_checkpoint
    from trainer.stages.pretrain import run_pretrain
    from trainer.stages.pretrain_shards import shards_folder

    p = cfg.pretrain
    out = Path(p.out)
    p.shards = str(shards_folder(cfg))
    _check_pretrain_settings(cfg, out)
    last = latest_checkpoint(out)
    if last is not None and int(load_checkpoint(last).get("iteration", -1)) == p.iters:
        print(f"study: reusing the finished pre-training {out}", file=sys.stderr)
    else:
        run_pretrain(cfg, shards=Path(p.shards), out=out, resume=True)
    return out / "checkpoints" / "last.pt"


class _StudyRuns:
    """The study's fine-tuning rows as they finish: per row its run records and label, and per
    pre-training its summary. ``main`` turns False on a non-zero distributed rank."""

    def __init__(self, folder: Path, frac: float | None, iters: int | None) -> None:
        self.folder, self.frac, self.iters = folder, frac, iters
        self.rows: dict[str, list[dict[str, Any]]] = {}
        self.labels: dict[str, str] = {}
        self.pretraining: dict[str, dict[str, Any]] = {}
        self.main = True

    def fine_tune(self, cfg: Config, row: str, name: str, seed: int, pseed: int | None, init: str):
        run_cfg = run_config(
            cfg, frac=self.frac, init=init, iters=self.iters,
            out=self.folder / "finetune" / f"{name}-seed{seed}", seed=seed,
        )  # fmt: skip
        summary = run_or_reuse(run_cfg)
        if not summary:
            self.main = False  # a non-zero rank: it trains along, rank 0 reports
            return run_cfg
        self.rows.setdefault(row, []).append(run_record(run_cfg, summary, row, pseed))
        return run_cfg

    def variant(self, cfg: Config, name: str, label: str, sets, pseeds, seeds) -> None:
        """Pre-train variant ``name`` once per pre-training seed, fine-tune each over the seeds;
        with several pre-training seeds also a row pooled over them."""
        for p in pseeds:
            vcfg = variant_config(cfg, sets, seed=p, out=self.folder / f"pretrain-{name}-p{p}")
            ckpt = pretrain_or_reuse(vcfg)
            self.pretraining[f"{name}-p{p}"] = pretrain_summary(Path(vcfg.pretrain.out), ckpt)
            row = name if len(pseeds) == 1 else f"{name}@p{p}"
            self.labels[row] = label if len(pseeds) == 1 else f"{label}, pre-training seed {p}"
            for s in seeds:
                self.fine_tune(vcfg, row, f"{name}-p{p}", s, p, str(ckpt))
        if len(pseeds) > 1 and self.main:
            self.rows[name] = [r for p in pseeds for r in self.rows[f"{name}@p{p}"]]
            self.labels[name] = f"{label}, pooled over pre-training seeds"

    def baselines(self, cfg: Config, seeds, references: Sequence[str]) -> Config:
        """The baseline and each reference kind over the seeds; returns a baseline run's config."""
        for s in seeds:
            base_cfg = self.fine_tune(cfg, BASELINE, BASELINE, s, None, NO_INIT)
            for kind in references:
                self.fine_tune(reference_config(cfg, kind), kind, kind, s, None, NO_INIT)
        self.labels[BASELINE] = "baseline (backbone only)"
        self.labels.update({k: REFERENCE_LABELS[k] for k in references})
        return base_cfg


def study(
    cfg: Config,
    *,
    frac: float | None = None,
    seeds: Sequence[int] | None = None,
    pretrain_seeds: Sequence[int] | None = None,
    variants: Sequence[str] | None = None,
    iters: int | None = None,
    pretrain_iters: int | None = None,
    out: str | None = None,
    references: Sequence[str] = (),
) -> dict[str, Any]:
    """Pre-train every variant, fine-tune every checkpoint, the baseline and each reference kind
    (compare's ``references``) over the seeds, write the report; returns write_report's dict
    (empty on non-zero distributed ranks)."""
    seeds = list(cfg.compare.seeds if seeds is None else seeds)
    pseeds = list(cfg.compare.pretrain_seeds if pretrain_seeds is None else pretrain_seeds)
    chosen = parse_variants(cfg.compare.variants if variants is None else variants)
    if pretrain_iters is not None:
        cfg = dataclasses.replace(cfg, pretrain=dataclasses.replace(cfg.pretrain))
        note = fit_schedule(cfg.pretrain, "pretrain", pretrain_iters)
        if note:
            print(note, file=sys.stderr)
    folder = Path(out) if out else default_folder(cfg, frac, "study")
    runs = _StudyRuns(folder, frac, iters)
    for name, (label, sets) in chosen.items():
        runs.variant(cfg, name, label, sets, pseeds, seeds)
    base_cfg = runs.baselines(cfg, seeds, references)
    if not runs.main:
        return {}
    split = check_same_split([r for rows in runs.rows.values() for r in rows])
    settings = settings_record(
        base_cfg,
        split,
        seeds,
        command="study",
        pretrain_seeds=pseeds,
        pretrain_iters=cfg.pretrain.iters,
        variants={name: sets for name, (_, sets) in chosen.items()},
        references=list(references),
        pretraining=runs.pretraining,
    )
    return write_report(
        folder,
        title=f"Saliency Prompt ablations: {cfg.name}, {base_cfg.finetune.frac:g} of the images",
        intro=[
            *intro_lines(settings),
            "",
            f"Pre-training: {cfg.pretrain.iters} iterations per variant, pre-training seeds "
            f"{', '.join(map(str, pseeds))} (pretrain.seed).",
            *reference_lines(cfg, references),
        ],
        rows=runs.rows,
        labels=runs.labels,
        baseline=BASELINE,
        settings=settings,
        plot_rows=[k for k in runs.rows if len(pseeds) == 1 or "@p" not in k],
        extra=[
            "Pre-training runs (train records of metrics.jsonl, first and last):",
            "",
            pretrain_table(runs.pretraining),
            "",
        ],
    )


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--frac", type=float, default=None, help="fraction (finetune.frac)")
    parser.add_argument("--seeds", default=None, help="fine-tuning seeds (compare.seeds)")
    parser.add_argument(
        "--pretrain-seeds", default=None, help="pre-training seeds (compare.pretrain_seeds)"
    )
    parser.add_argument(
        "--variants",
        default=None,
        help="comma-separated pre-training variants (compare.variants; known: "
        f"{', '.join(VARIANTS)}; or NAME:key=value+key=value)",
    )
    parser.add_argument("--iters", type=int, default=None, help="fine-tuning iterations")
    parser.add_argument("--pretrain-iters", type=int, default=None, help="pre-training iterations")
    parser.add_argument(
        "--out", default=None, help="study folder (default runs/<name>/study-<frac>)"
    )
    add_reference_argument(parser)


def run(args: argparse.Namespace) -> int:
    cfg = load_config(args.config, args.overrides)
    if args.pretrain_iters is not None and args.pretrain_iters < 1:
        raise UserError(f"--pretrain-iters must be >= 1, got {args.pretrain_iters}")
    result = study(
        cfg,
        frac=args.frac,
        seeds=parse_seeds(args.seeds, cfg.compare.seeds),
        pretrain_seeds=parse_seeds(args.pretrain_seeds, cfg.compare.pretrain_seeds),
        variants=args.variants.split(",") if args.variants else None,
        iters=args.iters,
        pretrain_iters=args.pretrain_iters,
        out=args.out,
        references=parse_references(args.reference, cfg),
    )
    if result:
        print_summary(result, result["labels"], "study")
    return 0
