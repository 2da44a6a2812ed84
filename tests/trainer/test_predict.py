"""``trainer predict`` and the Predictor API on tiny real checkpoints: a fine-tuned model (class
names recorded) and a pre-trained one (class-agnostic), a folder with a corrupt file, a COCO file
scored against ``evaluate``, and the API on a path, an array and a PIL image."""

from __future__ import annotations

import contextlib
import io
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from pycocotools.coco import COCO

from tests.trainer.helpers import run_cli
from tests.trainer.tiny_project import CATEGORY_IDS, pretrain, sets, write_project
from trainer.inference.predictor import Predictor
from trainer.stages.coco_metrics import coco_mask_metrics, load_coco


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    """(root, fine-tuning checkpoint, pre-training checkpoint) of a tiny project."""
    root = tmp_path_factory.mktemp("predict")
    toml = write_project(root)
    pre = pretrain(toml, root / "pretrain", 1)
    run = root / "finetune"
    code, _, err = run_cli(
        "finetune", "--config", str(toml), *sets(), "--frac", "0.5", "--iters", "2",
        "--init", str(pre), "--out", str(run),
    )  # fmt: skip
    assert code == 0, err
    return root, run / "checkpoints" / "last.pt", pre


def _photos(root: Path, folder: Path) -> Path:
    """Three of the tiny val images plus one corrupt JPEG in ``folder``."""
    folder.mkdir()
    for png in sorted((root / "data" / "val").glob("*.png")):
        shutil.copy(png, folder / png.name)
    (folder / "extra.png").write_bytes((root / "data" / "train" / "100.png").read_bytes())
    (folder / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0" + b"\x00" * 40)
    return folder


def _load_results(out: Path) -> COCO:
    with contextlib.redirect_stdout(io.StringIO()):
        return COCO(str(out / "images.json")).loadRes(str(out / "detections.json"))


def test_predict_folder_writes_loadable_detections_overlays_and_counts_skips(project, tmp_path):
    root, ckpt, _ = project
    photos = _photos(root, tmp_path / "photos")
    out = tmp_path / "out"
    code, stdout, err = run_cli(
        "predict", "--checkpoint", str(ckpt), "--images", str(photos), "--out", str(out),
        "--render", "--score-threshold", "0",
    )  # fmt: skip
    assert code == 0, err
    results = _load_results(out)
    assert len(results.getImgIds()) == 3 and len(results.getAnnIds()) > 0
    names = {c["name"] for c in json.loads((out / "images.json").read_text())["categories"]}
    assert names == {f"class{c}" for c in CATEGORY_IDS}
    assert {a["category_id"] for a in results.dataset["annotations"]} <= set(CATEGORY_IDS)
    assert len(list((out / "render").glob("*.png"))) == 3
    summary = json.loads((out / "summary.json").read_text())
    assert summary["images"] == 3 and len(summary["skipped"]) == 1
    assert summary["skipped"][0]["file"].endswith("broken.jpg")
    assert "skipped 1 files" in stdout and "broken.jpg: truncated JPEG file" in stdout
    # A score cut and a detection cap are applied per image.
    cut = tmp_path / "cut"
    code, _, err = run_cli(
        "predict", "--checkpoint", str(ckpt), "--images", str(photos), "--out", str(cut),
        "--score-threshold", "0.2", "--max-detections", "2",
    )  # fmt: skip
    assert code == 0, err
    kept = json.loads((cut / "detections.json").read_text())
    assert all(d["score"] >= 0.2 for d in kept)
    per_image = [sum(d["image_id"] == i for d in kept) for i in (1, 2, 3)]
    assert max(per_image) <= 2


def check_predict_scores_the_ap_of_evaluate(root: Path, ckpt: Path, tmp_path: Path) -> None:
    """``predict`` on the val COCO file writes the detections ``evaluate`` scores, to the AP."""
    val_json = root / "data" / "annotations" / "instances_val.json"
    out = tmp_path / "out"
    code, _, err = run_cli(
        "predict", "--checkpoint", str(ckpt), "--images", str(val_json),
        "--image-root", str(root / "data" / "val"), "--out", str(out), "--score-threshold", "0",
    )  # fmt: skip
    assert code == 0, err
    code, _, err = run_cli("evaluate", "--checkpoint", str(ckpt), "--out", str(tmp_path / "e.json"))
    assert code == 0, err
    report = json.loads((tmp_path / "e.json").read_text())["metrics"]
    detections = json.loads((out / "detections.json").read_text())
    assert len(detections) == report["detections"]
    ours = coco_mask_metrics(load_coco(val_json), detections)
    for key in ("AP", "AP50", "AP75"):
        assert ours[key] == pytest.approx(report[key], abs=1e-12)


def test_predict_on_a_coco_file_scores_the_ap_of_evaluate(project, tmp_path):
    root, ckpt, _ = project
    check_predict_scores_the_ap_of_evaluate(root, ckpt, tmp_path)
    # The fine-tuning run kept its final validation detections: the same ones.
    kept = json.loads((ckpt.parent.parent / "detections-val.json").read_text())
    assert kept == json.loads((tmp_path / "e-segm.json").read_text())


def test_evaluate_on_a_file_without_annotations_says_where_the_detections_went(project, tmp_path):
    root, ckpt, _ = project
    coco = json.loads((root / "data" / "annotations" / "instances_val.json").read_text())
    bare = tmp_path / "images-only.json"
    images_only = {"images": coco["images"], "categories": coco["categories"], "annotations": []}
    bare.write_text(json.dumps(images_only))
    out = tmp_path / "e.json"
    code, stdout, err = run_cli(
        "evaluate", "--checkpoint", str(ckpt), "--out", str(out),
        "--set", f"data.val_json={bare}",
    )  # fmt: skip
    assert code == 0, err
    assert "has no annotations" in stdout and str(tmp_path / "e-segm.json") in stdout
    assert "n/a" not in stdout and (tmp_path / "e-segm.json").is_file()


def test_api_gives_the_same_instances_for_a_path_an_array_and_a_pil_image(project):
    root, ckpt, _ = project
    path = sorted((root / "data" / "val").glob("*.png"))[0]
    p = Predictor.from_checkpoint(ckpt)
    by_path = p(path)
    array = np.asarray(Image.open(path).convert("RGB"))
    for found in (p(array), p(Image.open(path))):
        assert len(found) == len(by_path) > 0
        np.testing.assert_array_equal(found.masks, by_path.masks)
        np.testing.assert_array_equal(found.scores, by_path.scores)
        np.testing.assert_array_equal(found.labels, by_path.labels)
        assert found.label_names == by_path.label_names
    assert by_path.masks.shape[1:] == array.shape[:2] and by_path.boxes.shape == (len(by_path), 4)
    assert set(by_path.label_names) <= {f"class{c}" for c in CATEGORY_IDS}


def test_a_pretraining_checkpoint_gives_class_agnostic_objects(project, tmp_path):
    root, _, pre = project
    p = Predictor.from_checkpoint(pre)
    assert p.categories == [(1, "object")] and p.class_agnostic
    found = p(sorted((root / "data" / "val").glob("*.png"))[0])
    assert len(found) > 0 and set(found.label_names) == {"object"}
    out = tmp_path / "out"
    code, _, err = run_cli(
        "predict", "--checkpoint", str(pre), "--images", str(root / "data" / "val"),
        "--out", str(out), "--score-threshold", "0",
    )  # fmt: skip
    assert code == 0, err
    assert {d["category_id"] for d in json.loads((out / "detections.json").read_text())} == {1}


def test_empty_input_and_wrong_checkpoint_are_one_line_errors(project, tmp_path):
    root, ckpt, _ = project
    (tmp_path / "empty").mkdir()
    code, _, err = run_cli(
        "predict", "--checkpoint", str(ckpt), "--images", str(tmp_path / "empty")
    )
    assert code == 2 and len(err.strip().splitlines()) == 1 and "no images" in err
    wrong = tmp_path / "wrong.pt"
    wrong.write_text("not a checkpoint")
    code, _, err = run_cli("predict", "--checkpoint", str(wrong), "--images", str(root / "data"))
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert "wrong.pt" in err
