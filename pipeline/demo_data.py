"""Build the embedded demo dataset: scikit-image photographs with pasted shapes, COCO layout.

``python -m pipeline data [--out DIR] [--preview PNG]`` writes, deterministically from
``data.seed``::

    OUT/train/train_000000.jpg ...        OUT/annotations/instances_train.json
    OUT/val/val_000000.jpg ...            OUT/annotations/instances_val.json

Backgrounds are random crops (rescaled, flipped, mildly colour-jittered) of photographs that ship
inside scikit-image's own data folder, so nothing is downloaded. Each image holds 1-6 objects of
six classes defined by SHAPE only; every object is filled with a crop of a *different* photograph,
with hue, saturation and brightness jittered independently of its class, so colour carries no
class information. Objects are pasted in random order at random scales (COCO small, medium and
large all occur), rotations and positions, so later ones occlude earlier ones. Masks are exact:
a pixel belongs to the last object whose anti-aliased alpha there is >= 0.5, and an instance that
ends up mostly hidden is not pasted at all, so every object pixel in an image is labelled.

Every image is a pure function of ``(seed, split, index)`` (its own numpy Generator), so the
annotation JSON is byte-identical for the same seed and images could be made in parallel.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import functools
import io
import math
import time
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import skimage.data
from pycocotools import mask as mask_utils

from pipeline.atomic_files import write_json
from pipeline.cli import UserError, record_run
from pipeline.config import DataConfig, load_pipeline_config

# Class names, in category-id order (id = index + 1). Shapes only: colour and texture are random.
CATEGORIES = ["horse", "star", "ring", "cross", "crescent", "heart"]

# Photographs inside scikit-image's data folder (present without pooch downloads). Synthetic
# images (colour wheel, chessboard, phantom, logo), text pages and near-duplicates (the right
# motorcycle view) are left out; retina and cell are left out for their large flat borders.
PHOTOS = (
    "astronaut.png",
    "chelsea.png",
    "coffee.png",
    "motorcycle_left.png",
    "rocket.jpg",
    "hubble_deep_field.jpg",
    "ihc.png",
    "camera.png",
    "coins.png",
    "moon.png",
    "clock_motion.png",
    "brick.png",
    "grass.png",
    "gravel.png",
)

SPLITS = {"train": 0, "val": 1}  # split code mixed into each image's seed
JPEG_QUALITY = 92
MAX_OBJECTS = 6
MIN_VISIBLE_PIXELS = 24  # an instance with fewer visible pixels is not pasted
MIN_VISIBLE_FRACTION = 0.25  # ... nor one with less than this share of its shape visible
CANON_SIDE = 512  # longest side of the canonical (finest) shape raster


@dataclass
class Sample:
    """One rendered image and its exact instance masks (after occlusion)."""

    image: np.ndarray  # (H, W, 3) uint8 RGB, before JPEG compression
    masks: np.ndarray  # (K, H, W) bool, pairwise disjoint, every one non-empty
    labels: np.ndarray  # (K,) int64 category ids in 1..len(CATEGORIES)


# --------------------------------------------------------------------------------------------
# Sources: photographs and canonical shapes (loaded once per process)


@functools.lru_cache(maxsize=1)
def load_photos() -> tuple[np.ndarray, ...]:
    """The PHOTOS as (h, w, 3) uint8 RGB arrays (grey ones replicated to three channels)."""
    folder = Path(skimage.data.__file__).parent
    photos = []
    for name in PHOTOS:
        path = folder / name
        img = cv2.imread(str(path), cv2.IMREAD_COLOR)
        if img is None:
            raise UserError(f"scikit-image photograph missing: {path} (reinstall scikit-image)")
        photos.append(np.ascontiguousarray(img[:, :, ::-1]))
    return tuple(photos)


def _polygon_alpha(points: np.ndarray) -> np.ndarray:
    """Anti-aliased fill of a polygon given in [-1, 1]^2, rasterised on a CANON_SIDE square."""
    canvas = np.zeros((CANON_SIDE, CANON_SIDE), np.uint8)
    half = (CANON_SIDE - 8) / 2  # keep a small margin so the warp never clips the edge
    pix = (points * half + CANON_SIDE / 2) * 16  # 4 fractional bits (cv2 ``shift``)
    cv2.fillPoly(canvas, [np.round(pix).astype(np.int32)], 255, cv2.LINE_AA, shift=4)
    return canvas.astype(np.float32) / 255.0


def _disk_alpha(cx: float, cy: float, r: float) -> np.ndarray:
    """Anti-aliased disk (centre and radius in [-1, 1] units) on the canonical square."""
    half = (CANON_SIDE - 8) / 2
    coords = (np.arange(CANON_SIDE, dtype=np.float32) + 0.5 - CANON_SIDE / 2) / half
    d = np.hypot(coords[None, :] - cx, coords[:, None] - cy) * half  # distance in pixels
    return np.clip(r * half - d + 0.5, 0.0, 1.0)


def _canonical_shape(name: str) -> np.ndarray:
    """(h, w) float32 alpha in [0, 1] of one class, tight-cropped, longest side ~CANON_SIDE."""
    if name == "horse":
        # skimage's horse silhouette: False marks the horse.
        alpha = (~skimage.data.horse()).astype(np.float32)
    elif name == "star":
        angles = np.pi / 2 + np.arange(10) * np.pi / 5
        radii = np.where(np.arange(10) % 2 == 0, 1.0, 0.42)
        alpha = _polygon_alpha(np.stack([radii * np.cos(angles), -radii * np.sin(angles)], 1))
    elif name == "ring":
        alpha = _disk_alpha(0, 0, 1.0) * (1.0 - _disk_alpha(0, 0, 0.58))
    elif name == "cross":
        a = 0.3  # half arm width
        pts = [
            (-a, -1),
            (a, -1),
            (a, -a),
            (1, -a),
            (1, a),
            (a, a),
            (a, 1),
            (-a, 1),
            (-a, a),
            (-1, a),
            (-1, -a),
            (-a, -a),
        ]
        alpha = _polygon_alpha(np.array(pts, np.float64))
    elif name == "crescent":
        alpha = _disk_alpha(0, 0, 1.0) * (1.0 - _disk_alpha(0.45, -0.15, 0.82))
    elif name == "heart":
        t = np.linspace(0, 2 * np.pi, 400, endpoint=False)
        x = 16 * np.sin(t) ** 3
        y = -(13 * np.cos(t) - 5 * np.cos(2 * t) - 2 * np.cos(3 * t) - np.cos(4 * t))
        alpha = _polygon_alpha(np.stack([x, y + 2.5], 1) / 17.5)
    else:
        raise ValueError(name)
    ys, xs = np.nonzero(alpha > 0)
    alpha = alpha[ys.min() : ys.max() + 1, xs.min() : xs.max() + 1]
    scale = CANON_SIDE / max(alpha.shape)
    size = (round(alpha.shape[1] * scale), round(alpha.shape[0] * scale))
    alpha = cv2.resize(alpha, size, interpolation=cv2.INTER_LINEAR)
    return np.pad(np.clip(alpha, 0, 1), 2)  # zero border: the warp samples zeros outside


@functools.lru_cache(maxsize=1)
def shape_pyramids() -> tuple[tuple[np.ndarray, ...], ...]:
    """Per class, the canonical alpha halved repeatedly (area averaging) down to ~16 px.

    A small object is warped from the level just larger than it, so its edge stays anti-aliased
    instead of being point-sampled from a 512 px raster.
    """
    pyramids = []
    for name in CATEGORIES:
        levels = [_canonical_shape(name)]
        while max(levels[-1].shape) > 32:
            h, w = levels[-1].shape
            levels.append(cv2.resize(levels[-1], (w // 2, h // 2), interpolation=cv2.INTER_AREA))
        pyramids.append(tuple(levels))
    return tuple(pyramids)


# --------------------------------------------------------------------------------------------
# Rendering one image


def _crop_resized(
    rng: np.random.Generator, photo: np.ndarray, h: int, w: int, zoom: float
) -> np.ndarray:
    """A random crop of ``photo`` rescaled to (h, w), randomly flipped: (h, w, 3) uint8.

    The scale is drawn between the smallest that covers (h, w) and ``zoom`` times more (or full
    resolution, for big photos), log-uniformly.
    """
    ph, pw = photo.shape[:2]
    cover = max(h / ph, w / pw)
    top = max(cover * zoom, min(1.0, cover * 3.0))
    scale = math.exp(rng.uniform(math.log(cover), math.log(top)))
    ch, cw = min(ph, max(1, round(h / scale))), min(pw, max(1, round(w / scale)))
    y0, x0 = int(rng.integers(0, ph - ch + 1)), int(rng.integers(0, pw - cw + 1))
    crop = photo[y0 : y0 + ch, x0 : x0 + cw]
    interp = cv2.INTER_AREA if ch > h else cv2.INTER_LINEAR
    out = cv2.resize(crop, (w, h), interpolation=interp)
    if rng.random() < 0.5:
        out = out[:, ::-1]
    return np.ascontiguousarray(out)


def _colour_jitter(
    rng: np.random.Generator, rgb: np.ndarray, hue: float, sat_add: float, gain: float
) -> np.ndarray:
    """Random hue rotation, saturation and brightness change: (h, w, 3) uint8 -> float32.

    ``hue``: largest hue shift in OpenCV units (90 = any hue); ``sat_add``: up to this much
    saturation is added (so grey photographs get a colour too); ``gain``: log-range of the
    saturation and brightness gains.
    """
    hsv = cv2.cvtColor(rgb, cv2.COLOR_RGB2HSV).astype(np.float32)
    hsv[..., 0] = np.mod(hsv[..., 0] + rng.uniform(-hue, hue), 180)
    hsv[..., 1] = hsv[..., 1] * math.exp(rng.uniform(-gain, gain)) + rng.uniform(0, sat_add)
    hsv[..., 2] = hsv[..., 2] * math.exp(rng.uniform(-gain, 0.7 * gain)) + rng.uniform(-15, 15)
    hsv = np.clip(hsv, 0, [179, 255, 255]).astype(np.uint8)
    return cv2.cvtColor(hsv, cv2.COLOR_HSV2RGB).astype(np.float32)


@dataclass
class _Placed:
    """One planned object: alpha on its own canvas and the canvas's top-left in the image."""

    label: int  # category id
    alpha: np.ndarray  # (h, w) float32 in [0, 1]
    y0: int
    x0: int
    area: int  # pixels with alpha >= 0.5 on the whole canvas (also outside the image)


