"""How well pre-training learns its own task, measured while it runs (docs/results.md, "Learner
and teacher").

Three class-agnostic scores, each COCO mask AP (pycocotools, useCats 0):

- **held-out fit**: a seeded share of the unlabelled pool (``pretrain.holdout``) never enters
  training; every ``pretrain.eval_every`` iterations the model is scored against those images'
  pseudo masks (the targets it would have had there). This is the pretext task's own
  validation loss in AP form, and needs no labels.
- **learner on val**: the same model against the val ground truth, when ``data.val_json`` is set.
- **teacher on val**: stage one's pseudo masks over the same val images (``pretrain.teacher_val``,
  a proposals folder made from data.val_images) against the same ground truth, computed once.

The learner keeps at most as many detections per image as stage one keeps masks
(``proposals.top_k``), so learner and teacher are compared at one detection budget. Which
images are held out depends only on the file name and ``holdout_seed`` (a hash), so it is the
same on resume, for any worker count and for any shard layout.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import io
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from pycocotools.coco import COCO

from pipeline.cli import UserError
from trainer.config import Config
from trainer.stages.coco_metrics import load_coco
from trainer.stages.evaluate import evaluate, ordered_loader, val_images

AGNOSTIC_CATEGORY = {"id": 1, "name": "object"}
# The scores written to metrics.jsonl at each evaluation, per source.
CURVE_KEYS = ("AP", "AP50", "AP75")
# What each evaluation scores: the held-out fit and the learner on val, for the trained weights
# and, with pretrain.ema_decay, for their average (the engine prefixes those "ema_").
SOURCES = ("heldout", "val", "ema_heldout", "ema_val")


def held_out(file_name: str, share: float, seed: int) -> bool:
    """Whether image ``file_name`` is in the held-out share: a uniform number in [0, 1) drawn
    from sha256(seed, name), so the rule needs no list and never changes for a given name."""
    if share <= 0:
        return False
    digest = hashlib.sha256(f"{seed}\0{file_name}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64 < share


def pseudo_ground_truth(dataset: Any) -> COCO:
    """A COCO ground truth of a ShardDataset's target masks (its selection applied), one class:
    what the held-out images' targets would have been."""
    images, annotations = [], []
    for s, r in dataset.index:
        record = dataset.readers[s].record(r)
        keep = (
            dataset.selection.keep(record) if dataset.selection.active else range(len(record.rles))
        )
        images.append(
            {
                "id": int(record.image_id),
                "height": record.height,
                "width": record.width,
                "file_name": record.file_name,
            }
        )
        for k in keep:
            rle = {"size": [record.height, record.width], "counts": record.rles[k]}
            x0, y0, x1, y1 = (float(v) for v in record.boxes[k])
            annotations.append(
                {
                    "id": len(annotations) + 1,
                    "image_id": int(record.image_id),
                    "category_id": 1,
                    "segmentation": {**rle, "counts": rle["counts"].decode()},
                    "area": float(_area(rle)),
                    "bbox": [x0, y0, x1 - x0, y1 - y0],
                    "iscrowd": 0,
                }
            )
    for reader in dataset.readers:
        reader.close()  # the loader's workers open their own handles
    coco = COCO()
    coco.dataset = {
        "images": images,
        "annotations": annotations,
        "categories": [dict(AGNOSTIC_CATEGORY)],
    }
    with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints "creating index"
        coco.createIndex()
    return coco


def _area(rle: dict) -> float:
    from pycocotools import mask as mask_util

    return float(mask_util.area(rle))


def teacher_folder(cfg: Config) -> Path | None:
    """The proposals folder over the val images that plays the teacher: pretrain.teacher_val,
    else runs/<name>/proposals-val when it exists; None when there is none."""
    given = cfg.pretrain.teacher_val
    if given:
        if not Path(given).is_dir():
            raise UserError(f"pretrain.teacher_val: no proposals folder at {given}")
        return Path(given)
    default = Path(f"runs/{cfg.name}/proposals-val")
    return default if default.is_dir() else None


def teacher_metrics(folder: Path, val_json: str) -> dict[str, float]:
    """Stage one's pseudo masks in ``folder`` scored class-agnostically against ``val_json``
    (pipeline/inspection/recall.py, as ``pipeline inspect --gt`` scores them)."""
    from pipeline.inspection.recall import recall_against_gt

    result = recall_against_gt(folder, val_json)
    metrics = {k: v for k, v in result["metrics"].items() if v is not None}
    return {**metrics, "images": float(result["images_evaluated"]), "folder": str(folder)}


def make_pretext_eval(
    cfg: Config,
    knet: Any,
    heldout: Any | None,
    device: Any,
    *,
    frozen: Callable | None,
    store: Any | None,
    precision: str,
) -> Callable[[int], dict[str, float]]:
    """eval_fn(iteration) for the engine: held-out fit (``heldout``: a ShardDataset of the
    held-out images, resize only, or None) and learner-on-val scores, as "heldout_AP", ... and
    "val_AP", ... plus "eval_seconds"."""
    p = cfg.pretrain
    budget = int(cfg.proposals.top_k)  # the teacher's masks per image: one detection budget
    sources: list[tuple[str, Any, COCO]] = []
    if heldout is not None and len(heldout):
        gt = pseudo_ground_truth(heldout)
        sources.append(("heldout", _loader(heldout, knet, p, store), gt))
    if cfg.data.val_json and Path(cfg.data.val_json).is_file():
        sources.append(("val", _val_loader(cfg, knet, store), load_coco(cfg.data.val_json)))

    def eval_fn(iteration: int) -> dict[str, float]:
        t0 = time.perf_counter()
        scores: dict[str, float] = {}
        for name, loader, gt in sources:
            metrics = evaluate(
                knet,
                loader,
                gt,
                device,
                category_ids=[AGNOSTIC_CATEGORY["id"]],
                mask_threshold=cfg.finetune.test_mask_threshold,
                max_detections=budget,
                class_agnostic=True,
                inputs=frozen,
                precision=precision,
            )
            scores.update({f"{name}_{k}": metrics[k] for k in CURVE_KEYS})
        return {**scores, "eval_seconds": time.perf_counter() - t0}

    return eval_fn


