"""Build the embedded demo dataset (version 2): pasted shapes on subject-free backgrounds.

``python -m pipeline data [--out DIR] [--preview PNG]`` writes, deterministically from
``data.seed``::

    OUT/train/train_000000.jpg ...        OUT/annotations/instances_train.json
    OUT/val/val_000000.jpg ...            OUT/annotations/instances_val.json
    OUT/summary.json                      counts, data version and the annotation files' digest

Backgrounds are material without a salient subject (texture photographs, strongly magnified or
blurred regions of photographs; ``pipeline.demo.sources``), so every salient thing in an image is
a labelled instance. Each image holds 1-6 objects of six classes defined by SHAPE only
(``pipeline.demo.shapes``); every object is filled with a crop of a photograph, with hue,
saturation and brightness jittered independently of its class, so colour carries no class
information. Objects are pasted in random order at random scales (COCO small, medium and large
all occur), rotations and positions, so later ones occlude earlier ones. Masks are exact: a pixel
belongs to the last object whose anti-aliased alpha there is >= 0.5, and an instance that ends up
mostly hidden is not pasted at all, so every object pixel in an image is labelled.

Every image is a pure function of ``(seed, split, index)`` (its own numpy Generator), so the
annotation JSON is byte-identical for the same seed. A folder made by another data version or
other settings is rebuilt whole (never mixed); ``--if-stale`` skips the build when it is current.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
from pycocotools import mask as mask_utils

from pipeline.atomic_files import with_path, write_json
from pipeline.cli import UserError, record_run
from pipeline.config import DataConfig, load_pipeline_config
from pipeline.demo.preview import write_preview
from pipeline.demo.shapes import CATEGORIES, clip, full_mask, place_shape, visible
from pipeline.demo.sources import (
    PHOTOS,
    colour_jitter,
    crop_resized,
    load_photos,
    render_background,
)

# Bumped whenever the same seed would render other pixels or labels; a folder holding another
# version is rebuilt whole. 1: photograph crops as backgrounds. 2: subject-free backgrounds.
DATA_VERSION = 2
SPLITS = {"train": 0, "val": 1}  # split code mixed into each image's seed
JPEG_QUALITY = 92
MAX_OBJECTS = 6
MIN_VISIBLE_PIXELS = 24  # an instance with fewer visible pixels is not pasted
MIN_VISIBLE_FRACTION = 0.25  # ... nor one with less than this share of its shape visible


@dataclass
class Sample:
    """One rendered image and its exact instance masks (after occlusion)."""

    image: np.ndarray  # (H, W, 3) uint8 RGB, before JPEG compression
    masks: np.ndarray  # (K, H, W) bool, pairwise disjoint, every one non-empty
    labels: np.ndarray  # (K,) int64 category ids in 1..len(CATEGORIES)


def image_rng(seed: int, split: str, index: int) -> np.random.Generator:
    """The Generator of one image: independent of every other image, so order does not matter."""
    return np.random.default_rng([seed, SPLITS[split], index])


def _plan_objects(
    rng: np.random.Generator, height: int, width: int
) -> tuple[list, list[np.ndarray]]:
    """Draw 1..MAX_OBJECTS objects and their visible masks, dropping the mostly hidden ones.

    Every object is planned first, then the ones later objects would hide almost entirely are
    dropped, so that nothing is painted that is not labelled (dropping one only uncovers others).
    """
    n = int(rng.integers(1, MAX_OBJECTS + 1))
    placed = [
        place_shape(rng, int(rng.integers(1, len(CATEGORIES) + 1)), height, width) for _ in range(n)
    ]
    full = [full_mask(p, height, width) for p in placed]
    vis = visible(full)
    keep = [
        i
        for i, (p, v) in enumerate(zip(placed, vis))
        if (a := int(v.sum())) >= MIN_VISIBLE_PIXELS and a >= MIN_VISIBLE_FRACTION * p.area
    ]
    return [placed[i] for i in keep], visible([full[i] for i in keep])


def _object_texture(rng: np.random.Generator, background: str, h: int, w: int) -> np.ndarray:
    """An object's fill: a crop of a photograph other than the background's, with a colour drawn
    independently of its class and a linear light gradient (not flat-shaded): float32 (h, w, 3)."""
    names = [n for n in PHOTOS if n != background]
    crop = crop_resized(rng, load_photos()[names[int(rng.integers(len(names)))]], h, w, zoom=2.0)
    texture = colour_jitter(rng, crop, hue=90, sat_add=90, gain=0.4)
    gy, gx = np.mgrid[-1 : 1 : h * 1j, -1 : 1 : w * 1j].astype(np.float32)
    direction = rng.uniform(0, 2 * np.pi)
    shade = 1.0 + rng.uniform(0, 0.3) * (math.cos(direction) * gx + math.sin(direction) * gy)
    return texture * shade[:, :, None]


def render_sample(seed: int, split: str, index: int, cfg: DataConfig) -> Sample:
    """Render image ``index`` of ``split``, a pure function of its arguments (sizes: ``cfg``)."""
    rng = image_rng(seed, split, index)
    height = int(rng.integers(cfg.min_size, cfg.max_size + 1))
    width = int(rng.integers(cfg.min_size, cfg.max_size + 1))
    canvas, background = render_background(rng, height, width)
    placed, vis = _plan_objects(rng, height, width)
    for p in placed:
        texture = _object_texture(rng, background, *p.alpha.shape)
        ys, xs, cy, cx = clip(p, height, width)
        a = p.alpha[cy, cx][:, :, None]
        canvas[ys, xs] = a * texture[cy, cx] + (1.0 - a) * canvas[ys, xs]
    image = np.clip(np.round(canvas), 0, 255).astype(np.uint8)
    masks = np.stack(vis) if vis else np.zeros((0, height, width), bool)
    labels = np.array([p.label for p in placed], np.int64)
    return Sample(image, masks, labels)


# --------------------------------------------------------------------------------------------
# COCO files


def area_bucket(area: int) -> str:
    """COCO's size classes: small < 32^2 <= medium < 96^2 <= large."""
    return "small" if area < 32**2 else "medium" if area < 96**2 else "large"


