"""A run's ``metrics.jsonl``: the logging window, appending, reading, truncating, and the loss plot.

One JSON object per line. Training records have kind "train" (iteration "iter", learning rates,
window means of every loss_* / stat_* value, "data_wait", "images_per_s", "seconds_per_iter");
evaluations have kind "eval" (iteration "iter" and the evaluation's metrics).
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from pipeline.atomic_files import write_text


class LogWindow:
    """Sums over the iterations since the last log line (saved in checkpoints for exact logs)."""

    def __init__(self) -> None:
        self.sums: dict[str, float] = {}
        self.count = 0
        self.data_time = 0.0
        self.step_time = 0.0
        self.images = 0

    def add(self, values: dict[str, float], data_time: float, step_time: float, images: int):
        for k, v in values.items():
            self.sums[k] = self.sums.get(k, 0.0) + v
        self.count += 1
        self.data_time += data_time
        self.step_time += step_time
        self.images += images

    def averages(self) -> dict[str, float]:
        """The window's part of a training record: the mean of every value added, then
        "data_wait" (share of step time spent waiting for data), "images_per_s" and
        "seconds_per_iter". Needs at least one ``add``."""
        out = {k: v / self.count for k, v in self.sums.items()}
        out["data_wait"] = self.data_time / max(self.step_time, 1e-12)
        out["images_per_s"] = self.images / max(self.step_time, 1e-12)
        out["seconds_per_iter"] = self.step_time / self.count
        return out

    def state_dict(self) -> dict[str, Any]:
        return dict(vars(self))

    def load_state_dict(self, state: dict[str, Any] | None) -> None:
        if state:
            self.__dict__.update(state)


def append_metrics(path: Path, record: dict[str, Any]) -> None:
    """Append one record as a JSON line."""
    with path.open("a") as fh:
        fh.write(json.dumps(record) + "\n")


def truncate_metrics(path: Path, keep_until: int) -> None:
    """Drop records after ``keep_until`` (written by a run that died after its last checkpoint)."""
    if not path.is_file():
        return
    kept = []
    for line in path.read_text().splitlines():
        try:
            if json.loads(line).get("iter", 0) <= keep_until:
                kept.append(line)
        except json.JSONDecodeError:  # a line cut by a crash
            continue
    # Atomic: a crash while truncating must not lose the records being kept.
    write_text(path, "".join(f"{line}\n" for line in kept))


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    """All records of a metrics.jsonl (training records have kind "train", evaluations "eval")."""
    path = Path(path)
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def loss_groups(keys: Iterable[str]) -> dict[str, list[str]]:
    """Group loss_* keys by their last word (loss_s1_dice, loss_init_dice -> "dice"), so one
    curve per kind of loss is drawn however many stages report it."""
    groups: dict[str, list[str]] = {}
    for key in sorted(keys):
        groups.setdefault(key.rsplit("_", 1)[-1], []).append(key)
    return groups


def plot_curves(metrics_path: str | Path, png_path: str | Path) -> Path | None:
    """One PNG: the total loss and each kind of loss (summed over stages), then the learning
    rate and the data-wait share. Returns its path, or None without training records."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = [r for r in read_metrics(metrics_path) if r.get("kind") == "train"]
    if not records:
        return None
    iters = [r["iter"] for r in records]
    curves = {"total": [r["loss"] for r in records]}
    for name, keys in loss_groups({k for r in records for k in r if k.startswith("loss_")}).items():
        label = f"{name} ({len(keys)} terms)" if len(keys) > 1 else keys[0]
        curves[label] = [sum(r.get(k, math.nan) for k in keys) for r in records]
    fig, (ax_loss, ax_lr) = plt.subplots(
        2, 1, figsize=(8, 7), sharex=True, gridspec_kw={"height_ratios": [3, 1]}
    )
    colours = plt.get_cmap("tab10")
    for i, (label, ys) in enumerate(curves.items()):
        ax_loss.plot(
            iters, ys, label=label, color=colours(i % 10), linewidth=2.5 if i == 0 else 1.2
        )
    if all(y > 0 for ys in curves.values() for y in ys):
        ax_loss.set_yscale("log")
    ax_loss.set_ylabel("loss (mean over each logging window)")
    ax_loss.legend(fontsize=8)
    ax_loss.grid(alpha=0.3)
    ax_lr.plot(iters, [r["lr"] for r in records], color="black")
    ax_lr.set_ylabel("lr")
    ax_lr.set_xlabel("iteration")
    ax_share = ax_lr.twinx()
    ax_share.plot(iters, [r["data_wait"] for r in records], color="tab:red", alpha=0.6)
    ax_share.set_ylabel("data-wait share", color="tab:red")
    fig.tight_layout()
    png_path = Path(png_path)
    fig.savefig(png_path, dpi=100)
    plt.close(fig)
    return png_path
