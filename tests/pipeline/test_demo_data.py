"""The embedded demo dataset: determinism, valid COCO, exact disjoint masks, no colour shortcut."""

from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path

import cv2
import numpy as np
import pytest
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO

from pipeline.cli import main
from pipeline.config import DataConfig
from pipeline.demo.data import CATEGORIES, area_bucket, build_demo_dataset, render_sample

TINY = DataConfig(seed=3, num_train=6, num_val=3, min_size=96, max_size=160)


def load_coco(path: Path) -> COCO:
    with contextlib.redirect_stdout(io.StringIO()):
        return COCO(str(path))


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("demo")
    return out, build_demo_dataset(out, TINY)


@pytest.fixture(scope="module")
def moderate() -> list:
    """48 images at the default sizes, rendered in memory (no files): ~150 instances."""
    cfg = DataConfig(seed=11)
    return [render_sample(cfg.seed, "train", i, cfg) for i in range(48)]


def test_layout_and_summary(tiny):
    out, summary = tiny
    assert summary["train"]["images"] == 6 and summary["val"]["images"] == 3
    for split, n in (("train", 6), ("val", 3)):
        assert len(list((out / split).glob("*.jpg"))) == n
        data = json.loads((out / "annotations" / f"instances_{split}.json").read_text())
        assert [c["id"] for c in data["categories"]] == list(range(1, len(CATEGORIES) + 1))
        assert [c["name"] for c in data["categories"]] == CATEGORIES
        assert len(data["annotations"]) == summary[split]["instances"]
        assert sum(summary[split]["per_category"].values()) == summary[split]["instances"]


def test_same_seed_is_byte_identical_other_seed_differs(tiny, tmp_path):
    out, _ = tiny
    again = tmp_path / "again"
    build_demo_dataset(again, TINY)
    for rel in (
        "annotations/instances_train.json",
        "annotations/instances_val.json",
        "train/train_000000.jpg",
        "val/val_000002.jpg",
    ):
        assert (out / rel).read_bytes() == (again / rel).read_bytes(), rel
    other = tmp_path / "other"
    build_demo_dataset(other, DataConfig(seed=4, num_train=6, num_val=3, min_size=96, max_size=160))
    for rel in ("annotations/instances_train.json", "annotations/instances_val.json"):
        assert (out / rel).read_bytes() != (other / rel).read_bytes()


def test_coco_is_valid_and_areas_boxes_sizes_match(tiny):
    out, _ = tiny
    for split in ("train", "val"):
        coco = load_coco(out / "annotations" / f"instances_{split}.json")
        for img in coco.dataset["images"]:
            assert TINY.min_size <= img["height"] <= TINY.max_size
            assert TINY.min_size <= img["width"] <= TINY.max_size
            pixels = cv2.imread(str(out / split / img["file_name"]))
            assert pixels.shape == (img["height"], img["width"], 3)
        assert coco.dataset["annotations"], "no instances at all"
        for ann in coco.dataset["annotations"]:
            assert ann["iscrowd"] == 0 and isinstance(ann["segmentation"]["counts"], str)
            assert 1 <= ann["category_id"] <= len(CATEGORIES)
            m = coco.annToMask(ann)
            assert m.sum() == ann["area"] > 0
            x, y, w, h = (int(v) for v in ann["bbox"])
            ys, xs = np.nonzero(m)
            assert (xs.min(), ys.min(), xs.max() + 1, ys.max() + 1) == (x, y, x + w, y + h)


def test_masks_are_disjoint_and_equal_the_rendered_objects(tiny):
    out, _ = tiny
    coco = load_coco(out / "annotations" / "instances_train.json")
    for index, img in enumerate(sorted(coco.dataset["images"], key=lambda i: i["id"])):
        anns = sorted(coco.loadAnns(coco.getAnnIds(imgIds=[img["id"]])), key=lambda a: a["id"])
        decoded = np.stack([coco.annToMask(a) for a in anns]).astype(bool)
        assert decoded.sum(0).max() <= 1, "overlapping instance masks"
        sample = render_sample(TINY.seed, "train", index, TINY)
        assert np.array_equal(decoded, sample.masks)
        assert [a["category_id"] for a in anns] == sample.labels.tolist()
        jpeg = cv2.imread(str(out / "train" / img["file_name"]))[:, :, ::-1].astype(float)
        assert np.abs(jpeg - sample.image).mean() < 6  # the JPEG is the rendered image