def _file_name(split: str, index: int) -> str:
    return f"{split}_{index:06d}.jpg"


def build_split(out_dir: Path, split: str, count: int, cfg: DataConfig) -> dict:
    """Render, write ``split``'s JPEGs and its annotation JSON; return its summary counts."""
    image_dir = out_dir / split
    image_dir.mkdir(parents=True, exist_ok=True)
    names = {_file_name(split, i) for i in range(count)}
    for stale in image_dir.glob(f"{split}_*.jpg"):  # left by an earlier, larger build
        if stale.name not in names:
            stale.unlink()

    images, annotations = [], []
    per_category = dict.fromkeys(CATEGORIES, 0)
    buckets = {"small": 0, "medium": 0, "large": 0}
    for index in range(count):
        sample = render_sample(cfg.seed, split, index, cfg)
        height, width = sample.image.shape[:2]
        ok, jpeg = cv2.imencode(
            ".jpg", sample.image[:, :, ::-1], [cv2.IMWRITE_JPEG_QUALITY, JPEG_QUALITY]
        )
        if not ok:
            raise RuntimeError("JPEG encoding failed")
        name = _file_name(split, index)
        try:
            (image_dir / name).write_bytes(jpeg.tobytes())
        except OSError as e:  # a failed write() names no file: name it for the one-line error
            raise with_path(e, image_dir / name) from None
        image_id = index + 1
        images.append({"id": image_id, "file_name": name, "height": height, "width": width})
        for mask, label in zip(sample.masks, sample.labels):
            rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
            area = int(mask.sum())
            annotations.append(
                {
                    "id": len(annotations) + 1,
                    "image_id": image_id,
                    "category_id": int(label),
                    "segmentation": {
                        "size": [height, width],
                        "counts": rle["counts"].decode("ascii"),
                    },
                    "area": area,
                    "bbox": [float(v) for v in mask_utils.toBbox(rle)],
                    "iscrowd": 0,
                }
            )
            per_category[CATEGORIES[label - 1]] += 1
            buckets[area_bucket(area)] += 1

    coco = {
        "info": {
            "description": "Saliency Prompt embedded demo dataset (pipeline.demo.data): "
            "shapes pasted on subject-free backgrounds",
            "version": str(DATA_VERSION),
            "seed": cfg.seed,
            "split": split,
        },
        "licenses": [],
        "images": images,
        "annotations": annotations,
        "categories": [
            {"id": i + 1, "name": n, "supercategory": "shape"} for i, n in enumerate(CATEGORIES)
        ],
    }
    write_json(out_dir / "annotations" / f"instances_{split}.json", coco, indent=None)
    return {
        "images": len(images),
        "instances": len(annotations),
        "per_category": per_category,
        "area": buckets,
    }


def check_config(cfg: DataConfig) -> None:
    """Reject generator settings that cannot make a sensible dataset (UserError, one line)."""
    if cfg.seed < 0:
        raise UserError(f"data.seed must be >= 0, got {cfg.seed}")
    if cfg.num_train < 0 or cfg.num_val < 0:
        raise UserError("data.num_train and data.num_val must be >= 0")
    if not 32 <= cfg.min_size <= cfg.max_size:
        raise UserError(
            f"need 32 <= data.min_size <= data.max_size, got {cfg.min_size} and {cfg.max_size}"
        )


