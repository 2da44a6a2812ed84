"""Low-data splits: seeded subsets and the Unbiased-Teacher split-file reader."""

from __future__ import annotations

import json
import random

import pytest

from pipeline.cli import UserError
from trainer.data.splits import (
    detectron2_train_order,
    read_unbiased_teacher,
    seeded_image_ids,
    subset_coco,
    unbiased_teacher_image_ids,
    write_split,
)


def _coco(num_images: int = 400, seed: int = 0) -> dict:
    """A COCO dict with shuffled, non-contiguous image ids and 0-3 annotations per image."""
    rng = random.Random(seed)
    ids = [1000 + 7 * i for i in range(num_images)]
    rng.shuffle(ids)
    images = [{"id": i, "file_name": f"{i}.jpg", "height": 32, "width": 32} for i in ids]
    anns, next_id = [], 1
    for i in ids:
        for _ in range(rng.randint(0, 3)):
            anns.append(
                {
                    "id": next_id,
                    "image_id": i,
                    "category_id": rng.choice([1, 3]),
                    "bbox": [0, 0, 4, 4],
                    "area": 16,
                    "iscrowd": 0,
                    "segmentation": [[0, 0, 4, 0, 4, 4, 0, 4]],
                }
            )
            next_id += 1
    cats = [{"id": 1, "name": "a"}, {"id": 3, "name": "b"}]
    return {"images": images, "annotations": anns, "categories": cats}


def test_seeded_split_sizes_and_determinism():
    coco = _coco(400)
    a = seeded_image_ids(coco, 0.05, seed=0)
    assert len(a) == 20 and len(set(a)) == 20
    assert a == seeded_image_ids(coco, 0.05, seed=0)
    assert a != seeded_image_ids(coco, 0.05, seed=1)
    # The JSON's image order does not matter, only the set of ids.
    shuffled = dict(coco, images=list(reversed(coco["images"])))
    assert a == seeded_image_ids(shuffled, 0.05, seed=0)
    # Same seed, larger fraction: a superset (prefix of one permutation).
    assert set(a) <= set(seeded_image_ids(coco, 0.10, seed=0))
    assert len(seeded_image_ids(coco, 0.10, seed=0)) == 40
    assert len(seeded_image_ids(coco, 1.0, seed=3)) == 400
    # COCO train2017 counts quoted by the paper: floor, not round.
    big = {"images": [{"id": i} for i in range(118287)]}
    assert len(seeded_image_ids(big, 0.05, 0)) == 5914
    assert len(seeded_image_ids(big, 0.10, 0)) == 11828


@pytest.mark.parametrize("frac", [0.0, -0.1, 1.5])
def test_bad_fraction(frac):
    with pytest.raises(UserError, match="fraction"):
        seeded_image_ids(_coco(10), frac, 0)


def test_write_split_keeps_every_annotation_of_chosen_images(tmp_path):
    coco = _coco(400)
    src = tmp_path / "train.json"
    src.write_text(json.dumps(coco))
    out = tmp_path / "run" / "split.json"
    summary = write_split(src, out, frac=0.05, seed=2)
    written = json.loads(out.read_text())
    chosen = {im["id"] for im in written["images"]}
    assert chosen == set(seeded_image_ids(coco, 0.05, 2))
    expected = [a for a in coco["annotations"] if a["image_id"] in chosen]
    assert written["annotations"] == expected
    assert written["categories"] == coco["categories"]
    assert summary["num_images"] == 20 and summary["num_annotations"] == len(expected)
    assert written["split"]["method"] == "seeded" and written["split"]["seed"] == 2
    assert not [p for p in out.parent.iterdir() if p.name.endswith(".tmp")]


def test_subset_keeps_categories_even_if_unused():
    coco = _coco(20)
    only = [coco["images"][0]["id"]]
    sub = subset_coco(coco, only)
    assert [im["id"] for im in sub["images"]] == only
    assert sub["categories"] == coco["categories"]
    assert all(a["image_id"] == only[0] for a in sub["annotations"])


def _ut_coco() -> dict:
    """10 images (ids out of order), image 30 has no annotation, image 50 only a crowd one."""
    ids = [90, 10, 30, 50, 20, 70, 40, 60, 80, 100]
    images = [{"id": i, "file_name": f"{i}.jpg", "height": 8, "width": 8} for i in ids]
    anns = []
    for n, i in enumerate(ids):
        if i == 30:
            continue
        anns.append(
            {
                "id": n + 1,
                "image_id": i,
                "category_id": 1,
                "bbox": [0, 0, 2, 2],
                "area": 4,
                "iscrowd": int(i == 50),
                "segmentation": [[0, 0, 2, 0, 2, 2]],
            }
        )
    return {"images": images, "annotations": anns, "categories": [{"id": 1, "name": "x"}]}


def _ut_file(tmp_path, table) -> str:
    path = tmp_path / "COCO_supervision.txt"
    path.write_text(json.dumps(table))
    return str(path)


def test_unbiased_teacher_reader(tmp_path):
    coco = _ut_coco()
    # detectron2 order: sorted ids minus the empty (30) and crowd-only (50) images.
    order = detectron2_train_order(coco)
    assert order == [10, 20, 40, 60, 70, 80, 90, 100]
    # 8 usable images: 25% -> int(0.25 * 8) = 2 positions, 50% -> 4. Keys as Unbiased Teacher
    # writes them (str(float)).
    table = {"25.0": {"0": [0, 7], "1": [3, 5]}, "50.0": {"0": [0, 1, 2, 3], "1": [7, 6, 5, 4]}}
    path = _ut_file(tmp_path, table)
    assert read_unbiased_teacher(path, 25.0, 1) == [3, 5]
    assert unbiased_teacher_image_ids(coco, path, 0.25, 1) == [60, 80]
    assert unbiased_teacher_image_ids(coco, path, 0.25, 0) == [10, 100]
    assert unbiased_teacher_image_ids(coco, path, 0.5, 1) == [70, 80, 90, 100]
    # write_split with the file: same images, all their annotations, provenance recorded.
    src = tmp_path / "train.json"
    src.write_text(json.dumps(coco))
    out = tmp_path / "split.json"
    summary = write_split(src, out, frac=0.25, seed=123, split_file=path, split_fold=1)
    written = json.loads(out.read_text())
    assert sorted(im["id"] for im in written["images"]) == [60, 80]
    assert summary["method"] == "unbiased_teacher" and summary["fold"] == 1
    assert {a["image_id"] for a in written["annotations"]} == {60, 80}


def test_unbiased_teacher_reader_errors(tmp_path):
    coco = _ut_coco()
    path = _ut_file(tmp_path, {"25.0": {"0": [0, 1, 2]}, "50.0": {"0": [0, 1, 2, 99]}})
    with pytest.raises(UserError, match="different training set"):
        unbiased_teacher_image_ids(coco, path, 0.25, 0)  # 3 listed, int(0.25 * 8) = 2 expected
    with pytest.raises(UserError, match="outside"):
        unbiased_teacher_image_ids(coco, path, 0.5, 0)
    with pytest.raises(UserError, match="no split for 10%"):
        read_unbiased_teacher(path, 10.0, 0)
    with pytest.raises(UserError, match="no fold 4"):
        read_unbiased_teacher(path, 25.0, 4)
    bad = tmp_path / "bad.txt"
    bad.write_text("not json")
    with pytest.raises(UserError, match="not JSON"):
        read_unbiased_teacher(bad, 25.0, 0)
    with pytest.raises(UserError, match="not found"):
        read_unbiased_teacher(tmp_path / "missing.txt", 25.0, 0)
