"""Pixel sources of the embedded demo dataset: photographs, and the backgrounds made from them.

Everything comes from the photographs that ship inside scikit-image's own data folder, so nothing
is downloaded. Two roles:

- **Object fill**: every pasted object is filled with a crop of one of :data:`PHOTOS`, colour
  jittered independently of its class (``pipeline.demo.data``).
- **Backgrounds** (data version 2): only material *without a salient subject*, so that every
  salient thing in a demo image is a labelled instance, as in COCO where the labelled classes
  cover nearly every salient object. Version 1 used plain crops of the subject photographs
  (the astronaut, the cat, the coffee cup, the motorcycle): stage one found those subjects first,
  and the labels called them background. :data:`BACKGROUNDS` lists the approved (photograph,
  treatment) pairs; the choice was made by measuring stage one on background-only images
  (``bench/backgrounds.py``, docs/usage.md "The embedded demo: data and weights"), never by any
  trained model's AP.

Treatments: ``texture`` (a random crop of a texture photograph, as v1 cropped photographs),
``zoom`` (a region 6-10x smaller than the image, magnified: no subject fits in it) and ``blur``
(a crop blurred with a Gaussian of 6-10% of the image's short side: shapes dissolve into colour
fields).
"""

from __future__ import annotations

import functools
import math
from pathlib import Path

import cv2
import numpy as np
import skimage.data

from pipeline.cli import UserError

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

TREATMENTS = ("texture", "zoom", "blur")

# The approved background sources, (photograph, treatment), chosen by measurement (see the module
# docstring; bench/results/backgrounds.json, 8 background-only images per candidate at the demo
# config): every candidate whose stage-one pseudo masks per image are at most the median of the six
# texture photographs (0.50). Kept: brick 0.38, gravel 0.12, ihc 0.38 (textures); coins 0.25,
# camera 0.38, motorcycle 0.38 (blurred); clock 0.25 (magnified). Left out: moon 3.75 (craters)
# and the Hubble field 2.75 (galaxies) are salient subjects themselves; grass 0.62, blurred cat and
# rocket 0.62, magnified coffee 3.62, coins 2.00. Version 1's plain subject crops gave 0.5-7.5
# (astronaut 7.50, coffee 7.00, rocket 5.75, camera 4.75).
BACKGROUNDS: tuple[tuple[str, str], ...] = (
    ("brick.png", "texture"),
    ("gravel.png", "texture"),
    ("ihc.png", "texture"),
    ("coins.png", "blur"),
    ("camera.png", "blur"),
    ("motorcycle_left.png", "blur"),
    ("clock_motion.png", "zoom"),
)


@functools.lru_cache(maxsize=1)
def load_photos() -> dict[str, np.ndarray]:
    """Every photograph of :data:`PHOTOS` as (h, w, 3) uint8 RGB (grey ones replicated)."""
    folder = Path(skimage.data.__file__).parent
    photos = {}
    for name in PHOTOS:
        path = folder / name
        img = cv2.imread(str(path), cv2.IMREAD_COLOR)
        if img is None:
            raise UserError(f"scikit-image photograph missing: {path} (reinstall scikit-image)")
        photos[name] = np.ascontiguousarray(img[:, :, ::-1])
    return photos


def crop_resized(
    rng: np.random.Generator, photo: np.ndarray, h: int, w: int, zoom: float, min_zoom: float = 1.0
) -> np.ndarray:
    """A random crop of ``photo`` rescaled to (h, w), randomly flipped: (h, w, 3) uint8.

    The scale is drawn log-uniformly between ``min_zoom`` times the smallest that covers (h, w)
    and ``zoom`` times that (at least up to full resolution for big photos when min_zoom is 1).
    """
    ph, pw = photo.shape[:2]
    cover = max(h / ph, w / pw)
    low = cover * min_zoom
    top = max(cover * zoom, min(1.0, cover * 3.0)) if min_zoom <= 1.0 else cover * zoom
    scale = math.exp(rng.uniform(math.log(low), math.log(max(top, low))))
    ch, cw = min(ph, max(1, round(h / scale))), min(pw, max(1, round(w / scale)))
    y0, x0 = int(rng.integers(0, ph - ch + 1)), int(rng.integers(0, pw - cw + 1))
    crop = photo[y0 : y0 + ch, x0 : x0 + cw]
    interp = cv2.INTER_AREA if ch > h else cv2.INTER_CUBIC
    out = cv2.resize(crop, (w, h), interpolation=interp)
    if rng.random() < 0.5:
        out = out[:, ::-1]
    return np.ascontiguousarray(out)


def colour_jitter(
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


def treated_background(
    rng: np.random.Generator, photo: np.ndarray, treatment: str, height: int, width: int
) -> np.ndarray:
    """One background of (height, width) from ``photo`` under ``treatment``: uint8 RGB."""
    if treatment == "texture":
        return crop_resized(rng, photo, height, width, zoom=1.3)
    if treatment == "zoom":
        return crop_resized(rng, photo, height, width, zoom=10.0, min_zoom=6.0)
    if treatment == "blur":
        crop = crop_resized(rng, photo, height, width, zoom=1.3)
        sigma = rng.uniform(0.06, 0.10) * min(height, width)
        return cv2.GaussianBlur(crop, (0, 0), sigmaX=sigma, borderType=cv2.BORDER_REFLECT)
    raise ValueError(f"unknown background treatment {treatment!r} (one of {TREATMENTS})")


def render_background(
    rng: np.random.Generator,
    height: int,
    width: int,
    sources: tuple[tuple[str, str], ...] = BACKGROUNDS,
) -> tuple[np.ndarray, str]:
    """A background drawn from ``sources``: (float32 RGB (h, w, 3), its photograph's name).

    Its colour is jittered exactly as an object's fill is (any hue, added saturation, gain), so
    colour tells neither object from background nor class from class.
    """
    name, treatment = sources[int(rng.integers(len(sources)))]
    background = treated_background(rng, load_photos()[name], treatment, height, width)
    return colour_jitter(rng, background, hue=90, sat_add=90, gain=0.4), name