def build_demo_dataset(out_dir: Path, cfg: DataConfig) -> dict:
    """Write the whole dataset under ``out_dir``; return ``{"train": counts, "val": counts}``."""
    check_config(cfg)
    out_dir = Path(out_dir)
    return {
        split: build_split(out_dir, split, count, cfg)
        for split, count in (("train", cfg.num_train), ("val", cfg.num_val))
    }


# --------------------------------------------------------------------------------------------
# Command line


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", default=None, help="output folder (default: data.root)")
    parser.add_argument(
        "--preview",
        default=None,
        metavar="PNG",
        help="also draw ~6 train samples with their masks into this PNG",
    )
    parser.add_argument(
        "--if-stale",
        action="store_true",
        help="do nothing when OUT already holds this data version with these settings",
    )
    parser.add_argument(
        "--overwrite",
        action="store_true",
        help="build into OUT even when it holds files this command did not write",
    )


def dataset_state(out_dir: Path, cfg: DataConfig) -> dict:
    """What a current build of ``cfg`` in ``out_dir`` records: data version and settings."""
    return {"data_version": DATA_VERSION, "settings": dataclasses.asdict(cfg)}


def annotations_digest(out_dir: Path) -> str:
    """sha256 over both annotation files: names the exact labels downstream runs were made from."""
    h = hashlib.sha256()
    for split in SPLITS:
        path = Path(out_dir) / "annotations" / f"instances_{split}.json"
        h.update(path.read_bytes() if path.is_file() else b"")
    return h.hexdigest()


def is_current(out_dir: Path, cfg: DataConfig) -> bool:
    """True when ``out_dir`` holds a complete build of this data version and these settings."""
    try:
        summary = json.loads((Path(out_dir) / "summary.json").read_text())
    except (OSError, ValueError):
        return False
    want = dataset_state(out_dir, cfg)
    return (
        isinstance(summary, dict)
        and all(summary.get(k) == v for k, v in want.items())
        and summary.get("digest") == annotations_digest(out_dir)
    )


MARKER = ".demo-data"  # written first into every folder this command builds


def check_out_is_ours(out: Path, overwrite: bool) -> None:
    """Refuse to build into a folder holding files this command did not write (a user's own
    annotations and images), unless ``overwrite``: missing, empty, or marked folders only."""
    if overwrite or not out.exists() or (out / MARKER).is_file():
        return
    try:
        made_here = "data_version" in json.loads((out / "summary.json").read_text())
    except (OSError, ValueError, TypeError):
        made_here = False  # (marker-less builds of earlier versions carry a summary)
    if made_here:
        return
    if not out.is_dir():
        raise UserError(f"--out {out} is not a folder")
    found = sorted(p.name for p in out.iterdir())
    if found:
        shown = ", ".join(found[:3]) + (" ..." if len(found) > 3 else "")
        raise UserError(
            f"{out} holds files this command did not write ({shown}); choose another --out, "
            "or pass --overwrite to replace its annotations and images"
        )


def run(args: argparse.Namespace) -> int:
    cfg, raw = load_pipeline_config(args.config, args.overrides)
    out = Path(args.out or cfg.data.root)
    check_config(cfg.data)
    check_out_is_ours(out, args.overwrite)
    out.mkdir(parents=True, exist_ok=True)
    (out / MARKER).write_text("built by `python -m pipeline data`\n")
    if args.if_stale and is_current(out, cfg.data):
        print(f"{out}: demo data version {DATA_VERSION} is up to date")
        return 0
    start = time.perf_counter()
    # Another version's summary goes first: a build killed half-way is then never "current".
    (out / "summary.json").unlink(missing_ok=True)
    counts = build_demo_dataset(out, cfg.data)
    seconds = time.perf_counter() - start
    # The fully resolved stage-one sections, plus any trainer sections of the file as given.
    record_run(out, {**raw, **dataclasses.asdict(cfg)})
    state = {**dataset_state(out, cfg.data), "digest": annotations_digest(out)}
    write_json(out / "summary.json", {**counts, **state})
    for split, c in counts.items():
        cats = ", ".join(f"{k} {v}" for k, v in c["per_category"].items())
        sizes = ", ".join(f"{k} {v}" for k, v in c["area"].items())
        print(f"{split}: {c['images']} images, {c['instances']} instances ({cats}; {sizes})")
    total = sum(c["images"] for c in counts.values())
    print(
        f"wrote {out} (data version {DATA_VERSION}, digest {state['digest'][:12]}) in "
        f"{seconds:.1f} s ({total / max(seconds, 1e-9):.1f} images/s)"
    )
    if args.preview:
        write_preview(out, Path(args.preview))
        print(f"preview: {args.preview}")
    return 0


__all__ = [
    "CATEGORIES",
    "PHOTOS",
    "Sample",
    "build_demo_dataset",
    "render_sample",
    "write_preview",
    "area_bucket",
    "image_rng",
]
