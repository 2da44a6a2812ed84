"""Saliency Prompt vs baseline over fine-tuning seeds: the same split and budget for every run.

    python -m trainer compare --frac F [--pretrained CKPT] [--seeds 0,1,2] [--iters N] [--out DIR]
                              [--reference maskrcnn]

For every seed (default compare.seeds) runs ``finetune`` twice with the same config, budget and
split (the split is fixed by finetune.split_seed; the seed is finetune.seed, which changes the
fresh heads' initialisation and the batch order only): once initialised from the pre-training
checkpoint (row "sp", default finetune.init, else runs/<name>/pretrain/checkpoints/last.pt) and
once from the backbone weights alone with fresh heads (row "baseline", ``--init none``). Runs live
under the compare's folder (default runs/<name>/compare-<frac>) as ``<row>-seed<k>/``.
``--reference KIND`` adds a row per model kind fine-tuned from the backbone alone under the same
protocol (``<kind>-seed<k>/``): the paper's Figure 1 puts K-Net beside Mask R-CNN.

A run that already finished with the same settings and the same init checkpoint (by sha256) is
reused; an unfinished one is resumed; one made with other settings or from another checkpoint is
an error. Then writes, in that folder (trainer/experiments/results.py): results.json (settings,
every run's
final and per-evaluation metrics, seed, init sha256, and the summary), results.md (mean ± sd per
row, paired differences per seed, the iteration at which SP first reaches the baseline's final AP)
and ap_vs_iter.png (every seed's curve and each row's mean).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from pipeline.cli import UserError
from trainer.config import Config, load_config
from trainer.experiments.results import write_report
from trainer.experiments.runs import run_config, run_or_reuse, run_record
from trainer.stages.finetune_init import NO_INIT

LABELS = {"sp": "Saliency Prompt (pre-trained model)", "baseline": "baseline (backbone only)"}
# Reference rows (``--reference KIND``): another model kind fine-tuned from the backbone alone
# under the same protocol (split, seeds, budget, evaluation), e.g. the paper's Figure 1 Mask R-CNN.
REFERENCE_LABELS = {
    "maskrcnn": "Mask R-CNN reference (backbone only, [maskrcnn] recipe)",
    "mask2former": "Mask2Former reference (backbone only)",
    "knet": "K-Net reference (backbone only)",
    "queryinst": "QueryInst reference (backbone only)",
}


def comma_list(
    text: str | None, default: Sequence[Any], convert: Callable[[str], Any], what: str
) -> list[Any]:
    """ "a,b" -> [convert("a"), convert("b")] (None -> ``default`` converted); a value that does
    not convert is a UserError starting with ``what`` ("seeds must be integers")."""
    if text is None:
        return [convert(v) for v in default]
    try:
        return [convert(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise UserError(f"{what} separated by commas, got '{text}'") from None


def parse_seeds(text: str | None, default: Sequence[int]) -> list[int]:
    """ "0,1,2" -> [0, 1, 2] (None -> ``default``); refuses an empty, repeated or bad list."""
    seeds = comma_list(text, default, int, "seeds must be integers")
    if not seeds or len(set(seeds)) != len(seeds):
        raise UserError(f"seeds must be a non-empty list without repeats, got {seeds}")
    return seeds


def parse_references(text: str | None, cfg: Config) -> list[str]:
    """ "maskrcnn" -> ["maskrcnn"]: model kinds to add as reference rows (None -> none). Each must
    be a known kind other than ``model.kind`` (whose baseline row is there already)."""
    from trainer.model.factory import QUERY_KINDS

    if cfg.model.kind not in QUERY_KINDS:
        raise UserError(
            f"model.kind = '{cfg.model.kind}' has no Saliency Prompt pre-training to compare; "
            f"keep a query-based model.kind and add it with --reference {cfg.model.kind}"
        )
    kinds = [k.strip() for k in (text or "").split(",") if k.strip()]
    for kind in kinds:
        if kind not in REFERENCE_LABELS or kind == cfg.model.kind:
            others = [k for k in REFERENCE_LABELS if k != cfg.model.kind]
            raise UserError(f"unknown --reference '{kind}' (expected one of {', '.join(others)})")
    if len(set(kinds)) != len(kinds):
        raise UserError(f"--reference lists a kind twice: {text}")
    return kinds


def reference_config(cfg: Config, kind: str) -> Config:
    """``cfg`` with ``model.kind`` = ``kind``: everything else (data, backbone, budget) shared."""
    return dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, kind=kind))


def reference_lines(cfg: Config, kinds: Sequence[str]) -> list[str]:
    """The results.md sentence that says how the reference rows were trained."""
    if "maskrcnn" not in kinds:
        return []
    m = cfg.maskrcnn
    return [
        "",
        "Mask R-CNN (torchvision's, on the same frozen backbone, neck and input sizes) trains "
        f"with its own optimiser ([maskrcnn]): {m.optimizer} lr {m.lr:g}, weight decay "
        f"{m.weight_decay:g}, warm-up {m.warmup_iters}, steps {m.lr_steps}; same budget, split, "
        "seeds and evaluation as the other rows.",
    ]


def check_same_split(records: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """The split every run trained on (split.json of the first); UserError if any differs."""
    splits = [json.loads((Path(r["out"]) / "split.json").read_text()) for r in records]
    for r, split in zip(records, splits):
        if split["images"] != splits[0]["images"]:
            raise UserError(f"{r['out']} trained on another split than {records[0]['out']}")
    return splits[0]


def settings_record(
    run_cfg: Config, split: dict[str, Any], seeds: Sequence[int], **extra: Any
) -> dict[str, Any]:
    """What every run of a compare or study shares, for results.json."""
    ft = run_cfg.finetune
    # split.json is the subset COCO file; how it was chosen sits under its "split" key.
    how = split.get("split", {})
    return {
        "config": run_cfg.name,
        "frac": ft.frac,
        "iters": ft.iters,
        "batch_size": ft.batch_size,
        "lr": ft.lr,
        "eval_every": ft.eval_every,
        "seeds": list(seeds),
        "split_seed": ft.split_seed,
        "split_method": how.get("method", "unrecorded"),
        "split_images": how.get("num_images", len(split["images"])),
        "val_json": run_cfg.data.val_json,
        **extra,
    }


def intro_lines(settings: dict[str, Any]) -> list[str]:
    """The results.md paragraph that states the shared protocol."""
    return [
        f"Every run: {settings['iters']} iterations, batch {settings['batch_size']}, lr "
        f"{settings['lr']:g}, the same {settings['split_images']} training images "
        f"({settings['split_method']} split, split seed {settings['split_seed']}), evaluated on "
        f"{settings['val_json']} every {settings['eval_every']} iterations. Fine-tuning seeds "
        f"{', '.join(map(str, settings['seeds']))} (finetune.seed: head initialisation and batch "
        "order; the split does not change)."
    ]


def default_folder(cfg: Config, frac: float | None, kind: str) -> Path:
    """runs/<name>/<kind>-<frac> (kind: compare, study)."""
    value = cfg.finetune.frac if frac is None else frac
    return Path(f"runs/{cfg.name}/{kind}-{value:g}")


def compare(
    cfg: Config,
    *,
    frac: float | None = None,
    pretrained: str | None = None,
    iters: int | None = None,
    out: str | None = None,
    seeds: Sequence[int] | None = None,
    references: Sequence[str] = (),
) -> dict[str, Any]:
    """Run (or reuse) every fine-tuning and write the report; returns write_report's dict plus
    "rows" (the run records). ``references``: model kinds fine-tuned from the backbone alone as
    extra rows (:func:`parse_references`). Empty dict on non-zero torch.distributed ranks."""
    seeds = list(cfg.compare.seeds if seeds is None else seeds)
    configured = cfg.finetune.init if cfg.finetune.init.lower() != NO_INIT else ""
    inits = {"sp": pretrained or configured, "baseline": NO_INIT}
    models = {"sp": cfg, "baseline": cfg, **{k: reference_config(cfg, k) for k in references}}
    folder = Path(out) if out else default_folder(cfg, frac, "compare")
    rows: dict[str, list[dict[str, Any]]] = {row: [] for row in models}
    main = True
    for seed in seeds:
        for row, model_cfg in models.items():
            run_cfg = run_config(
                model_cfg,
                frac=frac,
                init=inits.get(row, NO_INIT),
                iters=iters,
                out=folder / f"{row}-seed{seed}",
                seed=seed,
            )
            if row == "baseline":
                base_cfg = run_cfg
            summary = run_or_reuse(run_cfg)
            # Non-zero torch.distributed ranks get no summary: they train along, rank 0 reports.
            main = main and bool(summary)
            if main:
                rows[row].append(run_record(run_cfg, summary, row))
    if not main:
        return {}
    split = check_same_split([r for runs in rows.values() for r in runs])
    settings = settings_record(
        base_cfg, split, seeds, command="compare", references=list(references)
    )
    frac_value = base_cfg.finetune.frac
    report = write_report(
        folder,
        title=f"Saliency Prompt vs baseline: {cfg.name}, {frac_value:g} of the training images",
        intro=[*intro_lines(settings), *reference_lines(cfg, references)],
        rows=rows,
        labels={**LABELS, **{k: REFERENCE_LABELS[k] for k in references}},
        baseline="baseline",
        settings=settings,
    )
    return {**report, "rows": rows}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--frac",
        type=float,
        default=None,
        help="fraction of the training images (default: finetune.frac)",
    )
    parser.add_argument(
        "--pretrained",
        default=None,
        help="pre-training checkpoint (default: finetune.init, else "
        "runs/<name>/pretrain/checkpoints/last.pt)",
    )
    parser.add_argument(
        "--seeds", default=None, help="fine-tuning seeds, e.g. 0,1,2 (default: compare.seeds)"
    )
    parser.add_argument(
        "--iters",
        type=int,
        default=None,
        help="fine-tuning iterations of each run (finetune.iters)",
    )
    parser.add_argument(
        "--out", default=None, help="output folder (default: runs/<name>/compare-<frac>)"
    )
    add_reference_argument(parser)


def add_reference_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--reference",
        default=None,
        help="extra rows: model kinds fine-tuned from the backbone alone under the same "
        f"protocol, comma-separated ({', '.join(REFERENCE_LABELS)}; e.g. maskrcnn)",
    )


def print_summary(result: dict[str, Any], labels: dict[str, str], command: str) -> None:
    """The metrics table and each row's mean paired AP difference, on stdout."""
    print(result["table"])
    for key, entry in result["summary"].items():
        diff = entry.get("difference")
        if diff and diff["AP"]["mean"] is not None:
            sd = diff["AP"]["sd"]
            spread = f" ± {100 * sd:.1f}" if sd is not None else ""
            print(f"{labels[key]} - baseline: {100 * diff['AP']['mean']:+.1f}{spread} AP")
    print(f"{command}: {result['results_md']}, {result['results_json']}, {result['png']}")


def run(args: argparse.Namespace) -> int:
    cfg = load_config(args.config, args.overrides)
    if args.pretrained is not None and args.pretrained.lower() == NO_INIT:
        raise UserError("--pretrained needs a checkpoint; the baseline run is made anyway")
    result = compare(
        cfg,
        frac=args.frac,
        pretrained=args.pretrained,
        iters=args.iters,
        out=args.out,
        seeds=parse_seeds(args.seeds, cfg.compare.seeds),
        references=parse_references(args.reference, cfg),
    )
    if result:
        print_summary(result, result["labels"], "compare")
    return 0
