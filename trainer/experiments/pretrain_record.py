"""What a pre-training run did, read from its metrics.jsonl: which loss terms it trained and how
its prompt and kernel-supervision statistics moved (first and last logged window).

The study (trainer/experiments/study.py) reports this beside the fine-tuning results, so an
ablation row can
be checked to be the ablation it claims (no loss_*_kernel term without kernel supervision, no
prompt statistics without prompt-kernel matching) and the targets' spread can be followed (the
mean pairwise cosine of t_l, ``stat_target_spread``, rising toward 1 is the collapse).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from trainer.engine.metrics_log import loss_groups, read_metrics

STATS = ("stat_target_spread", "stat_prompt_cos", "stat_prompt_distinct", "stat_prompt_drop")


def pretrain_summary(out: str | Path, checkpoint: str | Path) -> dict[str, Any]:
    """{"out", "checkpoint", "iterations", "loss_kinds" (sorted kinds of loss_* terms, e.g.
    "dice", "kernel"), "loss" and every STATS key present: {"first", "last"}}."""
    from pipeline.backbones.weight_files import file_sha256

    records = [r for r in read_metrics(Path(out) / "metrics.jsonl") if r.get("kind") == "train"]
    summary: dict[str, Any] = {
        "out": str(out),
        "checkpoint": str(checkpoint),
        "sha256": file_sha256(checkpoint),
        "iterations": records[-1]["iter"] if records else 0,
        "loss_kinds": sorted(loss_groups({k for r in records for k in r if k.startswith("loss_")})),
    }
    for key in ("loss", *STATS):
        values = [r[key] for r in records if key in r]
        if values:
            summary[key] = {"first": values[0], "last": values[-1]}
    return summary


def pretrain_table(runs: dict[str, dict[str, Any]]) -> str:
    """Markdown: one row per pre-training run, loss kinds and first -> last of each statistic."""
    head = ["pre-training", "iterations", "loss terms", "loss", *(k[5:] for k in STATS)]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]

    def span(entry: dict[str, Any] | None) -> str:
        return "-" if entry is None else f"{entry['first']:.3f} -> {entry['last']:.3f}"

    for name, s in runs.items():
        cells = [name, str(s["iterations"]), ", ".join(s["loss_kinds"]), span(s.get("loss"))]
        cells += [span(s.get(k)) for k in STATS]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)
