"""Evaluate a fine-tuned K-Net, Mask2Former or Mask R-CNN: COCO mask AP, AP50, AP75, APs, APm, APl.

``python -m trainer evaluate --checkpoint CKPT [--out FILE]`` loads a fine-tuning checkpoint and
scores it on the config's validation set (``data.val_json`` / ``data.val_images``).

Test-time decoding follows K-Net's ``KernelIterHead.simple_test`` (METHOD.md, stage three):
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

The Mask R-CNN reference decodes itself (its ``coco_results``): torchvision's detections, boxes
and masks pasted into the original image by torchvision, binarised at 0.5 as torchvision's
reference evaluation does; the COCO results and their scoring are the same as for the others.

Detections whose binary mask is empty are dropped: an empty mask matches no object (IoU 0), so it
cannot change AP, and keeping it would only bloat the results file.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import io
import sys
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from pycocotools import mask as mask_util
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval
from torch import Tensor, nn
from torch.utils.data import DataLoader

from pipeline.atomic_files import write_json
from pipeline.cli import UserError
from pipeline.coco_file import load_coco_file
from pipeline.config import apply_override, from_dict
from pipeline.image_files import ImageLimits
from pipeline.precision import autocast, stage_precision
from trainer.checkpoint import load_checkpoint, load_matching, model_state, training_config
from trainer.config import Config
from trainer.datasets import CocoDataset, Collate
from trainer.loader import worker_context, worker_init
from trainer.transforms import Augment

METRIC_NAMES = ("AP", "AP50", "AP75", "APs", "APm", "APl")  # order of COCOeval.stats[0:6]

# Masks are resized in groups of this many, so 100 detections on an 800 x 1333 image never hold
# 100 full-size float maps at once (~430 MB) on the device.
_RESIZE_CHUNK = 16


@torch.no_grad()
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
    """COCO results for one image from the last stage's predictions.

    class_logits: (N, C) logits, N kernels, C classes (C == len(category_ids)).
    mask_logits: (N, h, w) logits on the mask grid (h = Hp / mask_stride, w = Wp / mask_stride).
    input_size: (Hp, Wp) padded network input; image_size: (h_img, w_img) the resized image inside
    it (top-left); orig_size: (H, W) of the image on disk, the frame of the ground truth.
    scores: (N, C) detection scores when they are not the sigmoid of ``class_logits`` (a model's
    ``detection_scores``; Mask2Former: softmax without no-object, times the mask score).
    Returns up to ``max_detections`` dicts {"image_id", "category_id", "segmentation" (compressed
    RLE, counts as str), "score"}, sorted by score descending, empty masks left out.
    """
    probs = class_logits.float().sigmoid() if scores is None else scores.float()
    num_kernels, num_classes = probs.shape
    if num_classes != len(category_ids):
        raise ValueError(f"{num_classes} class scores but {len(category_ids)} category ids")
    flat = probs.flatten()  # (N*C,), kernel-major
    k = min(max_detections, flat.numel())
    top_scores, top_index = flat.topk(k, sorted=True)
    kernels = torch.div(top_index, num_classes, rounding_mode="floor")
    labels = top_index % num_classes

    h_img, w_img = image_size
    binary = []
    for start in range(0, k, _RESIZE_CHUNK):
        chunk = mask_logits[kernels[start : start + _RESIZE_CHUNK]].float().sigmoid()[None]
        chunk = F.interpolate(chunk, size=input_size, mode="bilinear", align_corners=False)
        chunk = chunk[:, :, :h_img, :w_img]  # drop the zero padding (bottom/right)
        chunk = F.interpolate(chunk, size=orig_size, mode="bilinear", align_corners=False)
        binary.append((chunk[0] > mask_threshold).cpu())
    if not binary:
        return []
    return encode_detections(
        torch.cat(binary),
        top_scores,
        [category_ids[int(c)] for c in labels],
        image_id=image_id,
    )


def encode_detections(
    masks: Tensor, scores: Tensor, category_ids: Sequence[int], *, image_id: int
) -> list[dict[str, Any]]:
    """COCO results {"image_id", "category_id", "segmentation" (compressed RLE, counts as str),
    "score"} of k detections: masks (k, H, W) bool at the original image size, scores (k,),
    one COCO category id each; empty masks are left out, the order is kept."""
    k = len(category_ids)
    if k == 0:
        return []
    masks = masks.cpu().numpy().astype(np.uint8)  # (k, H, W)
    # pycocotools wants (H, W, k) in Fortran order.
    rles = mask_util.encode(np.asfortranarray(masks.transpose(1, 2, 0)))
    areas = masks.reshape(k, -1).sum(1)
    results = []
    for i in range(k):
        if areas[i] == 0:
            continue
        rle = rles[i]
        results.append(
            {
                "image_id": int(image_id),
                "category_id": int(category_ids[i]),
                "segmentation": {"size": list(rle["size"]), "counts": rle["counts"].decode()},
                "score": float(scores[i]),
            }
        )
    return results


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


def detection_scores(model: nn.Module, stage: dict[str, Tensor]) -> Tensor:
    """(B, N, C) detection scores of a prediction: the model's own ``detection_scores`` where
    it has one (Mask2Former), else the sigmoid class probabilities (K-Net)."""
    own = getattr(model, "detection_scores", None)
    return own(stage) if own is not None else stage["logits"].float().sigmoid()


def batch_results(
    model: nn.Module,
    images: Any,
    infos: Sequence[dict[str, Any]],
    category_ids: Sequence[int],
    mask_threshold: float,
    max_detections: int,
) -> list[dict[str, Any]]:
    """COCO results of one batch: a model with its own decoding (``coco_results``: Mask R-CNN,
    whose masks torchvision pastes and binarises at 0.5) decodes itself; a query-based model's
    last stage goes through :func:`image_results`."""
    own = getattr(model, "coco_results", None)
    if own is not None:
        return own(images, infos, category_ids, max_detections)
    last = model(images)["stages"][-1]
    last = {k: v.float() if torch.is_tensor(v) else v for k, v in last.items()}
    with torch.autocast(last["masks"].device.type, enabled=False):  # decode in fp32 whatever
        return _decode(model, last, images, infos, category_ids, mask_threshold, max_detections)


def _decode(model, last, images, infos, category_ids, mask_threshold, max_detections):
    """:func:`batch_results`' decoding of a query-based model's last stage, image by image."""
    scores = detection_scores(model, last)
    results = []
    for i, info in enumerate(infos):
        results += image_results(
            last["logits"][i],
            last["masks"][i],
            scores=scores[i],
            image_id=info["image_id"],
            category_ids=category_ids,
            input_size=tuple(images.shape[-2:]),
            image_size=tuple(info["image_size"]),
            orig_size=tuple(info["orig_size"]),
            mask_threshold=mask_threshold,
            max_detections=max_detections,
        )
    return results


def _unwrap(model: nn.Module) -> nn.Module:
    """The KNet inside an Objective and/or DistributedDataParallel wrapper."""
    model = getattr(model, "module", model)
    return getattr(model, "knet", model)


@torch.no_grad()
def evaluate(
    knet: nn.Module,
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
    """Mask AP of ``knet`` over one pass of ``loader`` against ``coco_gt``.

    knet: a KNet (an Objective or DDP wrapper around one is unwrapped). It is run in eval mode and
    put back in its previous mode afterwards (the engine calls this in the middle of training).
    loader: finite, yields trainer Batches whose ``infos`` carry "image_id", "orig_size",
    "image_size", "input_size" (trainer/datasets.py, evaluation Augment: resize only).
    category_ids: COCO id of each contiguous class; default ``loader.dataset.cat_ids``.
    results_path: where to write the COCO results JSON (optional).
    class_agnostic: score with COCOeval useCats=0 (see :func:`coco_mask_metrics`).
    inputs: as the engine's: batch images -> the model's input (frozen, maybe cached, levels).
    precision: the forward pass's autocast (pipeline.precision); scores and masks are fp32.
    Returns METRIC_NAMES (fractions, -1 where pycocotools has no ground truth) plus "images"
    (images evaluated) and "detections" (results kept). Only the images seen are scored.
    """
    knet = _unwrap(knet)
    device = torch.device(device)
    if category_ids is None:
        category_ids = getattr(getattr(loader, "dataset", None), "cat_ids", None)
        if category_ids is None:
            raise ValueError("category_ids not given and the loader's dataset has no cat_ids")
    category_ids = [int(c) for c in category_ids]
    if getattr(knet, "num_classes", len(category_ids)) != len(category_ids):
        raise UserError(
            f"the model predicts {knet.num_classes} classes but the evaluation set has "
            f"{len(category_ids)} categories"
        )
    was_training = knet.training
    knet.eval()
    results: list[dict[str, Any]] = []
    seen: list[int] = []
    try:
        batches = loader
        if progress:
            from tqdm import tqdm

            batches = tqdm(loader, desc="evaluate", dynamic_ncols=True)
        for batch in batches:
            images = batch.images.to(device, non_blocking=device.type == "cuda")
            if inputs is not None:  # a frozen backbone's levels (trainer.frozen_features)
                images = inputs(images, batch.infos)
            seen += [int(info["image_id"]) for info in batch.infos]
            with autocast(precision, device):
                results += batch_results(
                    knet, images, batch.infos, category_ids, mask_threshold, max_detections
                )
    finally:
        knet.train(was_training)
    if not seen:
        raise UserError("the evaluation loader yielded no image")
    if results_path is not None:
        write_json(results_path, results, indent=None)
    metrics = coco_mask_metrics(coco_gt, results, image_ids=seen, class_agnostic=class_agnostic)
    return {**metrics, "images": float(len(seen)), "detections": float(len(results))}


def load_coco(path: str | Path) -> COCO:
    """pycocotools COCO for a ground-truth JSON, validated (pipeline/coco_file.py), without its
    prints; UserError when missing or malformed. Quiet: the evaluation dataset, built from the
    same file, has already listed any skipped annotation."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"annotation file not found: {path}")
    return load_coco_file(path, quiet=True).to_coco()


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
    ``store``: a frozen-feature cache (``trainer.feature_cache.FeatureStore``) to read from.

    Not sharded over torch.distributed ranks: evaluation runs on rank 0 only and must see the
    whole set.
    """
    ft = cfg.finetune
    dataset = CocoDataset(
        cfg.data.val_json,
        cfg.data.val_images,
        Augment(ft.short_side, ft.max_side),
        train=False,
        with_masks=False,
        limits=ImageLimits.from_data(cfg.data),
        allow_outside_root=cfg.data.allow_outside_root,
    )
    if store is not None:
        from trainer.feature_cache import CachedDataset

        dataset = CachedDataset(dataset, store)
    workers = ft.num_workers if num_workers is None else num_workers
    return DataLoader(
        dataset,
        batch_size=ft.batch_size,
        shuffle=False,
        num_workers=workers,
        collate_fn=Collate(size_divisor),
        # Same start method as the training loader (see trainer/loader.py: fork can deadlock),
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
    from pipeline.backbones import build_backbone
    from trainer.distributed import init_distributed
    from trainer.eval_inputs import check_output, check_validation_images, validation_error
    from trainer.feature_cache import cache_dir, frozen_inputs
    from trainer.model.factory import build_model

    path = Path(args.checkpoint)
    out = Path(args.out) if args.out else default_output(path, args.class_agnostic)
    check_output(out)  # before any work: a folder that cannot take the result is refused now
    state = load_checkpoint(path)
    raw, num_classes = training_config(state, path)
    raw = copy.deepcopy(raw)
    for assignment in args.overrides:
        apply_override(raw, assignment)
    cfg = from_dict(Config, raw)
    if args.batch_size > 0:
        cfg.finetune.batch_size = args.batch_size
    coco_gt = load_coco(cfg.data.val_json)
    check_validation_images(cfg, coco_gt.dataset)
    device = init_distributed()
    knet = build_model(cfg.model, build_backbone(cfg.backbone), int(num_classes))
    # strict: every tensor must fit (a frozen backbone is filled in from backbone.weights)
    load_matching(knet, model_state(state, knet, path), allowed_skips=())
    knet.to(device)
    # A checkpoint's backbone is frozen here: evaluation reads the same levels as training did,
    # from the feature cache when finetune.feature_cache is on.
    _, frozen, store = frozen_inputs(
        knet.backbone,
        enabled=cfg.finetune.feature_cache,
        cache_dir=cache_dir(cfg, cfg.finetune),
        stage="finetune",
        datasets=[],
        precision=stage_precision(cfg.finetune, device, "finetune"),
    )
    loader = build_eval_loader(cfg, knet.size_divisor, store=store)
    category_ids = list(loader.dataset.cat_ids)
    if not args.class_agnostic:
        check_categories(
            path, state.get("categories"), cfg.data.val_json, loader.dataset.categories
        )
    if args.class_agnostic and len(category_ids) != int(num_classes):
        # A pre-training checkpoint predicts one "object" class: label its detections with the
        # first category; useCats=0 makes the label irrelevant to the score.
        category_ids = [category_ids[0]] * int(num_classes)
    try:
        metrics = evaluate(
            knet,
            loader,
            coco_gt,
            device,
            category_ids=category_ids,
            mask_threshold=cfg.finetune.test_mask_threshold,
            max_detections=cfg.finetune.max_detections,
            results_path=out.with_name(out.stem + "-segm.json"),
            progress=True,
            class_agnostic=args.class_agnostic,
            inputs=frozen,
            precision=stage_precision(cfg.finetune, device, "finetune"),
        )
    except UserError as e:
        raise validation_error(e) from None
    report = {
        "checkpoint": str(path),
        "iteration": state.get("iteration"),
        "val_json": cfg.data.val_json,
        "class_agnostic": args.class_agnostic,
        "metrics": metrics,
    }
    write_json(out, report)
    print(format_table({path.name: metrics}))
    print(f"metrics: {out}")
    print(f"detections: {out.with_name(out.stem + '-segm.json')}")
    return 0
