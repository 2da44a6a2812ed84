"""COCO file validation (pipeline/inputs/coco_file.py): every malformed case of issue 15 is refused
or
skipped with a line naming the file, the image or annotation and the field."""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest
from pycocotools import mask as mask_utils

from pipeline.cli import UserError
from pipeline.inputs.coco_file import load_coco_file
from pipeline.inputs.coco_segmentation import rle_string_counts


def _rle(h: int, w: int) -> dict:
    m = np.zeros((h, w), np.uint8)
    m[2:5, 3:7] = 1
    rle = mask_utils.encode(np.asfortranarray(m))
    return {"size": [h, w], "counts": rle["counts"].decode()}


def valid() -> dict:
    square = [[1, 1, 8, 1, 8, 8, 1, 8]]
    return {
        "images": [
            {"id": 1, "file_name": "a.png", "height": 10, "width": 12},
            {"id": 2, "file_name": "sub/b.png", "height": 10, "width": 12},
        ],
        "annotations": [
            {"id": 1, "image_id": 1, "category_id": 3, "segmentation": square, "area": 49},
            {"id": 2, "image_id": 2, "category_id": 5, "segmentation": _rle(10, 12)},
        ],
        "categories": [{"id": 3, "name": "cat"}, {"id": 5, "name": "dog"}],
    }


def _write(tmp_path, data, name="x.json") -> str:
    path = tmp_path / name
    path.write_text(data if isinstance(data, str) else json.dumps(data))
    return path


def _refused(tmp_path, data, **kw) -> str:
    with pytest.raises(UserError) as e:
        load_coco_file(_write(tmp_path, data), **kw)
    assert str(e.value).startswith(str(tmp_path / "x.json"))
    return str(e.value)


def _skipped(tmp_path, data, capsys) -> list[str]:
    coco = load_coco_file(_write(tmp_path, data))
    err = capsys.readouterr().err
    assert f"skipped {len(coco.skipped)} of 2 annotations" in err
    return coco.skipped


def test_valid_file_loads_and_fills_area_and_iscrowd(tmp_path, capsys):
    coco = load_coco_file(_write(tmp_path, valid()))
    assert coco.skipped == [] and capsys.readouterr().err == ""
    anns = coco.data["annotations"]
    assert anns[1]["area"] == 12.0 and anns[1]["iscrowd"] == 0
    assert coco.categories() == [(3, "cat"), (5, "dog")]
    assert coco.to_coco().getImgIds() == [1, 2]


def test_utf8_bom_is_accepted(tmp_path):
    path = tmp_path / "x.json"
    path.write_bytes(b"\xef\xbb\xbf" + json.dumps(valid()).encode())
    assert len(load_coco_file(path).data["images"]) == 2


@pytest.mark.parametrize(
    "mutate, message",
    [
        (lambda d: [d], "not a COCO file (the top level is a list)"),
        (lambda d: d.update(annotations={"1": {}}), "'annotations' is a dict, not a list"),
        (lambda d: d.pop("images") and None, "'images' is missing"),
        (lambda d: d.update(categories=[]), "'categories' is empty"),
        (lambda d: d.pop("categories") and None, "'categories' is missing"),
        (lambda d: d["images"][0].update(id="1"), "images[0]: 'id' must be a whole number"),
        (lambda d: d["images"][1].pop("height"), "image 2: 'height' must be a positive"),
        (lambda d: d["images"][1].update(width=0), "image 2: 'width' must be a positive"),
        (lambda d: d["images"][1].update(id=1), "image 1: duplicate image id"),
        (lambda d: d["categories"][1].update(id=3), "category 3: duplicate category id"),
        (lambda d: d["categories"][1].pop("name"), "category 5: 'name' must be a string"),
        (lambda d: d["images"][0].update(file_name="../x.png"), "image 1: 'file_name' '../x.png'"),
        (lambda d: d["images"][0].update(file_name="/dev/zero"), "outside the image root"),
    ],
)
def test_refused_files_name_file_entry_and_field(tmp_path, mutate, message):
    data = valid()
    out = mutate(data)
    data = out if isinstance(out, list) else data  # the one case that replaces the file
    assert message in _refused(tmp_path, data)


