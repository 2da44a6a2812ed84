"""Low-data splits: a fixed, seeded subset of the training *images*, each with all its annotations.

Two ways to choose the images (docs/method.md, stage three):

- ``seeded_image_ids``: our own split. The images are ordered by COCO id, permuted by a NumPy
  generator seeded with ``seed``, and the first ``floor(frac * N)`` taken. Because it is a prefix
  of one permutation, with the same seed a 5% split is contained in the 10% split.
- ``unbiased_teacher_image_ids``: the split file the paper used, ``dataseed/COCO_supervision.txt``
  from Unbiased Teacher (Liu et al., ICLR 2021). It is JSON despite the name::

      {"0.01": {"0": [59733, ...], ..., "9": [...]}, "0.1": {...}, ..., "5.0": {...}, "10.0": {...}}

  keyed by the supervision percentage (``str(float)``), then by the fold / random seed ("0".."9";
  the paper used fold 1), holding positions into detectron2's COCO training list. That list is
  ``load_coco_json`` order (images sorted by id) after detectron2's default
  ``filter_images_with_only_crowd_annotations`` (images with no non-crowd annotation removed:
  118,287 -> 117,266 for train2017). Unbiased Teacher asserts each list holds exactly
  ``int(percent / 100 * len(list))`` entries; we check the same, which catches a file used with
  the wrong annotation JSON.

Either way the chosen images are written, with every annotation they have and all categories, as
a COCO JSON in the run folder (``write_split``), so the exact training set of a run is on disk.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.atomic_files import write_json
from pipeline.cli import UserError
from pipeline.inputs.coco_file import load_coco_file


def _num_selected(frac: float, total: int) -> int:
    """``floor(frac * total)`` (COCO 5% = 5,914 and 10% = 11,828 of 118,287), at least one image."""
    if not 0.0 < frac <= 1.0:
        raise UserError(f"split fraction must be in (0, 1], got {frac}")
    if total == 0:
        raise UserError("the training annotation file lists no images")
    # The epsilon keeps 0.05 * 400 = 20.000000000000004 and 0.29 * 100 = 28.999999999999996
    # both on the intended side of the floor.
    return max(1, math.floor(frac * total + 1e-9))


def seeded_image_ids(coco: dict[str, Any], frac: float, seed: int) -> list[int]:
    """Image ids of a deterministic ``frac`` subset of ``coco["images"]`` (sorted ascending).

    The result depends only on the set of image ids, ``frac`` and ``seed`` (not on the order of
    the JSON), and nests: same seed, larger ``frac`` -> a superset.
    """
    ids = sorted(int(im["id"]) for im in coco["images"])
    count = _num_selected(frac, len(ids))
    order = np.random.default_rng(seed).permutation(len(ids))
    return sorted(ids[i] for i in order[:count])


def read_unbiased_teacher(path: str | Path, percent: float, fold: int) -> list[int]:
    """Positions an Unbiased-Teacher ``COCO_supervision.txt`` lists for ``percent`` and ``fold``.

    ``percent`` is in percent (5.0 for 5%). Keys are matched numerically, so 5, 5.0 and
    0.05 * 100 (= 5.000000000000001) all find "5.0".
    """
    path = Path(path)
    if not path.is_file():
        raise UserError(f"split file not found: {path}")
    try:
        table = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"{path}: not an Unbiased-Teacher split file (not JSON: {e})") from None
    if not isinstance(table, dict):
        raise UserError(f"{path}: not an Unbiased-Teacher split file (expected a JSON object)")
    key = None
    for k in table:
        try:
            if math.isclose(float(k), percent, rel_tol=1e-9, abs_tol=1e-9):
                key = k
                break
        except ValueError:
            continue
    if key is None:
        raise UserError(
            f"{path}: no split for {percent:g}% (has: {', '.join(sorted(table, key=_as_float))})"
        )
    folds = table[key]
    if not isinstance(folds, dict) or str(fold) not in folds:
        have = ", ".join(sorted(folds)) if isinstance(folds, dict) else "none"
        raise UserError(f"{path}: no fold {fold} for {key}% (has: {have})")
    positions = folds[str(fold)]
    if not isinstance(positions, list) or not all(
        isinstance(i, int) and not isinstance(i, bool) for i in positions
    ):
        raise UserError(f"{path}: split {key}%/fold {fold} is not a list of integer positions")
    return positions


def _as_float(key: str) -> float:
    try:
        return float(key)
    except ValueError:
        return math.inf


def detectron2_train_order(coco: dict[str, Any]) -> list[int]:
    """Image ids in detectron2's training-list order: sorted by id, images without any non-crowd
    annotation removed (``filter_images_with_only_crowd_annotations``)."""
    usable = {int(a["image_id"]) for a in coco["annotations"] if not a.get("iscrowd", 0)}
    return sorted(i for i in (int(im["id"]) for im in coco["images"]) if i in usable)


def unbiased_teacher_image_ids(
    coco: dict[str, Any], path: str | Path, frac: float, fold: int
) -> list[int]:
    """Image ids (sorted) chosen by an Unbiased-Teacher split file for ``frac`` and ``fold``."""
    percent = round(frac * 100.0, 9)  # 0.05 -> 5.0, the float Unbiased Teacher's config holds
    positions = read_unbiased_teacher(path, percent, fold)
    order = detectron2_train_order(coco)
    expected = int(percent / 100.0 * len(order))  # their count check, same arithmetic
    if len(positions) != expected:
        raise UserError(
            f"{path}: {frac * 100:g}% fold {fold} lists {len(positions)} images, but "
            f"{frac * 100:g}% of this annotation file's {len(order)} usable training images is "
            f"{expected}: the split was made for a different training set"
        )
    if len(set(positions)) != len(positions):
        raise UserError(f"{path}: {frac * 100:g}% fold {fold} repeats an image position")
    bad = [i for i in positions if not 0 <= i < len(order)]
    if bad:
        raise UserError(
            f"{path}: position {bad[0]} is outside this training set's {len(order)} usable images"
        )
    return sorted(order[i] for i in positions)


def subset_coco(coco: dict[str, Any], image_ids: list[int]) -> dict[str, Any]:
    """A COCO dict restricted to ``image_ids``: those images, all their annotations, every
    category (so class indices do not depend on which classes the subset happens to contain)."""
    keep = set(image_ids)
    out = {k: v for k, v in coco.items() if k not in ("images", "annotations")}
    out["images"] = [im for im in coco["images"] if int(im["id"]) in keep]
    out["annotations"] = [a for a in coco["annotations"] if int(a["image_id"]) in keep]
    return out


def chosen_image_ids(
    coco: dict[str, Any],
    *,
    frac: float,
    seed: int = 0,
    split_file: str | Path = "",
    split_fold: int = 1,
) -> tuple[list[int], dict[str, Any]]:
    """(sorted image ids, how they were chosen) of the low-data subset of ``coco``: the
    Unbiased-Teacher file when ``split_file`` is given, else the seeded split."""
    if split_file:
        ids = unbiased_teacher_image_ids(coco, split_file, frac, split_fold)
        return ids, {
            "method": "unbiased_teacher",
            "split_file": str(split_file),
            "fold": split_fold,
        }
    return seeded_image_ids(coco, frac, seed), {"method": "seeded", "seed": seed}


def write_split(
    train_json: str | Path,
    out_path: str | Path,
    *,
    frac: float,
    seed: int = 0,
    split_file: str | Path = "",
    split_fold: int = 1,
) -> dict[str, Any]:
    """Choose the low-data subset of ``train_json`` and write it as a COCO JSON at ``out_path``.

    ``split_file`` (an Unbiased-Teacher file) takes precedence over ``seed``. Returns a summary:
    {"frac", "method", "seed" | "split_file"+"fold", "num_images", "num_annotations",
    "total_images", "source"}; the same summary is stored in the JSON under "split".
    """
    train_json = Path(train_json)
    if not train_json.is_file():
        raise UserError(f"training annotations not found: {train_json}")
    # Validated like every COCO reader; file names are checked by the dataset that opens them.
    coco = load_coco_file(train_json, allow_outside_root=True).data
    ids, how = chosen_image_ids(
        coco, frac=frac, seed=seed, split_file=split_file, split_fold=split_fold
    )
    subset = subset_coco(coco, ids)
    summary = {
        "frac": frac,
        **how,
        "num_images": len(subset["images"]),
        "num_annotations": len(subset["annotations"]),
        "total_images": len(coco["images"]),
        "source": str(train_json),
    }
    subset["split"] = summary
    # Atomic (every torch.distributed rank writes the same file): a resumed run never reads a
    # half-written split.
    write_json(out_path, subset, indent=None)
    return summary
