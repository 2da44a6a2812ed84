"""Reading a COCO instances file that someone handed you: one validator for every reader.

``proposals --images X.json`` (images only), ``inspect --gt``, the fine-tuning split and dataset
and ``evaluate`` all load COCO files through :func:`load_coco_file`, so one malformed file gives
the same answer everywhere instead of a traceback (or, worse, a wrong score) in each.

What a user would expect of each problem:

- **The file is refused** (:class:`~pipeline.cli.UserError`, one line per problem naming the file,
  the image or annotation and the field) when it cannot be the file meant: not JSON, not a JSON
  object, ``images`` / ``annotations`` / ``categories`` of the wrong kind, an image without a
  whole-number id, a file name or a positive size, duplicate image or category ids, no
  categories where classes are needed, a ``file_name`` leaving the image root.
- **An annotation is skipped**, counted and listed on stderr when the rest of the file is fine:
  no or an unknown ``image_id`` / ``category_id``, no segmentation (missing, null, ``[]``), a
  polygon of fewer than 3 points (pycocotools would take 4 numbers for a box) or with a point
  more than one image size outside its image (pycocotools' memory grows with it), an RLE whose
  ``size`` is not its image's or whose counts do not add up to height x width (pycocotools would
  read or write past the mask), a duplicate annotation id.
- Harmless omissions are filled in: ``iscrowd`` 0, ``area`` from the mask (COCOeval needs both),
  and a leading UTF-8 byte-order mark is ignored.
"""

from __future__ import annotations

import contextlib
import io
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

from pipeline.cli import UserError
from pipeline.inputs.coco_segmentation import segmentation_problem

# Problem lines printed in full; the rest are counted.
SHOW_PROBLEMS = 10


@dataclass
class CocoFile:
    """A validated COCO file: ``data`` holds the usable images, categories and annotations."""

    path: Path
    data: dict[str, Any]
    skipped: list[str] = field(default_factory=list)  # one line per skipped annotation

    def to_coco(self):
        """A pycocotools ``COCO`` index of the validated data (its prints silenced)."""
        from pycocotools.coco import COCO

        coco = COCO()
        coco.dataset = self.data
        with contextlib.redirect_stdout(io.StringIO()):
            coco.createIndex()
        return coco

    def categories(self) -> list[tuple[int, str]]:
        """(id, name) of every category, sorted by id."""
        return sorted((c["id"], c["name"]) for c in self.data["categories"])


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _where(kind: str, index: int, entry: Any) -> str:
    """'image 12' when the entry has a usable id, else 'images[3]'."""
    if isinstance(entry, dict) and _is_int(entry.get("id")):
        return f"{kind} {entry['id']}"
    return f"{kind}s[{index}]"


def _read_json(path: Path) -> Any:
    if not path.is_file():
        raise UserError(f"COCO file not found: {path}")
    try:
        # utf-8-sig: a byte-order mark (Windows editors write one) is not a reason to refuse.
        return json.loads(path.read_bytes().decode("utf-8-sig"))
    except UnicodeDecodeError as e:
        raise UserError(f"{path}: not a text file (not UTF-8 at byte {e.start})") from None
    except json.JSONDecodeError as e:
        raise UserError(f"{path}: not valid JSON ({e})") from None
    except OSError as e:
        raise UserError(f"{path}: cannot read ({e.strerror or e})") from None


def _leaves_root(name: str) -> bool:
    """True for an absolute file name or one with a '..' part (lexically, nothing resolved)."""
    p = PurePosixPath(name.replace("\\", "/"))
    return p.is_absolute() or ".." in p.parts or (len(name) > 1 and name[1] == ":")


def _image_problems(images: list, sizes: bool, allow_outside_root: bool) -> list[str]:
    problems, seen = [], set()
    for k, im in enumerate(images):
        where = _where("image", k, im)
        if not isinstance(im, dict):
            problems.append(f"images[{k}]: not an object")
            continue
        if not _is_int(im.get("id")):
            problems.append(f"{where}: 'id' must be a whole number, got {im.get('id')!r}")
        elif im["id"] in seen:
            problems.append(f"{where}: duplicate image id")
        else:
            seen.add(im["id"])
        name = im.get("file_name")
        if not isinstance(name, str) or not name or "\x00" in name:
            problems.append(f"{where}: 'file_name' must be a non-empty string, got {name!r}")
        elif _leaves_root(name) and not allow_outside_root:
            problems.append(
                f"{where}: 'file_name' {name!r} is outside the image root "
                "(set data.allow_outside_root = true to allow it)"
            )
        for key in ("height", "width") if sizes else ():
            if not _is_int(im.get(key)) or im[key] < 1:
                problems.append(
                    f"{where}: '{key}' must be a positive whole number, got {im.get(key)!r}"
                )
    return problems


def _category_problems(categories: list) -> list[str]:
    problems, seen = [], set()
    for k, cat in enumerate(categories):
        where = _where("category", k, cat)
        if not isinstance(cat, dict) or not _is_int(cat.get("id")):
            problems.append(f"{where}: 'id' must be a whole number")
        elif cat["id"] in seen:
            problems.append(f"{where}: duplicate category id")
        else:
            seen.add(cat["id"])
        if isinstance(cat, dict) and not isinstance(cat.get("name"), str):
            problems.append(f"{where}: 'name' must be a string, got {cat.get('name')!r}")
    return problems


