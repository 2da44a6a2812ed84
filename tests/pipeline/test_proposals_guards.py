"""The proposals command records the image root it read (a COCO JSON with --image-root), so later
commands pair the masks with those pictures, and holds its output folder for one run at a time."""

from __future__ import annotations

import json
from pathlib import Path

from pipeline.run_folder import claim_run_folder
from tests.pipeline.test_proposals import _config, _images, _run, one_thread, weights  # noqa: F401


def test_coco_json_run_records_its_image_root(tmp_path, weights):  # noqa: F811
    images = _images(tmp_path / "imgs", 2)
    coco = {
        "images": [
            {"id": 7 + i, "file_name": f"img_{i:03d}.png", "height": 0, "width": 0} for i in (0, 1)
        ],
        "annotations": [],
        "categories": [],
    }
    ann = tmp_path / "train.json"
    ann.write_text(json.dumps(coco))
    out = tmp_path / "out"
    assert _run(_config(tmp_path, weights), ann, out, "--image-root", str(images)) == 0
    plan = json.loads((out / "plan.json").read_text())
    assert plan["image_root"] == str(images.absolute()) and plan["source"] == str(ann.absolute())
    assert set(plan["file_bytes"]) == {"img_000.png", "img_001.png"}


def test_a_folder_in_use_is_refused(tmp_path, weights, capsys):  # noqa: F811
    images = _images(tmp_path / "imgs", 2)
    out = tmp_path / "out"
    with claim_run_folder(out, "proposals"):
        assert _run(_config(tmp_path, weights), images, out) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "is in use by pid" in err[0]
    assert not list(Path(out).glob("shard-*.h5"))