def _loader(dataset: Any, knet: Any, p: Any, store: Any | None) -> Any:
    return ordered_loader(dataset, knet.size_divisor, p.batch_size, num_workers=0, store=store)


def eval_sides(cfg: Config) -> tuple[int, int]:
    """(short side, max side) of the pretext evaluation's inputs (``pretrain.eval_size``)."""
    if cfg.pretrain.eval_size == "teacher":
        return cfg.proposals.short_side, cfg.proposals.max_side
    return cfg.pretrain.short_side, cfg.pretrain.max_side


def _val_loader(cfg: Config, knet: Any, store: Any | None) -> Any:
    """The val images at the pretext evaluation's size (no flip), images only."""
    short, longest = eval_sides(cfg)
    sized = dataclasses.replace(cfg.pretrain, short_side=short, max_side=longest)
    return _loader(val_images(cfg, sized), knet, cfg.pretrain, store)


def learner_and_teacher(curve: list[dict[str, Any]], teacher: dict[str, float] | None) -> dict:
    """The summary pretext.json holds: the last and best evaluation of each source, and the
    teacher's val scores beside the learner's."""
    summary: dict[str, Any] = {"evaluations": len(curve), "teacher_val": teacher}
    for source in SOURCES:
        rows = [r for r in curve if f"{source}_AP" in r]
        if rows:
            best = max(rows, key=lambda r: r[f"{source}_AP"])
            summary[source] = {
                "final": {k: rows[-1][f"{source}_{k}"] for k in CURVE_KEYS},
                "final_iteration": rows[-1]["iteration"],
                "best": {k: best[f"{source}_{k}"] for k in CURVE_KEYS},
                "best_iteration": best["iteration"],
            }
    for weights in ("", "ema_"):  # the trained weights, and their average where one was kept
        if teacher and f"{weights}val" in summary:
            final = summary[f"{weights}val"]["final"]["AP"]
            summary[f"{weights}learner_minus_teacher_val_AP"] = final - teacher["AP"]
    return summary


def plot_pretext(curve: list[dict[str, Any]], teacher: dict | None, png: Path) -> Path | None:
    """AP against iteration: held-out fit and learner on val, the teacher's val AP as a line."""
    if not curve:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    labels = {"heldout": "learner vs held-out pseudo masks", "val": "learner vs val ground truth"}
    colours = {"heldout": "tab:blue", "val": "tab:orange"}
    for source in SOURCES:
        rows = [r for r in curve if f"{source}_AP" in r]
        plain = source.removeprefix("ema_")
        if rows:
            ax.plot(
                [r["iteration"] for r in rows],
                [100 * r[f"{source}_AP"] for r in rows],
                "o-" if source == plain else "s:",
                color=colours[plain],
                label=labels[plain] + (" (weight average)" if source != plain else ""),
            )
    if teacher:
        ax.axhline(
            100 * teacher["AP"],
            color="tab:orange",
            linestyle="--",
            label="teacher (pseudo masks) vs val ground truth",
        )
    ax.set_xlabel("pre-training iteration")
    ax.set_ylabel("class-agnostic mask AP (%)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(png, dpi=110)
    plt.close(fig)
    return png


class Pretext:
    """The pretext measurements of one pre-training run: the teacher's val score (computed once,
    teacher.json), the eval_fn the engine calls, and the summary written at the end
    (pretext.json and pretext.png in the run folder)."""

    def __init__(self, out: Path, eval_fn: Callable | None, teacher: dict | None) -> None:
        self.out, self.eval_fn, self.teacher = out, eval_fn, teacher

    @classmethod
    def start(cls, cfg: Config, built: Any, device: Any, out: Path, rank: int) -> Pretext:
        """Score the teacher and build the eval_fn (rank 0 only: the others evaluate nothing)."""
        from pipeline.atomic_files import write_json
        from pipeline.precision import stage_precision

        p = cfg.pretrain
        if rank != 0 or p.eval_every <= 0:
            return cls(out, None, None)
        teacher = None
        folder = teacher_folder(cfg)
        if folder is not None and cfg.data.val_json and Path(cfg.data.val_json).is_file():
            teacher = teacher_metrics(folder, cfg.data.val_json)
            write_json(out / "teacher.json", teacher)
        knet = built.objective.knet
        eval_fn = make_pretext_eval(
            cfg,
            knet,
            built.heldout,
            device,
            frozen=built.frozen,
            store=built.store,
            precision=stage_precision(p, device, "pretrain"),
        )
        return cls(out, eval_fn, teacher)

    def finish(self, result: dict[str, Any]) -> dict[str, Any] | None:
        """pretext.json (learner_and_teacher) and pretext.png from metrics.jsonl's evaluations."""
        from pipeline.atomic_files import write_json
        from trainer.stages.finetune_eval import ap_curve

        if self.eval_fn is None:
            return None
        curve = ap_curve(self.out / "metrics.jsonl")
        summary = learner_and_teacher(curve, self.teacher)
        write_json(self.out / "pretext.json", {**summary, "curve": curve})
        plot_pretext(curve, self.teacher, self.out / "pretext.png")
        return summary