def test_not_json_and_missing(tmp_path):
    assert "not valid JSON" in _refused(tmp_path, "{nope")
    with pytest.raises(UserError, match="COCO file not found"):
        load_coco_file(tmp_path / "missing.json")


def test_outside_root_allowed_by_setting(tmp_path):
    data = valid()
    data["images"][0]["file_name"] = "../elsewhere/a.png"
    coco = load_coco_file(_write(tmp_path, data), allow_outside_root=True)
    assert coco.data["images"][0]["file_name"] == "../elsewhere/a.png"


def test_several_problems_one_line_each(tmp_path):
    data = valid()
    data["images"][0].pop("height")
    data["images"][1]["id"] = "two"
    lines = _refused(tmp_path, data).splitlines()
    assert len(lines) == 2 and all(line.startswith(str(tmp_path)) for line in lines)


@pytest.mark.parametrize(
    "change, message",
    [
        ({"segmentation": None}, "annotation 2: 'segmentation' is missing or null"),
        ({"segmentation": []}, "annotation 2: 'segmentation' is empty ([])"),
        ({"segmentation": [[1, 1, 5, 5]]}, "polygon 0 has 4 numbers"),
        ({"segmentation": [1, 2, 3, 4, 5, 6]}, "polygon 0 is not a list of numbers"),
        ({"segmentation": [[1, 1, 1e308, 1, 5, 5]]}, "polygon 0 has x = 1e+308, far outside"),
        ({"segmentation": [[1, 1, 5, -50, 5, 5]]}, "polygon 0 has y = -50, far outside"),
        ({"image_id": None}, "'image_id' None is not an image of this file"),
        ({"image_id": 99}, "'image_id' 99 is not an image of this file"),
        ({"category_id": 4}, "'category_id' 4 is not a category of this file"),
        ({"id": 1}, "annotation 1: duplicate annotation id"),
        ({"iscrowd": 2}, "'iscrowd' must be 0 or 1"),
        ({"segmentation": {"size": [12, 10], "counts": "PP3"}}, "RLE size [12, 10] is not"),
        ({"segmentation": {"size": [10, 12], "counts": [100, 5]}}, "cover 105 pixels, not"),
        ({"segmentation": {"size": [10, 12], "counts": "\x01\x02"}}, "not a valid compressed RLE"),
    ],
)
def test_bad_annotation_is_skipped_and_named(tmp_path, capsys, change, message):
    data = valid()
    data["annotations"][1].update(change)
    skipped = _skipped(tmp_path, data, capsys)
    assert len(skipped) == 1 and message in skipped[0], skipped


def test_annotation_without_segmentation_or_image_id(tmp_path, capsys):
    data = valid()
    data["annotations"][0].pop("segmentation")
    data["annotations"][1].pop("image_id")
    skipped = _skipped(tmp_path, data, capsys)
    assert skipped == [
        "annotation 1: 'segmentation' is missing or null",
        "annotation 2: 'image_id' None is not an image of this file",
    ]


def test_compressed_rle_of_wrong_size_is_caught(tmp_path, capsys):
    """pycocotools decodes such a mask without complaint: the silent wrong score of issue 15."""
    data = valid()
    data["annotations"][1]["segmentation"] = {"size": [10, 12], "counts": _rle(9, 12)["counts"]}
    (line,) = _skipped(tmp_path, data, capsys)
    assert "cover 108 pixels, not height x width = 120" in line


def test_images_only_mode_ignores_labels(tmp_path):
    data = copy.deepcopy(valid())
    data["annotations"] = {"not": "a list"}
    data.pop("categories")
    for im in data["images"]:
        im.pop("height")
    coco = load_coco_file(_write(tmp_path, data), labels=False)
    assert [im["id"] for im in coco.data["images"]] == [1, 2]
    assert coco.data["annotations"] == []


def test_rle_string_decoder_matches_pycocotools():
    rng = np.random.default_rng(0)
    for _ in range(50):
        h, w = rng.integers(1, 40, 2)
        m = (rng.random((h, w)) < rng.random()).astype(np.uint8)
        counts = mask_utils.encode(np.asfortranarray(m))["counts"].decode()
        assert sum(rle_string_counts(counts)) == h * w
