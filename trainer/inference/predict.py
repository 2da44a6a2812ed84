"""Run a trained model on your own images: COCO-results detections and overlay pictures.

    python -m trainer predict --checkpoint CKPT --images DIR|COCO_JSON|FILE ... [--out DIR]
                              [--render] [--score-threshold S] [--max-detections N]
                              [--mask-nms IOU] [--short-side N] [--max-side N]

A fine-tuning checkpoint labels detections with the class names it recorded; a pre-training
checkpoint finds class-agnostic "object"s. Writes into ``--out`` (default: ``predict-<stem>/``
beside the checkpoint's run):

- ``detections.json``: COCO results (image_id, category_id, RLE segmentation, bbox x, y, w, h,
  score), best first per image;
- ``images.json``: the images (id, file_name, height, width) and categories, with no annotations,
  so ``COCO("images.json").loadRes("detections.json")`` reads the detections;
- ``summary.json``: the settings, counts, throughput, and every skipped file with its reason;
- with ``--render``, ``render/<file name>.png``: masks, boxes and "class score" labels drawn over
  each image.

Inputs: folders (searched recursively), image files, or a COCO JSON (its images under
``--image-root``; labels ignored, ids kept when it is the only input; otherwise images are
numbered 1, 2, ... in input order). Unreadable, truncated, non-image and over-limit files
(``data.max_image_pixels`` / ``data.max_image_mb``) are skipped, counted and listed.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

from pipeline.atomic_files import write_json
from pipeline.cli import UserError
from pipeline.inputs.image_files import ImageLimits, UnreadableImage
from pipeline.inputs.images import decode_image
from pipeline.inputs.listing import ImageItem, list_images
from trainer.inference.predictor import Predictor

# A run with more skips than this lists the first ones on the terminal (all in summary.json).
_SHOWN_SKIPS = 10


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--checkpoint", required=True, help="fine-tuning or pre-training .pt")
    parser.add_argument(
        "--images", nargs="+", required=True, metavar="PATH", help="folders, files or a COCO JSON"
    )
    parser.add_argument("--image-root", default="", help="image folder of a COCO JSON input")
    parser.add_argument("--out", default="", help="folder (default: predict-<ckpt> in its run)")
    parser.add_argument("--render", action="store_true", help="write overlay PNGs to OUT/render")
    parser.add_argument(
        "--score-threshold",
        type=float,
        default=0.3,
        help="keep detections scoring at least this (default 0.3; 0 keeps all, as evaluate)",
    )
    parser.add_argument(
        "--max-detections", type=int, default=None, help="default: finetune.max_detections"
    )
    parser.add_argument(
        "--mask-nms",
        type=float,
        default=None,
        metavar="IOU",
        help="per-class mask NMS (0: off; default: the checkpoint's model.test_nms_iou)",
    )
    parser.add_argument("--short-side", type=int, default=None, help="default: the checkpoint's")
    parser.add_argument("--max-side", type=int, default=None, help="default: the checkpoint's")
    parser.epilog = (
        "The model settings come from the checkpoint's own config; --set overrides them; "
        "--config is not read."
    )


def default_out(checkpoint: Path) -> Path:
    """runs/x/finetune-0.05/checkpoints/last.pt -> runs/x/finetune-0.05/predict-last."""
    folder = checkpoint.parent
    if folder.name == "checkpoints":
        folder = folder.parent
    return folder / f"predict-{checkpoint.stem}"


def gather(sources: list[str], image_root: str) -> list[ImageItem]:
    """The images of every source, in order; a COCO JSON's ids are kept when it is the only
    source. UserError for a missing source or when nothing is left to read."""
    items: list[ImageItem] = []
    for source in sources:
        path = Path(source)
        if path.is_file() and path.suffix.lower() != ".json":
            items.append(ImageItem(path.name, 0, path))
        else:
            items += list_images(path, image_root or None)
    if not items:
        raise UserError(f"no images in {' '.join(sources)}")
    keep_ids = len(sources) == 1 and Path(sources[0]).suffix.lower() == ".json"
    if not keep_ids:
        items = [ImageItem(it.file_name, i + 1, it.path) for i, it in enumerate(items)]
    return items


def _check_settings(args: argparse.Namespace) -> None:
    for name in ("max_detections", "short_side", "max_side"):
        value = getattr(args, name)
        if value is not None and value < 1:
            raise UserError(f"--{name.replace('_', '-')} must be >= 1, got {value}")
    if not 0.0 <= args.score_threshold <= 1.0 or not 0.0 <= (args.mask_nms or 0.0) <= 1.0:
        raise UserError("--score-threshold and --mask-nms must lie in [0, 1]")


def predict_images(
    predictor: Predictor, items: list[ImageItem], out: Path, render: bool
) -> dict[str, Any]:
    """Run over ``items``; write detections.json, images.json (and overlays); return counts."""
    from tqdm import tqdm

    from trainer.inference.overlay import write_overlay

    limits = ImageLimits.from_data(predictor.config.data) if predictor.config else None
    results: list[dict[str, Any]] = []
    images: list[dict[str, Any]] = []
    skipped: list[dict[str, str]] = []
    t0 = time.perf_counter()
    for item in tqdm(items, desc="predict", unit="image", dynamic_ncols=True):
        try:
            rgb = decode_image(item.path, limits=limits)
        except (UnreadableImage, OSError) as e:
            reason = e.strerror if isinstance(e, OSError) and e.strerror else str(e)
            skipped.append({"file": str(item.path), "reason": reason})
            continue
        found = predictor(rgb)
        results += found.to_coco(item.image_id)
        h, w = rgb.shape[:2]
        images.append({"id": item.image_id, "file_name": item.file_name, "height": h, "width": w})
        if render:
            name = item.file_name.replace("/", "__") + ".png"
            write_overlay(out / "render" / name, rgb, found)
    seconds = time.perf_counter() - t0
    write_json(out / "detections.json", results, indent=None)
    categories = [{"id": i, "name": n} for i, n in dict(predictor.categories).items()]
    write_json(out / "images.json", {"images": images, "categories": categories, "annotations": []})
    return {
        "images": len(images),
        "detections": len(results),
        "skipped": skipped,
        "seconds": seconds,
        "images_per_second": len(images) / seconds if seconds > 0 else 0.0,
    }


def run(args: argparse.Namespace) -> int:
    from trainer.engine.distributed import init_distributed

    _check_settings(args)
    items = gather(args.images, args.image_root)
    path = Path(args.checkpoint)
    predictor = Predictor.from_checkpoint(
        path,
        device=init_distributed(),
        overrides=args.overrides,
        score_threshold=args.score_threshold,
        max_detections=args.max_detections,
        nms_iou=args.mask_nms,
        short_side=args.short_side,
        max_side=args.max_side,
    )
    out = Path(args.out) if args.out else default_out(path)
    out.mkdir(parents=True, exist_ok=True)
    counts = predict_images(predictor, items, out, args.render)
    s = predictor.settings
    write_json(
        out / "summary.json",
        {
            "checkpoint": str(path),
            "settings": vars(s),
            "categories": predictor.categories,
            **counts,
        },
    )
    print(
        f"predict: {counts['detections']} detections (score >= {s.score_threshold:g}) on "
        f"{counts['images']} images, {counts['images_per_second']:.2f} images/s: "
        f"{out / 'detections.json'}" + (f"; overlays in {out / 'render'}" if args.render else "")
    )
    skipped = counts["skipped"]
    if skipped:
        print(f"predict: skipped {len(skipped)} files (all in {out / 'summary.json'}):")
        for skip in skipped[:_SHOWN_SKIPS]:
            print(f"  {skip['file']}: {skip['reason']}")
    if not counts["images"]:
        raise UserError(f"no image could be read ({len(skipped)} skipped, listed above)")
    return 0