def _place_shape(rng: np.random.Generator, label: int, height: int, width: int) -> _Placed:
    """Draw scale, aspect, flip, rotation and position of one object of class ``label``."""
    short = min(height, width)
    # Longest side of the unrotated shape, log-uniform: ~20 px (COCO small) up to 70% of the image.
    side = math.exp(rng.uniform(math.log(max(12.0, 0.05 * short)), math.log(0.7 * short)))
    stretch = math.exp(rng.uniform(-0.22, 0.22))  # aspect jitter
    flip = -1.0 if rng.random() < 0.5 else 1.0
    upright = CATEGORIES[label - 1] == "horse"  # a horse stays roughly on its feet
    theta = math.radians(rng.uniform(-25, 25) if upright else rng.uniform(0, 360))

    levels = shape_pyramids()[label - 1]
    need = side * max(stretch, 1.0 / stretch)
    level = next((lv for lv in reversed(levels) if max(lv.shape) >= need), levels[0])
    lh, lw = level.shape
    s = side / max(lh, lw)
    scale = np.diag([s * math.sqrt(stretch) * flip, s / math.sqrt(stretch)])
    rot = np.array([[math.cos(theta), -math.sin(theta)], [math.sin(theta), math.cos(theta)]])
    lin = rot @ scale
    corners = np.array([[0, 0], [lw, 0], [0, lh], [lw, lh]], np.float64) - [lw / 2, lh / 2]
    ext = corners @ lin.T
    cw = int(math.ceil(ext[:, 0].max() - ext[:, 0].min())) + 2
    ch = int(math.ceil(ext[:, 1].max() - ext[:, 1].min())) + 2
    offset = np.array([cw / 2, ch / 2]) - lin @ np.array([lw / 2, lh / 2])
    matrix = np.concatenate([lin, offset[:, None]], 1)
    alpha = cv2.warpAffine(level, matrix, (cw, ch), flags=cv2.INTER_LINEAR, borderValue=0.0)

    # Up to 15% of the canvas may stick out of the image (truncated objects exist in COCO).
    def corner(extent: int, size: int) -> int:
        lo, hi = -0.15 * extent, size - 0.85 * extent
        return round(rng.uniform(lo, hi)) if hi > lo else round((size - extent) / 2)

    x0, y0 = corner(cw, width), corner(ch, height)
    return _Placed(label, alpha, y0, x0, int((alpha >= 0.5).sum()))


