"""Checking one COCO ``segmentation`` before pycocotools sees it.

pycocotools trusts its input: a polygon of 4 numbers is silently taken as a box, and an RLE whose
run lengths add up to more or less than height x width is decoded past (or short of) the mask
buffer, giving a wrong mask or worse; a polygon far outside its image makes it allocate without
bound (or crash). :func:`segmentation_problem` says, in a few words, why a
segmentation cannot be used for an image of a given size; :func:`segmentation_area` fills in a
missing ``area``.
"""

from __future__ import annotations

import math
from typing import Any


def _number(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def rle_string_counts(counts: str) -> list[int] | None:
    """Run lengths of a compressed COCO RLE string (pycocotools' rleFrString), None if corrupt.

    Each run is a little-endian group of 6-bit characters (offset 48, 0x20 = "more follows",
    sign bit 0x10 in the last one); from the third run on, each is stored as the difference to
    the run two before it.
    """
    runs: list[int] = []
    p, n = 0, len(counts)
    while p < n:
        x, k, more = 0, 0, True
        while more:
            if p >= n:
                return None  # a group cut off in the middle
            c = ord(counts[p]) - 48
            if not 0 <= c < 64:
                return None
            x |= (c & 0x1F) << (5 * k)
            more = bool(c & 0x20)
            p += 1
            k += 1
            if not more and c & 0x10:
                x |= -1 << (5 * k)
        if len(runs) > 2:
            x += runs[-2]
        if x < 0:
            return None
        runs.append(x)
    return runs


def _polygon_problem(polygons: list, height: int, width: int) -> str:
    for i, poly in enumerate(polygons):
        if not isinstance(poly, list) or not all(_number(v) for v in poly):
            return f"polygon {i} is not a list of numbers"
        if len(poly) < 6 or len(poly) % 2:
            return f"polygon {i} has {len(poly)} numbers (need x,y pairs of at least 3 points)"
        # pycocotools walks every edge at 5x resolution: its memory grows with the coordinates
        # (1e7 costs 1.5 GB, 1e308 crashes it). A point more than one image size outside the
        # image cannot be a label of it, so the memory stays bounded by the image's size.
        xs, ys = poly[0::2], poly[1::2]
        if not (-width <= min(xs) and max(xs) <= 2 * width):
            return f"polygon {i} has x = {max(xs, key=abs):g}, far outside the {width} px width"
        if not (-height <= min(ys) and max(ys) <= 2 * height):
            return f"polygon {i} has y = {max(ys, key=abs):g}, far outside the {height} px height"
    return ""


def _rle_problem(rle: dict, height: int, width: int) -> str:
    size = rle.get("size")
    if not isinstance(size, list) or len(size) != 2 or not all(isinstance(v, int) for v in size):
        return f"RLE 'size' must be [height, width], got {size!r}"
    if size != [height, width]:
        return f"RLE size {size} is not the image's [{height}, {width}]"
    counts = rle.get("counts")
    if isinstance(counts, list):
        if not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in counts):
            return "RLE 'counts' must be non-negative whole numbers"
        runs = counts
    elif isinstance(counts, (str, bytes)):
        text = counts.decode("ascii", "replace") if isinstance(counts, bytes) else counts
        runs = rle_string_counts(text)
        if runs is None:
            return "RLE 'counts' is not a valid compressed RLE string"
    else:
        return f"RLE 'counts' must be a list or a string, got {type(counts).__name__}"
    if sum(runs) != height * width:
        return f"RLE counts cover {sum(runs)} pixels, not height x width = {height * width}"
    return ""


def segmentation_problem(segmentation: Any, height: int, width: int) -> str:
    """'' when ``segmentation`` is a usable mask for an image of ``height`` x ``width``."""
    if segmentation is None:
        return "is missing or null"
    if isinstance(segmentation, list):
        if not segmentation:
            return "is empty ([])"
        return _polygon_problem(segmentation, height, width)
    if isinstance(segmentation, dict):
        return _rle_problem(segmentation, height, width)
    return f"must be polygons or an RLE, got {type(segmentation).__name__}"


def segmentation_area(segmentation: Any, height: int, width: int) -> float:
    """Mask area in pixels of a segmentation that :func:`segmentation_problem` accepted."""
    from pycocotools import mask as mask_utils

    if isinstance(segmentation, list):
        rle = mask_utils.merge(mask_utils.frPyObjects(segmentation, height, width))
    elif isinstance(segmentation.get("counts"), list):
        rle = mask_utils.frPyObjects(segmentation, height, width)
    else:
        rle = segmentation
    return float(mask_utils.area(rle))