def _annotation_problem(ann: Any, images: dict[int, dict], cat_ids: set | None, seen: set) -> str:
    """Why ``ann`` cannot be used ('' when it can); fills in iscrowd and area. ``cat_ids`` None:
    the file has no categories and none are needed (class-agnostic recall)."""
    if not isinstance(ann, dict):
        return "not an object"
    if not _is_int(ann.get("id")):
        return f"'id' must be a whole number, got {ann.get('id')!r}"
    if ann["id"] in seen:
        return "duplicate annotation id"
    image = images.get(ann.get("image_id")) if _is_int(ann.get("image_id")) else None
    if image is None:
        return f"'image_id' {ann.get('image_id')!r} is not an image of this file"
    category = ann.get("category_id")
    if cat_ids is not None and (not _is_int(category) or category not in cat_ids):
        return f"'category_id' {ann.get('category_id')!r} is not a category of this file"
    crowd = ann.setdefault("iscrowd", 0)
    if crowd not in (0, 1) or isinstance(crowd, float):
        return f"'iscrowd' must be 0 or 1, got {crowd!r}"
    problem = segmentation_problem(ann.get("segmentation"), image["height"], image["width"])
    if problem:
        return f"'segmentation' {problem}"
    if not isinstance(ann.get("area"), (int, float)) or isinstance(ann.get("area"), bool):
        from pipeline.inputs.coco_segmentation import segmentation_area

        ann["area"] = segmentation_area(ann["segmentation"], image["height"], image["width"])
    return ""


def _clean_annotations(annotations: list, images: list, categories: list) -> tuple[list, list]:
    by_id = {im["id"]: im for im in images}
    cat_ids = {c["id"] for c in categories} if categories else None
    kept, skipped, seen = [], [], set()
    for k, ann in enumerate(annotations):
        problem = _annotation_problem(ann, by_id, cat_ids, seen)
        if problem:
            skipped.append(f"{_where('annotation', k, ann)}: {problem}")
        else:
            seen.add(ann["id"])
            kept.append(ann)
    return kept, skipped


def _refuse(path: Path, problems: list[str]) -> None:
    lines = [f"{path}: {p}" for p in problems[:SHOW_PROBLEMS]]
    if len(problems) > SHOW_PROBLEMS:
        lines.append(f"{path}: ... and {len(problems) - SHOW_PROBLEMS} more problems")
    raise UserError("\n".join(lines))


def _list_of(data: dict, key: str, path: Path, required: bool) -> list:
    value = data.get(key)
    if value is None and not required:
        return []
    if not isinstance(value, list):
        kind = "missing" if value is None else f"a {type(value).__name__}, not a list"
        raise UserError(f"{path}: '{key}' is {kind}")
    return value


def report_skipped(coco: CocoFile) -> None:
    """Print the skipped annotations (count and the first few lines) on stderr."""
    if not coco.skipped:
        return
    total = len(coco.skipped) + len(coco.data["annotations"])
    print(f"{coco.path}: skipped {len(coco.skipped)} of {total} annotations:", file=sys.stderr)
    for line in coco.skipped[:SHOW_PROBLEMS]:
        print(f"  {line}", file=sys.stderr)
    if len(coco.skipped) > SHOW_PROBLEMS:
        print(f"  ... and {len(coco.skipped) - SHOW_PROBLEMS} more", file=sys.stderr)


def load_coco_file(
    path: str | Path,
    *,
    labels: bool = True,
    categories: bool = True,
    allow_outside_root: bool = False,
    quiet: bool = False,
    unlabelled_ok: bool = False,
) -> CocoFile:
    """Read and validate a COCO file (see the module docstring for what is refused or skipped).

    ``labels``: the annotations are used (False for ``proposals``, which reads images only: the
    annotations are then neither checked nor kept). ``categories``: at least one category is
    required (False for class-agnostic recall). Skipped annotations are printed on stderr
    unless ``quiet``; they stay listed in ``CocoFile.skipped``. ``unlabelled_ok``: a file with
    no ``annotations`` list is read as having none (images to predict on, for ``evaluate``).
    """
    path = Path(path)
    data = _read_json(path)
    if not isinstance(data, dict):
        raise UserError(f"{path}: not a COCO file (the top level is a {type(data).__name__})")
    images = _list_of(data, "images", path, required=True)
    required = labels and not unlabelled_ok
    anns = _list_of(data, "annotations", path, required=required) if labels else []
    cats = _list_of(data, "categories", path, required=categories) if labels else []
    problems = _image_problems(images, labels, allow_outside_root) + _category_problems(cats)
    if labels and categories and not cats:
        problems.append("'categories' is empty: no class to learn or score")
    if problems:
        _refuse(path, problems)
    if not images:
        raise UserError(f"{path}: the 'images' list is empty")
    kept, skipped = _clean_annotations(anns, images, cats) if labels else ([], [])
    clean = {**data, "images": images, "annotations": kept, "categories": cats}
    coco = CocoFile(path, clean, skipped)
    if not quiet:
        report_skipped(coco)
    return coco