def test_render_is_a_pure_function_of_seed_split_index():
    a = render_sample(5, "val", 7, TINY)
    render_sample(5, "val", 8, TINY)
    b = render_sample(5, "val", 7, TINY)
    assert np.array_equal(a.image, b.image) and np.array_equal(a.masks, b.masks)
    c = render_sample(5, "train", 7, TINY)
    assert a.image.shape != c.image.shape or not np.array_equal(a.image, c.image)


def test_classes_scales_and_counts_vary(moderate):
    labels = np.concatenate([s.labels for s in moderate])
    assert len(set(labels.tolist())) >= 5
    assert all(1 <= len(s.labels) <= 6 for s in moderate)
    buckets = {area_bucket(int(m.sum())) for s in moderate for m in s.masks}
    assert buckets == {"small", "medium", "large"}
    shapes = {s.image.shape[:2] for s in moderate}
    assert len(shapes) > 40 and all(320 <= min(hw) and max(hw) <= 480 for hw in shapes)
    # Every RLE round-trips (pycocotools) and no mask is empty.
    for s in moderate:
        for m in s.masks:
            rle = mask_utils.encode(np.asfortranarray(m.astype(np.uint8)))
            assert m.any() and np.array_equal(mask_utils.decode(rle).astype(bool), m)


def test_class_is_not_predictable_from_mean_colour(moderate):
    """Nearest-class-centroid on an instance's mean RGB + HSV does about as well as chance."""
    feats, labels = [], []
    for s in moderate:
        hsv = cv2.cvtColor(s.image, cv2.COLOR_RGB2HSV).astype(float)
        for m, label in zip(s.masks, s.labels):
            hue = hsv[..., 0][m] * (np.pi / 90)  # circular mean hue
            feats.append(
                [
                    *s.image[m].mean(0),
                    np.cos(hue).mean(),
                    np.sin(hue).mean(),
                    hsv[..., 1][m].mean(),
                    hsv[..., 2][m].mean(),
                ]
            )
            labels.append(label)
    x = np.asarray(feats)
    x = (x - x.mean(0)) / (x.std(0) + 1e-9)
    y = np.asarray(labels)
    train, test = np.arange(len(y)) % 2 == 0, np.arange(len(y)) % 2 == 1
    classes = np.unique(y[train])
    centroids = np.stack([x[train & (y == c)].mean(0) for c in classes])
    predicted = classes[np.argmin(((x[test, None] - centroids[None]) ** 2).sum(-1), 1)]
    accuracy = (predicted == y[test]).mean()
    assert accuracy < 0.35, f"colour predicts the class ({accuracy:.2f}; chance 1/6)"


def test_cli_writes_dataset_config_and_preview(tmp_path):
    config = tmp_path / "demo.toml"
    config.write_text(
        'name = "demo"\n[data]\nnum_train = 4\nnum_val = 2\nmin_size = 96\nmax_size = 128\n'
    )
    out, png = tmp_path / "data", tmp_path / "preview.png"
    argv = ["data", "--config", str(config), "--out", str(out), "--preview", str(png)]
    assert main("pipeline", {"data": "pipeline.demo.data"}, argv) == 0
    assert len(list((out / "train").glob("*.jpg"))) == 4
    assert (out / "annotations" / "instances_val.json").is_file()
    assert "num_train = 4" in (out / "config.toml").read_text()
    assert cv2.imread(str(png)) is not None
    # A smaller rebuild into the same folder leaves no stale images behind.
    argv = ["data", "--config", str(config), "--out", str(out), "--set", "data.num_train=2"]
    assert main("pipeline", {"data": "pipeline.demo.data"}, argv) == 0
    assert sorted(p.name for p in (out / "train").glob("*.jpg")) == [
        "train_000000.jpg",
        "train_000001.jpg",
    ]


