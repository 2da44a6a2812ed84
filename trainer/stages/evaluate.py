"""Evaluate a fine-tuned K-Net or Mask2Former: COCO mask AP, AP50, AP75, APs, APm, APl.

``python -m trainer evaluate --checkpoint CKPT [--out FILE]`` loads a fine-tuning checkpoint and
scores it on the config's validation set (``data.val_json`` / ``data.val_images``).

Test-time decoding follows K-Net's ``KernelIterHead.simple_test`` (docs/method.md, stage three;
trainer/inference/instances.py):
the last update stage's class logits (N kernels x C classes) go through a sigmoid and are flattened,
the top ``max_detections`` (kernel, class) pairs are kept, and each one's mask logits are turned
into an original-size binary mask: sigmoid, bilinear up-sampling to the padded input size, crop to
the resized image, bilinear resize to the original size, threshold at ``test_mask_threshold``.

**Scores** (``model.test_score``, trainer/model/scoring.py). K-Net's own instance decoder scores
a detection by its class probability alone (``"class"``, see ``get_seg_masks``/``segm2result`` in
K-Net's ``kernel_update_head.py``); ``"maskness"`` multiplies it by the mean foreground
probability inside the binary mask, as stage one and Mask2Former do. The demo config uses
``"maskness"``, chosen on the baseline's own AP (docs/results.md). A Mask2Former is scored as
Mask2Former scores it (softmax class probability without no-object, times the mask score);
``model.test_nms_iou`` > 0 adds per-class mask NMS. All kinds binarise masks at the same
``test_mask_threshold``.

Detections whose binary mask is empty are dropped: an empty mask matches no object (IoU 0), so it
cannot change AP, and keeping it would only bloat the results file.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import torch
from pycocotools.coco import COCO
from torch import nn
from torch.utils.data import DataLoader

from pipeline.atomic_files import write_json
from pipeline.cli import UserError
from pipeline.inputs.image_files import ImageLimits
from trainer.config import Config
from trainer.data.coco_dataset import CocoDataset
from trainer.data.datasets import Collate
from trainer.data.loader import worker_context, worker_init
from trainer.data.transforms import Augment
from trainer.inference.predictor import Predictor, Settings, unwrap
from trainer.stages.coco_metrics import coco_mask_metrics, format_table, load_coco


@torch.no_grad()
def evaluate(
    knet: nn.Module | Predictor,
    loader: Iterable,
    coco_gt: COCO,
    device: torch.device | str,
    *,
    category_ids: Sequence[int] | None = None,
    mask_threshold: float = 0.3,
    max_detections: int = 100,
    results_path: str | Path | None = None,
    progress: bool = False,
    class_agnostic: bool = False,
    inputs: Callable[[torch.Tensor, list[dict]], Any] | None = None,
    precision: str = "fp32",
) -> dict[str, float]:
    """Mask AP of a model over one pass of ``loader`` against ``coco_gt``.

    knet: a factory-built model (an Objective or DDP wrapper around one is unwrapped), run through
    a :class:`trainer.inference.predictor.Predictor` with the settings below (evaluation keeps every
    detection: no score cut, no NMS), or a ready Predictor (its own settings and classes; the
    arguments after ``coco_gt`` other than results_path, progress and class_agnostic are then
    ignored). The model is put back in its previous mode afterwards (the engine calls this in the
    middle of training).
    loader: finite, yields trainer Batches whose ``infos`` carry "image_id", "orig_size",
    "image_size" (trainer/data/datasets.py, evaluation Augment: resize only).
    category_ids: COCO id of each contiguous class; default ``loader.dataset.cat_ids``.
    results_path: where to write the COCO results JSON (optional).
    class_agnostic: score with COCOeval useCats=0 (see :func:`coco_mask_metrics`).
    inputs: as the engine's: batch images -> the model's input (frozen, maybe cached, levels).
    precision: the forward pass's autocast (pipeline.precision); decoding runs in fp32.
    Returns METRIC_NAMES (fractions, -1 where pycocotools has no ground truth) plus "images"
    (images evaluated) and "detections" (results kept). Only the images seen are scored.
    """
    predictor = knet if isinstance(knet, Predictor) else None
    if predictor is None:
        if category_ids is None:
            category_ids = getattr(getattr(loader, "dataset", None), "cat_ids", None)
            if category_ids is None:
                raise ValueError("category_ids not given and the loader's dataset has no cat_ids")
        settings = Settings(
            0,
            0,
            mask_threshold=mask_threshold,
            max_detections=max_detections,
            nms_iou=getattr(unwrap(knet), "test_nms_iou", 0.0),  # the model's inference rule
        )
        cats = [(int(c), str(c)) for c in category_ids]
        predictor = Predictor(
            knet, cats, settings, device=device, inputs=inputs, precision=precision
        )
    results: list[dict[str, Any]] = []
    seen: list[int] = []
    batches = loader
    if progress:
        from tqdm import tqdm

        batches = tqdm(loader, desc="evaluate", unit="batch", dynamic_ncols=True)
    for batch in batches:
        for info, found in zip(batch.infos, predictor.predict_batch(batch)):
            seen.append(int(info["image_id"]))
            results += found.to_coco(info["image_id"])
    if not seen:
        raise UserError("the evaluation loader yielded no image")
    if results_path is not None:
        write_json(results_path, results, indent=None)
    metrics = coco_mask_metrics(coco_gt, results, image_ids=seen, class_agnostic=class_agnostic)
    return {**metrics, "images": float(len(seen)), "detections": float(len(results))}


def check_categories(checkpoint: Path, trained: Any, val_json: str, scored: list) -> None:
    """UserError unless ``scored`` (the evaluation set's (id, name) per class) are the classes
    the checkpoint was trained on, in the same order: a matching count is not enough (class i
    would be scored as another category). Checkpoints from before categories were recorded
    are checked by count only, with a note."""
    scored = [(int(i), str(n)) for i, n in scored]
    if trained is None:
        print(
            f"evaluate: {checkpoint} records no category names (an older checkpoint): only "
            "the number of classes is checked",
            file=sys.stderr,
        )
        return
    trained = [(int(i), str(n)) for i, n in trained]
    for k, (was, now) in enumerate(zip(trained, scored, strict=False)):
        if was != now:
            raise UserError(
                f"{checkpoint} was trained with class {k} = category {was[0]} '{was[1]}' but "
                f"{val_json} has {now[0]} '{now[1]}' there: not the categories it learnt"
            )
    if len(trained) != len(scored):
        raise UserError(
            f"{checkpoint} was trained on {len(trained)} categories but {val_json} has "
            f"{len(scored)}"
        )


# --------------------------------------------------------------------------------------------
# The validation set and the command


def build_eval_loader(
    cfg: Config, size_divisor: int, *, num_workers: int | None = None, store: Any | None = None
) -> DataLoader:
    """One ordered pass over ``cfg.data.val_json`` / ``val_images``, resized as in fine-tuning
    (no flip, no rotation), every image kept (an image without objects still counts for AP).
    ``store``: a frozen-feature cache (``trainer.data.feature_cache.FeatureStore``) to read from.

    Not sharded over torch.distributed ranks: evaluation runs on rank 0 only and must see the
    whole set.
    """
    ft = cfg.finetune
    dataset = val_images(cfg, ft)
    workers = ft.num_workers if num_workers is None else num_workers
    return ordered_loader(dataset, size_divisor, ft.batch_size, num_workers=workers, store=store)


def val_images(cfg: Config, section: Any) -> CocoDataset:
    """The val images (``cfg.data.val_json``), resized to ``section``'s short_side / max_side,
    images only (no flip, no rotation, every image kept)."""
    return CocoDataset(
        cfg.data.val_json,
        cfg.data.val_images,
        Augment(section.short_side, section.max_side),
        train=False,
        with_masks=False,
        limits=ImageLimits.from_data(cfg.data),
        allow_outside_root=cfg.data.allow_outside_root,
        unlabelled_ok=True,  # images only: detections are written, nothing is scored
    )


def ordered_loader(
    dataset: Any, size_divisor: int, batch_size: int, *, num_workers: int, store: Any | None
) -> DataLoader:
    """One ordered pass over an evaluation dataset (read through the frozen-feature cache
    ``store`` when given), batched into trainer Batches."""
    if store is not None:
        from trainer.data.feature_cache import CachedDataset

        dataset = CachedDataset(dataset, store)
    workers = num_workers
    return DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=False,
        num_workers=workers,
        collate_fn=Collate(size_divisor),
        # Same start method as the training loader (see trainer/data/loader.py: fork can deadlock),
        # kept alive between the periodic evaluations.
        persistent_workers=workers > 0,
        multiprocessing_context=worker_context() if workers > 0 else None,
        worker_init_fn=worker_init(workers),  # they exit with the process that evaluates
    )


def default_output(checkpoint: Path, class_agnostic: bool = False) -> Path:
    """runs/.../finetune-0.05/checkpoints/last.pt -> runs/.../finetune-0.05/eval-last.json
    (eval-last-agnostic.json for a class-agnostic evaluation)."""
    folder = checkpoint.parent
    if folder.name == "checkpoints":
        folder = folder.parent
    return folder / f"eval-{checkpoint.stem}{'-agnostic' if class_agnostic else ''}.json"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--checkpoint", required=True, help="fine-tuning checkpoint (.pt)")
    parser.add_argument(
        "--out", default="", help="metrics JSON (default: eval-<checkpoint>.json in its run)"
    )
    parser.add_argument("--batch-size", type=int, default=0, help="default: finetune.batch_size")
    parser.add_argument(
        "--class-agnostic",
        action="store_true",
        help="object-discovery AP: any detection may match any object (COCOeval useCats=0); "
        "also scores a class-agnostic pre-training checkpoint",
    )
    parser.epilog = (
        "The model and data settings come from the checkpoint's own config; --set overrides "
        "them (e.g. --set data.val_json=...); --config is not read."
    )


def run(args: argparse.Namespace) -> int:
    from trainer.data.eval_inputs import check_output, check_validation_images, validation_error
    from trainer.data.feature_cache import cache_dir, frozen_inputs
    from trainer.engine.distributed import init_distributed

    path = Path(args.checkpoint)
    out = Path(args.out) if args.out else default_output(path, args.class_agnostic)
    check_output(out)  # before any work: a folder that cannot take the result is refused now
    predictor = Predictor.from_checkpoint(path, device=init_distributed(), overrides=args.overrides)
    cfg = predictor.config
    if args.batch_size > 0:
        cfg.finetune.batch_size = args.batch_size
    coco_gt = load_coco(cfg.data.val_json)
    check_validation_images(cfg, coco_gt.dataset)
    # A checkpoint's backbone is frozen here: evaluation reads the same levels as training did,
    # from the feature cache when finetune.feature_cache is on.
    _, frozen, store = frozen_inputs(
        predictor.model.backbone,
        enabled=cfg.finetune.feature_cache,
        cache_dir=cache_dir(cfg, cfg.finetune),
        stage="finetune",
        datasets=[],
        precision=predictor.precision,
    )
    predictor.inputs = frozen
    loader = build_eval_loader(cfg, predictor.model.size_divisor, store=store)
    scored = list(loader.dataset.categories)
    if not args.class_agnostic:
        check_categories(path, predictor.recorded_categories, cfg.data.val_json, scored)
    if len(scored) == len(predictor.categories):
        predictor.categories = scored
    else:  # class-agnostic only (checked above otherwise)
        # A pre-training checkpoint predicts one "object" class: label its detections with the
        # first category; useCats=0 makes the label irrelevant to the score.
        predictor.categories = [scored[0]] * len(predictor.categories)
    segm = out.with_name(out.stem + "-segm.json")
    try:
        metrics = evaluate(
            predictor,
            loader,
            coco_gt,
            predictor.device,
            results_path=segm,
            progress=True,
            class_agnostic=args.class_agnostic,
        )
    except UserError as e:
        raise validation_error(e) from None
    report = {
        "checkpoint": str(path),
        "iteration": predictor.iteration,
        "val_json": cfg.data.val_json,
        "class_agnostic": args.class_agnostic,
        "metrics": metrics,
    }
    write_json(out, report)
    if not coco_gt.dataset.get("annotations"):
        # Nothing to score against: say where the detections are instead of a table of "n/a".
        print(
            f"{cfg.data.val_json} has no annotations, so there is nothing to score: "
            f"{int(metrics['detections'])} detections on {int(metrics['images'])} images are "
            f"in {segm} (python -m trainer predict also draws them)"
        )
        return 0
    print(format_table({path.name: metrics}))
    print(f"metrics: {out}")
    print(f"detections: {segm}")
    return 0
