"""What a training run writes as it goes: the progress bar, ``metrics.jsonl`` records (kind
"train" every ``log_every`` iterations, kind "eval" after each evaluation) and TensorBoard."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from tqdm import tqdm

from trainer.engine.metrics_log import LogWindow, append_metrics, read_metrics, truncate_metrics


def has_eval(metrics_path: Path, iteration: int) -> bool:
    """Whether metrics.jsonl holds the evaluation of ``iteration`` (True for iteration 0:
    nothing to redo there)."""
    if iteration == 0:
        return True
    return any(
        r.get("kind") == "eval" and int(r.get("iter", -1)) == iteration
        for r in read_metrics(metrics_path)
    )


class Recorder:
    """The run's records on rank 0 (other ranks keep only the logging window, which every
    checkpoint saves so a resumed run logs the same windows as an uninterrupted one)."""

    def __init__(
        self,
        out_dir: Path,
        iters: int,
        start: int,
        window_state: dict[str, Any] | None,
        is_main: bool,
        desc: str,
    ) -> None:
        self.metrics_path = out_dir / "metrics.jsonl"
        self.is_main, self.iters = is_main, iters
        self.window = LogWindow()
        self.window.load_state_dict(window_state)
        self.last_record: dict[str, Any] = {}
        if is_main:
            out_dir.mkdir(parents=True, exist_ok=True)
            if start:
                truncate_metrics(self.metrics_path, start)
            else:
                self.metrics_path.write_text("")
        self.writer = None
        if is_main and start < iters:
            from torch.utils.tensorboard import SummaryWriter

            purge = start + 1 if start else None  # hide the dead run's points after the checkpoint
            self.writer = SummaryWriter(str(out_dir / "tensorboard"), purge_step=purge)
        self.bar = tqdm(
            total=iters, initial=start, desc=desc, dynamic_ncols=True, disable=not is_main
        )

    def step(
        self, named: dict[str, float], data_time: float, step_time: float, images: int
    ) -> None:
        """One iteration's numbers into the window and the progress bar."""
        self.window.add(named, data_time, step_time, images)
        if self.is_main:
            self.bar.update(1)
            self.bar.set_postfix(
                loss=f"{named['loss']:.3f}", img_s=f"{images / max(step_time, 1e-9):.1f}",
                refresh=False,
            )  # fmt: skip

    def log(self, iteration: int, param_groups: list[dict], every: int) -> None:
        """A kind "train" record of the window's averages and the learning rates."""
        record: dict[str, Any] = {"kind": "train", "iter": iteration}
        for group in param_groups:
            name = group.get("name", "heads")
            record["lr" if name == "heads" else f"lr_{name}"] = group["lr"]
        record.update(self.window.averages())
        if iteration % every == 0:
            # The extra record at a run's end keeps its window open, so a run resumed from that
            # end logs the same windows as an uninterrupted one.
            self.window = LogWindow()
        self.last_record = record
        if self.is_main:
            append_metrics(self.metrics_path, record)
            for k, v in record.items():
                if k not in ("kind", "iter"):
                    self.writer.add_scalar(f"train/{k}", v, iteration)

    def log_eval(self, iteration: int, metrics: dict[str, Any]) -> None:
        append_metrics(self.metrics_path, {"kind": "eval", "iter": iteration, **metrics})
        for k, v in metrics.items():
            if isinstance(v, (int, float)):
                self.writer.add_scalar(f"eval/{k}", v, iteration)

    def close(self) -> None:
        self.bar.close()
        if self.writer is not None:
            self.writer.close()