def test_cli_rejects_bad_sizes(tmp_path, capsys):
    config = tmp_path / "demo.toml"
    config.write_text('name = "demo"\n')
    argv = [
        "data",
        "--config",
        str(config),
        "--out",
        str(tmp_path / "d"),
        "--set",
        "data.min_size=500",
    ]
    assert main("pipeline", {"data": "pipeline.demo.data"}, argv) == 2
    assert "min_size" in capsys.readouterr().err


def test_backgrounds_come_only_from_the_measured_subject_free_list(monkeypatch):
    """The property "no salient unlabelled subject": every background is drawn from BACKGROUNDS,
    and every entry there was measured (bench/backgrounds.py) to give stage one no more pseudo
    masks on a background-only image than the plain texture photographs do."""
    import pipeline.demo.data as demo_data
    from pipeline.demo.sources import BACKGROUNDS, PHOTOS

    drawn = []
    real = demo_data.render_background

    def spy(rng, height, width):
        canvas, name = real(rng, height, width)
        drawn.append(name)
        return canvas, name

    monkeypatch.setattr(demo_data, "render_background", spy)
    cfg = DataConfig(seed=5, min_size=64, max_size=96)
    for i in range(40):
        render_sample(cfg.seed, "train", i, cfg)
    approved = {name for name, _ in BACKGROUNDS}
    assert len(drawn) == 40 and set(drawn) <= approved
    assert len(set(drawn)) > 1  # several materials, not one

    measured = json.loads(
        (Path(__file__).resolve().parents[2] / "bench" / "results" / "backgrounds.json").read_text()
    )
    rows = {(r["photo"], r["treatment"]): r for r in measured["rows"]}
    for source in BACKGROUNDS:
        assert source[0] in PHOTOS and source in rows, source
        assert rows[source]["masks_per_image"] <= measured["reference_masks_per_image"], source


def test_if_stale_skips_a_current_folder_and_rebuilds_another_version(tmp_path, capsys):
    config = tmp_path / "demo.toml"
    config.write_text(
        'name = "demo"\n[data]\nnum_train = 2\nnum_val = 1\nmin_size = 64\nmax_size = 80\n'
    )
    out = tmp_path / "data"
    argv = ["data", "--config", str(config), "--out", str(out), "--if-stale"]
    assert main("pipeline", {"data": "pipeline.demo.data"}, argv) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["data_version"] == 2 and len(summary["digest"]) == 64
    capsys.readouterr()
    assert main("pipeline", {"data": "pipeline.demo.data"}, argv) == 0
    assert "up to date" in capsys.readouterr().out
    # A folder of another data version (or whose labels changed) is rebuilt whole.
    (out / "summary.json").write_text(json.dumps({**summary, "data_version": 1}))
    assert main("pipeline", {"data": "pipeline.demo.data"}, argv) == 0
    assert "up to date" not in capsys.readouterr().out
    assert json.loads((out / "summary.json").read_text())["data_version"] == 2


def test_a_folder_of_the_users_own_data_is_left_alone(tmp_path, capsys):
    config = tmp_path / "demo.toml"
    config.write_text(
        'name = "demo"\n[data]\nnum_train = 2\nnum_val = 1\nmin_size = 64\nmax_size = 80\n'
    )
    out = tmp_path / "mine"
    (out / "annotations").mkdir(parents=True)
    (out / "train").mkdir()
    mine = out / "annotations" / "instances_train.json"
    mine.write_text('{"images": []}')
    (out / "train" / "train_000123.jpg").write_bytes(b"my photo")
    argv = ["data", "--config", str(config), "--out", str(out)]
    assert main("pipeline", {"data": "pipeline.demo.data"}, argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and str(out) in err[0] and "--overwrite" in err[0]
    assert mine.read_text() == '{"images": []}'
    assert (out / "train" / "train_000123.jpg").read_bytes() == b"my photo"
    assert main("pipeline", {"data": "pipeline.demo.data"}, [*argv, "--overwrite"]) == 0
    assert not (out / "train" / "train_000123.jpg").exists()
    assert main("pipeline", {"data": "pipeline.demo.data"}, argv) == 0  # now ours: rebuilt
