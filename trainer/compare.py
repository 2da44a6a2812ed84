"""Saliency Prompt vs baseline: one fine-tuning from the pre-trained K-Net, one from the backbone.

    python -m trainer compare --frac F [--pretrained CKPT] [--iters N]

Runs ``finetune`` twice with the same config, budget, seed and split: once initialised from the
pre-training checkpoint (tag "sp", default runs/<name>/pretrain/checkpoints/last.pt) and once from
the backbone weights alone with fresh heads (tag "baseline", ``--init none``). A run that already
finished with the same settings and the same init checkpoint (by sha256) is reused; an unfinished
one is resumed; one made with other settings or from another checkpoint is an error. Then writes
runs/<name>/compare-<frac>/results.md (final and best mask AP of both, iterations, time) and
ap_vs_iter.png (AP against iteration, both curves), and prints the table.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import tomllib
from pathlib import Path
from typing import Any

from pipeline.atomic_files import write_text
from pipeline.cli import UserError
from pipeline.config import dump_toml
from trainer.config import Config, load_config
from trainer.evaluate import format_table
from trainer.finetune import NO_INIT, check_init, finetune, init_record, resolve

RUNS = (("sp", "Saliency Prompt (pre-trained K-Net)"), ("baseline", "baseline (backbone only)"))


def _differences(a: Any, b: Any, where: str = "") -> list[str]:
    """Dotted keys whose values differ between two nested dicts."""
    if isinstance(a, dict) and isinstance(b, dict):
        out = []
        for k in sorted(set(a) | set(b)):
            out += _differences(a.get(k), b.get(k), f"{where}.{k}" if where else k)
        return out
    return [] if a == b else [f"{where} ({b!r} recorded, {a!r} now)"]


def _check_same_settings(cfg: Config) -> None:
    """Refuse to reuse or resume a run folder made with other settings (other iters, split...)."""
    recorded = Path(cfg.finetune.out) / "config.toml"
    if not recorded.is_file():
        return
    now = tomllib.loads(dump_toml(dataclasses.asdict(cfg)))
    then = tomllib.loads(recorded.read_text())
    diff = _differences(now, then)
    if diff:
        raise UserError(
            f"{recorded.parent} was made with other settings: {'; '.join(diff[:3])}"
            f"{' ...' if len(diff) > 3 else ''}. Delete it or change --set finetune.out"
        )


def _finished(cfg: Config) -> dict[str, Any] | None:
    """metrics.json of a run folder that completed ``cfg.finetune.iters`` iterations, else None."""
    path = Path(cfg.finetune.out) / "metrics.json"
    if not path.is_file():
        return None
    summary = json.loads(path.read_text())
    done = summary.get("iterations") == cfg.finetune.iters
    return summary if done and summary["final"]["iteration"] == cfg.finetune.iters else None


def plot_ap_curves(curves: dict[str, list[dict[str, Any]]], png: Path, title: str) -> Path:
    """AP (percent) against iteration, one line per run."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for label, curve in curves.items():
        xs = [r["iteration"] for r in curve]
        ax.plot(xs, [100 * r["AP"] for r in curve], marker="o", label=label)
    ax.set_xlabel("fine-tuning iteration")
    ax.set_ylabel("mask AP (%)")
    ax.set_ylim(bottom=0)  # from zero, so a small absolute gap is not drawn as a large one
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(png, dpi=100)
    plt.close(fig)
    return png


