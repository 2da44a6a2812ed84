"""The six demo classes as shapes: canonical rasters, random placement, occlusion.

Classes are defined by SHAPE only (colour and texture are drawn independently of the class in
``pipeline.demo.data``). Each class has one canonical anti-aliased alpha raster (longest side
CANON_SIDE) and a pyramid of halvings, so a small object is warped from the level just larger than
it and keeps an anti-aliased edge. Placement draws scale (COCO small, medium and large all occur),
aspect, flip, rotation and position; :func:`visible` applies occlusion in paste order.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import cv2
import numpy as np
import skimage.data

# Class names, in category-id order (id = index + 1). Shapes only: colour and texture are random.
CATEGORIES = ["horse", "star", "ring", "cross", "crescent", "heart"]
CANON_SIDE = 512  # longest side of the canonical (finest) shape raster


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


@dataclass
class Placed:
    """One planned object: alpha on its own canvas and the canvas's top-left in the image."""

    label: int  # category id
    alpha: np.ndarray  # (h, w) float32 in [0, 1]
    y0: int
    x0: int
    area: int  # pixels with alpha >= 0.5 on the whole canvas (also outside the image)


def place_shape(rng: np.random.Generator, label: int, height: int, width: int) -> Placed:
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
    return Placed(label, alpha, y0, x0, int((alpha >= 0.5).sum()))


def full_mask(p: Placed, height: int, width: int) -> np.ndarray:
    """(H, W) bool: the object's alpha >= 0.5, clipped to the image."""
    out = np.zeros((height, width), bool)
    ys, xs, cy, cx = clip(p, height, width)
    out[ys, xs] = p.alpha[cy, cx] >= 0.5
    return out


def clip(p: Placed, height: int, width: int) -> tuple[slice, slice, slice, slice]:
    """Image slices and the matching canvas slices of the visible part of ``p``'s canvas."""
    h, w = p.alpha.shape
    y0, x0 = max(p.y0, 0), max(p.x0, 0)
    y1, x1 = min(p.y0 + h, height), min(p.x0 + w, width)
    y1, x1 = max(y1, y0), max(x1, x0)
    return (slice(y0, y1), slice(x0, x1), slice(y0 - p.y0, y1 - p.y0), slice(x0 - p.x0, x1 - p.x0))


def visible(masks: list[np.ndarray]) -> list[np.ndarray]:
    """Occlusion: each mask minus the union of every later (on-top) mask."""
    covered = np.zeros_like(masks[0]) if masks else None
    out = [None] * len(masks)
    for i in range(len(masks) - 1, -1, -1):
        out[i] = masks[i] & ~covered
        covered |= masks[i]
    return out