def _full_mask(p: _Placed, height: int, width: int) -> np.ndarray:
    """(H, W) bool: the object's alpha >= 0.5, clipped to the image."""
    out = np.zeros((height, width), bool)
    ys, xs, cy, cx = _clip(p, height, width)
    out[ys, xs] = p.alpha[cy, cx] >= 0.5
    return out


def _clip(p: _Placed, height: int, width: int) -> tuple[slice, slice, slice, slice]:
    """Image slices and the matching canvas slices of the visible part of ``p``'s canvas."""
    h, w = p.alpha.shape
    y0, x0 = max(p.y0, 0), max(p.x0, 0)
    y1, x1 = min(p.y0 + h, height), min(p.x0 + w, width)
    y1, x1 = max(y1, y0), max(x1, x0)
    return (slice(y0, y1), slice(x0, x1), slice(y0 - p.y0, y1 - p.y0), slice(x0 - p.x0, x1 - p.x0))


def _visible(masks: list[np.ndarray]) -> list[np.ndarray]:
    """Occlusion: each mask minus the union of every later (on-top) mask."""
    covered = np.zeros_like(masks[0]) if masks else None
    out = [None] * len(masks)
    for i in range(len(masks) - 1, -1, -1):
        out[i] = masks[i] & ~covered
        covered |= masks[i]
    return out