def compare(
    cfg: Config,
    *,
    frac: float | None = None,
    pretrained: str | None = None,
    iters: int | None = None,
    out: str | None = None,
) -> dict[str, Any]:
    """Run (or reuse) both fine-tunings and write the comparison; returns {"results_md",
    "png", "runs": {tag: metrics.json content}}. Empty dict on non-zero torch.distributed ranks.
    """
    configured = cfg.finetune.init if cfg.finetune.init.lower() != NO_INIT else ""
    runs = {
        "sp": resolve(cfg, frac=frac, init=pretrained or configured, iters=iters, tag="sp"),
        "baseline": resolve(cfg, frac=frac, init=NO_INIT, iters=iters, tag="baseline"),
    }
    summaries: dict[str, dict[str, Any]] = {}
    for tag, run_cfg in runs.items():
        _check_same_settings(run_cfg)
        check_init(Path(run_cfg.finetune.out), init_record(run_cfg.finetune.init))
        summary = _finished(run_cfg)
        if summary is not None:
            print(f"compare: reusing the finished run {run_cfg.finetune.out}", file=sys.stderr)
        else:
            summary = finetune(run_cfg, resume=True)
            if not summary:
                return {}  # not rank 0
        summaries[tag] = summary

    splits = {
        tag: json.loads((Path(c.finetune.out) / "split.json").read_text())["images"]
        for tag, c in runs.items()
    }
    if splits["sp"] != splits["baseline"]:
        raise UserError("the two runs were trained on different splits")

    frac_value = runs["sp"].finetune.frac
    folder = Path(out or f"runs/{cfg.name}/compare-{frac_value:g}")
    folder.mkdir(parents=True, exist_ok=True)
    names = dict(RUNS)
    final_rows, best_rows, curves = {}, {}, {}
    for tag, summary in summaries.items():
        run_cfg = runs[tag]
        final_rows[names[tag]] = {
            **summary["final"],
            "iterations": summary["iterations"],
            "time (s)": f"{summary['train_seconds']:.0f}",
        }
        best = summary["best"]
        best_rows[names[tag]] = {**best, "at iteration": best["iteration"]}
        curve_path = Path(run_cfg.finetune.out) / "ap_curve.json"
        curves[names[tag]] = json.loads(curve_path.read_text())
    final_table = format_table(final_rows, extra=("iterations", "time (s)"))
    best_table = format_table(best_rows, extra=("at iteration",))
    sp, base = summaries["sp"]["final"], summaries["baseline"]["final"]
    delta = 100 * (sp["AP"] - base["AP"])
    split = summaries["sp"]["split"]
    ft = runs["sp"].finetune
    text = "\n".join(
        [
            f"# Saliency Prompt vs baseline: {cfg.name}, {frac_value:g} of the training images",
            "",
            f"Same fine-tuning for both: {ft.iters} iterations, batch {ft.batch_size}, seed "
            f"{ft.seed}, the same {split['num_images']} training images ({split['method']} split), "
            f"evaluated on {cfg.data.val_json}. Mask AP in percent (pycocotools), final iteration.",
            "",
            final_table,
            "",
            f"Saliency Prompt - baseline: {delta:+.1f} AP.",
            "",
            "Best evaluation of each run (labelled as such; the final one above is the result):",
            "",
            best_table,
            "",
            "Runs:",
            "",
            *(
                f"- {names[t]}: `{runs[t].finetune.out}` (init: `{runs[t].finetune.init}`)"
                for t in runs
            ),
            "",
            "Time is the sum of training-step and evaluation time logged by the runs.",
            "",
        ]
    )
    results_md = folder / "results.md"
    write_text(results_md, text)
    png = plot_ap_curves(
        curves,
        folder / "ap_vs_iter.png",
        f"{cfg.name}: fine-tuning on {frac_value:g} of the images",
    )
    return {
        "results_md": str(results_md),
        "png": str(png),
        "runs": summaries,
        "table": final_table,
        "delta_ap": delta,
    }


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
        "--iters",
        type=int,
        default=None,
        help="fine-tuning iterations of each run (finetune.iters)",
    )
    parser.add_argument(
        "--out", default=None, help="output folder (default: runs/<name>/compare-<frac>)"
    )


def run(args: argparse.Namespace) -> int:
    cfg = load_config(args.config, args.overrides)
    if args.pretrained is not None and args.pretrained.lower() == NO_INIT:
        raise UserError("--pretrained needs a checkpoint; the baseline run is made anyway")
    result = compare(
        cfg, frac=args.frac, pretrained=args.pretrained, iters=args.iters, out=args.out
    )
    if result:
        print(result["table"])
        print(f"Saliency Prompt - baseline: {result['delta_ap']:+.1f} AP")
        print(f"compare: {result['results_md']}, {result['png']}")
    return 0
