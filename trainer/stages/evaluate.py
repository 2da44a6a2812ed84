"""Evaluate a fine-tuned K-Net or Mask2Former: COCO mask AP, AP50, AP75, APs, APm, APl.

``python -m trainer evaluate --checkpoint CKPT [--out FILE]`` loads a fine-tuning checkpoint and
scores it on the config's validation set (``data.val_json`` / ``data.val_images``).

Test-time decoding follows K-Net's ``KernelIterHead.simple_test`` (docs/method.md, stage three;
trainer/inference/instances.py):
the last update stage's class logits (N kernels x C classes) go through a sigmoid and are flattened,
the top ``max_detections`` (kernel, class) pairs are kept, and each one's mask logits are turned
into an original-size binary mask: sigmoid, bilinear up-sampling to the padded input size, crop to
the resized image, bilinear resize to the original size, threshold at ``test_mask_threshold``.

**[choice] No mask-score rescoring.** Mask2Former-style decoders multiply the class score by the
mean soft mask inside the binary mask; K-Net's instance decoder does not (its detection score is
the class probability alone; see ``get_seg_masks``/``segm2result`` in K-Net's
``kernel_update_head.py``). Saliency Prompt fine-tunes and tests a plain K-Net, so the score here
is the sigmoid class probability, as in K-Net. A Mask2Former is scored as Mask2Former scores it
(its ``detection_scores``: softmax class probability without no-object, times the mask score);
both binarise masks at the same ``test_mask_threshold``.

Detections whose binary mask is empty are dropped: an empty mask matches no object (IoU 0), so it
cannot change AP, and keeping it would only bloat the results file.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import sys
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import torch
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval
from torch import Tensor, nn
from torch.utils.data import DataLoader

from pipeline.atomic_files import write_json
from pipeline.cli import UserError
from pipeline.inputs.coco_file import load_coco_file
from pipeline.inputs.image_files import ImageLimits
from trainer.config import Config
from trainer.data.datasets import CocoDataset, Collate
from trainer.data.loader import worker_context, worker_init
from trainer.data.transforms import Augment
from trainer.inference.instances import Instances, boxes_of, decode
from trainer.inference.predictor import Predictor, Settings, unwrap

METRIC_NAMES = ("AP", "AP50", "AP75", "APs", "APm", "APl")  # order of COCOeval.stats[0:6]


def image_results(
    class_logits: Tensor,
    mask_logits: Tensor,
    *,
    image_id: int,
    category_ids: Sequence[int],
    input_size: tuple[int, int],
    image_size: tuple[int, int],
    orig_size: tuple[int, int],
    mask_threshold: float = 0.3,
    max_detections: int = 100,
    scores: Tensor | None = None,
) -> list[dict[str, Any]]:
    """COCO results for one image from the last stage's predictions
    (trainer/inference/instances.py).

    class_logits: (N, C) logits, N kernels, C classes (C == len(category_ids)).
    mask_logits: (N, h, w) logits on the mask grid (h = Hp / mask_stride, w = Wp / mask_stride).
    input_size: (Hp, Wp) padded network input; image_size: (h_img, w_img) the resized image inside
    it (top-left); orig_size: (H, W) of the image on disk, the frame of the ground truth.
    scores: (N, C) detection scores when they are not the sigmoid of ``class_logits``.
    Returns up to ``max_detections`` dicts {"image_id", "category_id", "segmentation" (compressed
    RLE, counts as str), "bbox", "score"}, sorted by score descending, empty masks left out.
    """
    probs = class_logits.float().sigmoid() if scores is None else scores.float()
    if probs.shape[1] != len(category_ids):
        raise ValueError(f"{probs.shape[1]} class scores but {len(category_ids)} category ids")
    masks, score, labels, rles = decode(
        probs,
        mask_logits,
        input_size=input_size,
        image_size=image_size,
        orig_size=orig_size,
        mask_threshold=mask_threshold,
        max_detections=max_detections,
    )
    found = Instances(
        masks=masks.astype(bool),
        boxes=boxes_of(rles),
        scores=score,
        labels=labels,
        category_ids=[int(category_ids[int(c)]) for c in labels],
        rles=rles,
    )
    return found.to_coco(image_id)


def coco_mask_metrics(
    coco_gt: COCO,
    results: list[dict[str, Any]],
    image_ids: Iterable[int] | None = None,
    *,
    class_agnostic: bool = False,
) -> dict[str, float]:
    """Score ``results`` against ``coco_gt`` with COCOeval(iouType="segm").

    image_ids: the images that were evaluated (default: all ground-truth images); an image with no
    detection still counts its ground truth as missed. class_agnostic: COCOeval's useCats=0, any
    detection may match any object (object-discovery AP; the class prediction is ignored).
    Returns fractions in [0, 1] keyed by METRIC_NAMES; pycocotools' -1 (no ground truth in that
    area range) is kept as -1.
    """
    quiet = io.StringIO()  # pycocotools prints progress; the caller prints the table
    with contextlib.redirect_stdout(quiet):
        if results:
            # loadRes adds "id", "area" and a NumPy "bbox" to each dict: give it copies.
            coco_dt = coco_gt.loadRes([dict(r) for r in results])
        else:
            # loadRes cannot take an empty list; an empty result set scores 0 where there is
            # ground truth, exactly what COCOeval gives for an image with no detection.
            coco_dt = COCO()
            coco_dt.dataset = {
                "images": list(coco_gt.dataset["images"]),
                "categories": list(coco_gt.dataset["categories"]),
                "annotations": [],
            }
            coco_dt.createIndex()
        ev = COCOeval(coco_gt, coco_dt, iouType="segm")
        ev.params.useCats = 0 if class_agnostic else 1
        if image_ids is not None:
            ev.params.imgIds = sorted(set(int(i) for i in image_ids))
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    return {name: float(ev.stats[i]) for i, name in enumerate(METRIC_NAMES)}


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


def load_coco(path: str | Path) -> COCO:
    """pycocotools COCO for a ground-truth JSON, validated (pipeline/inputs/coco_file.py), without
    its
    prints; UserError when missing or malformed. Quiet: the evaluation dataset, built from the
    same file, has already listed any skipped annotation."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"annotation file not found: {path}")
    return load_coco_file(path, quiet=True, unlabelled_ok=True).to_coco()


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


def format_table(rows: dict[str, dict[str, Any]], extra: Sequence[str] = ()) -> str:
    """A markdown table, one row per name, AP columns in percent (as the paper reports them)."""
    head = ["run", *METRIC_NAMES, *extra]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, m in rows.items():
        cells = [name]
        for key in METRIC_NAMES:
            v = m.get(key)
            cells.append("n/a" if v is None or v < 0 else f"{100 * v:.1f}")
        cells += [str(m.get(key, "")) for key in extra]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


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
