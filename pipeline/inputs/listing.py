"""Listing input images: a folder (recursive, sorted, by extension) or a COCO JSON with its image
root, as ImageItems whose names are checked to be valid UTF-8."""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

from pipeline.cli import UserError
from pipeline.inputs.coco_file import load_coco_file
from pipeline.inputs.images import IMAGE_EXTENSIONS


@dataclass(frozen=True)
class ImageItem:
    """One input image: ``file_name`` is relative to the image root (POSIX separators)."""

    file_name: str
    image_id: int
    path: Path


def _utf8(name: str) -> bool:
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:  # undecodable bytes, kept by Python as lone surrogates
        return False
    return True


def _list_folder(root: Path) -> list[ImageItem]:
    files = []
    for p in root.rglob("*"):
        rel = p.relative_to(root)
        # Hidden files and folders (.ipynb_checkpoints, ._foo.jpg resource forks) are not inputs.
        if any(part.startswith(".") for part in rel.parts):
            continue
        if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file():
            files.append(rel.as_posix())
    # A name that is not valid UTF-8 cannot be stored in a shard (or a COCO file): counted and
    # left out here, instead of failing its whole shard on every retry.
    odd = [n for n in files if not _utf8(n)]
    if odd:
        files = [n for n in files if _utf8(n)]
        shown = ascii(odd[0])
        print(
            f"{root}: skipped {len(odd)} image(s) whose file names are not valid UTF-8 "
            f"(first {shown}); rename them to include them",
            file=sys.stderr,
        )
    if not files:
        raise UserError(f"no images ({', '.join(IMAGE_EXTENSIONS)}) found under {root}")
    files.sort()
    return [ImageItem(name, i, root / name) for i, name in enumerate(files)]


def _list_coco(
    json_path: Path, image_root: str | Path | None, allow_outside_root: bool
) -> list[ImageItem]:
    if image_root is None or str(image_root) == "":
        raise UserError(f"{json_path}: a COCO JSON source needs the image folder (image root)")
    root = Path(image_root)
    if not root.is_dir():
        raise UserError(f"image root not found: {root}")
    # Labels are ignored here, so only the images are validated (ids, names inside the root).
    coco = load_coco_file(json_path, labels=False, allow_outside_root=allow_outside_root)
    items = [
        ImageItem(im["file_name"], im["id"], root / im["file_name"]) for im in coco.data["images"]
    ]
    items.sort(key=lambda it: it.file_name)
    return items


def list_images(
    source: str | Path, image_root: str | Path | None = None, allow_outside_root: bool = False
) -> list[ImageItem]:
    """List the images of a folder (recursive) or of a COCO JSON file.

    Folder: sorted by relative path, ``image_id`` = index in that order. COCO JSON: the JSON's
    images sorted by ``file_name``, their ids kept, paths under ``image_root`` (required; a
    ``file_name`` outside it is refused unless ``allow_outside_root``). Files a JSON names but
    that are missing are listed anyway; decoding reports them as unreadable.
    Raises ``UserError`` for a missing source or one without images.
    """
    src = Path(source)
    if not src.exists():
        raise UserError(f"image source not found: {src}")
    if src.is_dir():
        return _list_folder(src)
    if src.suffix.lower() == ".json":
        return _list_coco(src, image_root, allow_outside_root)
    raise UserError(f"expected an image folder or a COCO JSON file, got {src}")
