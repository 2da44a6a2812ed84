"""The trainer's COCO readers (split, dataset, evaluate's ground truth) go through
pipeline/inputs/coco_file.py: a malformed file is one UserError, a bad annotation is skipped and
listed."""

from __future__ import annotations

import json

import pytest

from pipeline.cli import UserError
from trainer.data.coco_dataset import CocoDataset
from trainer.data.splits import write_split
from trainer.data.transforms import Augment
from trainer.stages.coco_metrics import load_coco


def _coco(tmp_path, **changes) -> str:
    data = {
        "images": [
            {"id": 1, "file_name": "a.png", "height": 10, "width": 12},
            {"id": 2, "file_name": "b.png", "height": 10, "width": 12},
        ],
        "annotations": [
            {"id": 1, "image_id": 1, "category_id": 3, "segmentation": [[1, 1, 8, 1, 8, 8]]},
            {"id": 2, "image_id": 2, "category_id": 3, "segmentation": []},
        ],
        "categories": [{"id": 3, "name": "cat"}],
    }
    data.update(changes)
    path = tmp_path / "ann.json"
    path.write_text(json.dumps(data))
    return path


def test_bad_annotation_skipped_by_every_reader(tmp_path, capsys):
    path = _coco(tmp_path)
    dataset = CocoDataset(path, tmp_path, Augment(32, 64))
    assert [im[1] for im in dataset.images] == [1]  # image 2 lost its only annotation
    assert dataset.categories == [(3, "cat")]
    assert "annotation 2: 'segmentation' is empty ([])" in capsys.readouterr().err
    assert load_coco(path).getAnnIds() == [1]
    summary = write_split(path, tmp_path / "split.json", frac=1.0)
    assert summary["num_annotations"] == 1


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"annotations": {"1": {}}}, "'annotations' is a dict, not a list"),
        ({"categories": []}, "'categories' is empty"),
    ],
)
def test_malformed_file_is_one_user_error(tmp_path, changes, message):
    path = _coco(tmp_path, **changes)
    for read in (
        lambda: CocoDataset(path, tmp_path, Augment(32, 64)),
        lambda: load_coco(path),
        lambda: write_split(path, tmp_path / "split.json", frac=1.0),
    ):
        with pytest.raises(UserError, match=message):
            read()
