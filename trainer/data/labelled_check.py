"""Up-front checks of labelled images: every file there, of the size its labels say, decodable,
and every segmentation convertible to a mask, before a fine-tuning writes or trains anything.

Without them one bad item stops a run when the sampler reaches it, inside a DataLoader worker,
and the deterministic sampler reaches it again on every resume. The training split is small by
design (a labelled fraction), so its images are decoded in full, exactly as training will; the
validation set is checked without decoding (existence, [data] limits, a visibly truncated file,
the header's size), which is cheap at COCO's 5,000.

Well-formedness of the JSON itself (types, ids, categories) is the COCO-file validator's job;
these checks are about the files on disk and whether pycocotools can turn each segmentation into
a mask of the image's size.
"""

from __future__ import annotations

import io
from collections.abc import Callable
from pathlib import Path
from typing import Any

from PIL import Image, UnidentifiedImageError

from pipeline.cli import UserError
from pipeline.inputs.image_files import ImageLimits
from pipeline.inputs.images import UnreadableImage, decode_image, read_checked
from trainer.data.coco_dataset import _annotation_rle

# EXIF orientations that swap width and height (decode_image turns images upright).
_TRANSPOSED = (5, 6, 7, 8)


def _header_size(path: Path, limits: ImageLimits | None) -> tuple[int, int]:
    """(height, width) of the upright image from its header, without decoding pixels, after the
    checks that need no decoding: [data] limits, an empty or visibly truncated file."""
    data, _ = read_checked(path, limits)
    with Image.open(io.BytesIO(data)) as im:
        width, height = im.size
        if im.getexif().get(0x0112) in _TRANSPOSED:
            width, height = height, width
    return height, width


def _decoded_size(path: Path, limits: ImageLimits | None) -> tuple[int, int]:
    return tuple(decode_image(path, limits=limits).shape[:2])


def _file_problem(
    path: Path, height: int, width: int, size_of: Callable, limits: ImageLimits | None
) -> str:
    if not path.is_file():
        return "file not found"
    try:
        got = size_of(path, limits)
    except (UnreadableImage, UnidentifiedImageError, OSError, ValueError) as e:
        return f"unreadable ({e})"
    except Image.DecompressionBombError as e:  # over PIL's own limit (a Warning's relative)
        return f"unreadable ({e})"
    if tuple(got) != (height, width):
        return f"is {got[1]}x{got[0]} on disk but {width}x{height} in the labels"
    return ""


def _polygon_problem(segmentation: list) -> str:
    # pycocotools reads a 4-number "polygon" as a box and crashes on odd lengths.
    for part in segmentation:
        if not isinstance(part, list) or len(part) < 6 or len(part) % 2:
            n = len(part) if isinstance(part, list) else type(part).__name__
            return f"a polygon needs an even count of at least 6 numbers, got {n}"
    return "" if segmentation else "empty polygon list"


def _segmentation_problem(ann: dict[str, Any], height: int, width: int) -> str:
    segmentation = ann.get("segmentation")
    if isinstance(segmentation, list) and _polygon_problem(segmentation):
        return f"annotation {ann.get('id')}: {_polygon_problem(segmentation)}"
    try:
        rle = _annotation_rle(ann["segmentation"], height, width)
        if list(rle["size"]) != [height, width]:
            return f"annotation {ann.get('id')}: mask size {rle['size']} != {height}x{width}"
    except Exception as e:  # pycocotools raises many types for malformed input
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        return f"annotation {ann.get('id')}: segmentation cannot be made a mask ({reason})"
    return ""


def find_bad_images(
    coco: dict[str, Any],
    image_root: str | Path,
    *,
    decode: bool,
    limits: ImageLimits | None = None,
) -> dict:
    """{image_id: "file_name: reason"} of every image of ``coco`` that cannot be used: its file
    missing, unreadable or of another size (``decode``: full decode, else header only), or a
    non-crowd segmentation that pycocotools cannot turn into a mask. ``limits``: the [data]
    section's (None: the defaults)."""
    root = Path(image_root).expanduser()
    size_of = _decoded_size if decode else _header_size
    per_image: dict[int, list[dict[str, Any]]] = {}
    for ann in coco.get("annotations", []):
        if not ann.get("iscrowd", 0):
            per_image.setdefault(int(ann["image_id"]), []).append(ann)
    bad = {}
    for im in coco.get("images", []):
        image_id, height, width = int(im["id"]), int(im["height"]), int(im["width"])
        reason = _file_problem(root / str(im["file_name"]), height, width, size_of, limits)
        for ann in per_image.get(image_id, []) if not reason else []:
            reason = _segmentation_problem(ann, height, width)
            if reason:
                break
        if reason:
            bad[image_id] = f"{im['file_name']}: {reason}"
    return bad


def usable_training_ids(
    coco: dict[str, Any], image_root: str | Path, say: Callable, limits: ImageLimits | None = None
) -> list[int]:
    """Ids of the split's images that training can use; each bad one is skipped with one line
    through ``say``. UserError when none is left."""
    bad = find_bad_images(coco, image_root, decode=True, limits=limits)
    for image_id, reason in sorted(bad.items()):
        say(f"skipping training image {image_id} ({reason})")
    good = [int(im["id"]) for im in coco.get("images", []) if int(im["id"]) not in bad]
    if not good:
        raise UserError(f"none of the {len(bad)} training images under {image_root} is usable")
    return good


def check_validation_set(
    coco: dict[str, Any],
    image_root: str | Path,
    val_json: str,
    limits: ImageLimits | None = None,
) -> None:
    """Refuse a validation set with a bad image: skipping it would change what AP is measured on.
    One line naming the first bad file and how many others there are."""
    bad = find_bad_images(coco, image_root, decode=False, limits=limits)
    if bad:
        first_id = min(bad)
        more = f" (and {len(bad) - 1} more)" if len(bad) > 1 else ""
        raise UserError(
            f"validation image {first_id} of {val_json} under {image_root}: {bad[first_id]}{more}"
        )