def image_rng(seed: int, split: str, index: int) -> np.random.Generator:
    """The Generator of one image: independent of every other image, so order does not matter."""
    return np.random.default_rng([seed, SPLITS[split], index])


def render_sample(seed: int, split: str, index: int, cfg: DataConfig) -> Sample:
    """Render image ``index`` of ``split``, a pure function of its arguments (sizes: ``cfg``)."""
    rng = image_rng(seed, split, index)
    photos = load_photos()
    height = int(rng.integers(cfg.min_size, cfg.max_size + 1))
    width = int(rng.integers(cfg.min_size, cfg.max_size + 1))
    bg_index = int(rng.integers(len(photos)))
    background = _crop_resized(rng, photos[bg_index], height, width, zoom=1.3)
    # A mild cast only: backgrounds stay recognisable photographs (grey ones stay grey).
    canvas = _colour_jitter(rng, background, hue=8, sat_add=0, gain=0.15)

    # Plan every object first, then drop the ones later objects would hide almost entirely, so
    # that nothing is painted that is not labelled. Dropping an object only uncovers others.
    n = int(rng.integers(1, MAX_OBJECTS + 1))
    placed = [
        _place_shape(rng, int(rng.integers(1, len(CATEGORIES) + 1)), height, width)
        for _ in range(n)
    ]
    full = [_full_mask(p, height, width) for p in placed]
    vis = _visible(full)
    keep = [
        i
        for i, (p, v) in enumerate(zip(placed, vis))
        if (a := int(v.sum())) >= MIN_VISIBLE_PIXELS and a >= MIN_VISIBLE_FRACTION * p.area
    ]
    placed = [placed[i] for i in keep]
    vis = _visible([full[i] for i in keep])

    for p in placed:
        # Texture from a photograph other than the background, class-independent colour.
        src = int(rng.integers(len(photos) - 1))
        src += src >= bg_index
        ch, cw = p.alpha.shape
        crop = _crop_resized(rng, photos[src], ch, cw, zoom=2.0)
        texture = _colour_jitter(rng, crop, hue=90, sat_add=90, gain=0.4)
        # A linear light gradient across the object, so it is not flat-shaded.
        gy, gx = np.mgrid[-1 : 1 : ch * 1j, -1 : 1 : cw * 1j].astype(np.float32)
        direction = rng.uniform(0, 2 * np.pi)
        shade = 1.0 + rng.uniform(0, 0.3) * (math.cos(direction) * gx + math.sin(direction) * gy)
        texture *= shade[:, :, None]
        ys, xs, cy, cx = _clip(p, height, width)
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
        (image_dir / name).write_bytes(jpeg.tobytes())
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
            "description": "Saliency Prompt embedded demo dataset (pipeline.demo_data): "
            "scikit-image photographs with pasted shapes",
            "version": "1",
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
# Preview picture


def write_preview(out_dir: Path, png: Path, split: str = "train", count: int = 6) -> None:
    """Draw the first ``count`` images of ``split`` with coloured masks and class names."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from pycocotools.coco import COCO

    with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints its progress
        coco = COCO(str(out_dir / "annotations" / f"instances_{split}.json"))
    ids = sorted(coco.getImgIds())[:count]
    if not ids:
        raise UserError(f"no {split} images to preview in {out_dir}")
    cols = min(3, len(ids))
    rows = math.ceil(len(ids) / cols)
    fig = Figure(figsize=(4.2 * cols, 4.0 * rows), dpi=100)
    FigureCanvasAgg(fig)
    palette = np.array(
        [
            [230, 25, 75],
            [60, 180, 75],
            [255, 225, 25],
            [0, 130, 200],
            [245, 130, 48],
            [145, 30, 180],
            [70, 240, 240],
            [240, 50, 230],
        ],
        float,
    )
    for k, image_id in enumerate(ids):
        info = coco.imgs[image_id]
        img = cv2.imread(str(out_dir / split / info["file_name"]), cv2.IMREAD_COLOR)[:, :, ::-1]
        shown = img.astype(float)
        ax = fig.add_subplot(rows, cols, k + 1)
        anns = coco.loadAnns(coco.getAnnIds(imgIds=[image_id]))
        for j, ann in enumerate(anns):
            m = coco.annToMask(ann).astype(bool)
            colour = palette[j % len(palette)]
            shown[m] = 0.6 * shown[m] + 0.4 * colour
        ax.imshow(shown.astype(np.uint8))
        for j, ann in enumerate(anns):
            colour = palette[j % len(palette)] / 255
            ax.contour(coco.annToMask(ann), levels=[0.5], colors=[colour], linewidths=1.2)
            x, y = ann["bbox"][:2]
            ax.text(
                x,
                y,
                coco.cats[ann["category_id"]]["name"],
                fontsize=8,
                va="bottom",
                color="black",
                bbox={"facecolor": colour, "alpha": 0.8, "pad": 1, "lw": 0},
            )
        ax.set_title(
            f"{info['file_name']}  {info['width']}x{info['height']}  {len(anns)} instances",
            fontsize=9,
        )
        ax.axis("off")
    fig.tight_layout()
    png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png)


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


def run(args: argparse.Namespace) -> int:
    cfg, raw = load_pipeline_config(args.config, args.overrides)
    out = Path(args.out or cfg.data.root)
    check_config(cfg.data)
    start = time.perf_counter()
    summary = build_demo_dataset(out, cfg.data)
    seconds = time.perf_counter() - start
    # The fully resolved stage-one sections, plus any trainer sections of the file as given.
    record_run(out, {**raw, **dataclasses.asdict(cfg)})
    write_json(out / "summary.json", summary)
    for split, counts in summary.items():
        cats = ", ".join(f"{k} {v}" for k, v in counts["per_category"].items())
        sizes = ", ".join(f"{k} {v}" for k, v in counts["area"].items())
        print(
            f"{split}: {counts['images']} images, {counts['instances']} instances ({cats}; {sizes})"
        )
    total = sum(c["images"] for c in summary.values())
    print(f"wrote {out} in {seconds:.1f} s ({total / max(seconds, 1e-9):.1f} images/s)")
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
