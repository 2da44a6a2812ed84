"""The shard inspector on hand-made shards: summary counts, one image, rendered grids, COCO
export round trip, recall/AP against ground truth, one-line errors."""

from __future__ import annotations

import contextlib
import io
import json
import subprocess
import sys
from pathlib import Path

import cv2
import h5py
import numpy as np
import pytest
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO

from pipeline.cli import UserError, main
from pipeline.inspection.coco_export import to_coco
from pipeline.inspection.command import find_image
from pipeline.inspection.recall import recall_against_gt
from pipeline.inspection.render import PALETTE, render
from pipeline.inspection.summary import summarise
from pipeline.shards.schema import (
    STATUS_EMPTY,
    STATUS_OK,
    STATUS_UNREADABLE,
    ImageRecord,
    shard_name,
    write_shard,
)

ROOT = Path(__file__).resolve().parents[2]
COMMANDS = {"inspect": "pipeline.inspection.command"}
C = 4
META = {
    "fingerprint": "a" * 64,
    "backbone": "dinov2_vits14",
    "feature_stride": 14,
    "embed_dim": C,
    "settings": {"score_threshold": 0.5, "top_k": 20},
}
H, W = 40, 48
# Masks as rectangles (x0, y0, x1, y1), x1/y1 exclusive.
RECTS = {
    "a.png": [(2, 2, 12, 12), (20, 10, 40, 30)],
    "b.png": [(0, 0, 8, 16)],
    "gone.png": [(5, 5, 15, 25)],
}
SCORES = {"a.png": [0.9, 0.6], "b.png": [0.8], "gone.png": [0.7]}
IDS = {"a.png": 11, "b.png": 12, "c.png": 13, "d.png": 14, "gone.png": 15}


def rect_mask(rect: tuple[int, int, int, int], h: int = H, w: int = W) -> np.ndarray:
    m = np.zeros((h, w), np.uint8)
    x0, y0, x1, y1 = rect
    m[y0:y1, x0:x1] = 1
    return m


def rle(mask: np.ndarray) -> dict:
    return mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))


def ok_record(
    name: str, image_id: int, rects: list, scores: list, h: int = H, w: int = W
) -> ImageRecord:
    k = len(rects)
    seeds = np.eye(k, C, dtype=np.float16)
    return ImageRecord(
        file_name=name,
        image_id=image_id,
        height=h,
        width=w,
        status=STATUS_OK,
        rles=[rle(rect_mask(r, h, w))["counts"] for r in rects],
        boxes=np.array(rects, np.float32).reshape(k, 4),
        scores=np.array(scores, np.float32),
        seeds=seeds,
        seed_pos=np.array([[s, 3 + s, 4 + s] for s in range(k)], np.int16),
    )


def write_images(root: Path) -> None:
    """a.png black, b.png white, c.png grey; d.png and gone.png are not on disk."""
    root.mkdir(parents=True, exist_ok=True)
    for name, value in (("a.png", 0), ("b.png", 255), ("c.png", 100)):
        cv2.imwrite(str(root / name), np.full((H, W, 3), value, np.uint8))


@pytest.fixture()
def shards(tmp_path) -> Path:
    """Two shards: [a (2 masks), b (1), c (empty)] and [d (unreadable), gone (1, file missing)]."""
    write_images(tmp_path / "images")
    out = tmp_path / "proposals"
    first = [ok_record(n, IDS[n], RECTS[n], SCORES[n]) for n in ("a.png", "b.png")]
    first.append(ImageRecord("c.png", IDS["c.png"], H, W, STATUS_EMPTY))
    write_shard(out / shard_name(0), first, META)
    second = [
        ImageRecord("d.png", IDS["d.png"], 0, 0, STATUS_UNREADABLE, "truncated PNG file"),
        ok_record("gone.png", IDS["gone.png"], RECTS["gone.png"], SCORES["gone.png"]),
    ]
    write_shard(out / shard_name(1), second, META)
    return out


def run_cli(argv: list[str]) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main("pipeline", COMMANDS, ["inspect", *argv])
    return code, out.getvalue(), err.getvalue()


def load_coco(path: Path) -> COCO:
    with contextlib.redirect_stdout(io.StringIO()):
        return COCO(str(path))


def write_gt(
    path: Path,
    objects: dict[str, list],
    sizes: dict[str, tuple[int, int]] | None = None,
) -> Path:
    """A COCO GT file with one image per entry of ``objects`` (its rectangles), two categories
    (to check that evaluation ignores classes)."""
    images, anns = [], []
    for name, rects in objects.items():
        h, w = (sizes or {}).get(name, (H, W))
        images.append({"id": IDS[name], "file_name": name, "height": h, "width": w})
        for j, r in enumerate(rects):
            seg = rle(rect_mask(r, h, w))
            seg["counts"] = seg["counts"].decode()
            anns.append(
                {
                    "id": len(anns) + 1,
                    "image_id": IDS[name],
                    "category_id": 3 + j % 2,
                    "segmentation": seg,
                    "area": float(mask_utils.area(seg)),
                    "bbox": [r[0], r[1], r[2] - r[0], r[3] - r[1]],
                    "iscrowd": 0,
                }
            )
    cats = [{"id": 3, "name": "cat"}, {"id": 4, "name": "dog"}]
    path.write_text(json.dumps({"images": images, "annotations": anns, "categories": cats}))
    return path


# --------------------------------------------------------------------------------------------
# Summary and one image


def test_summary_counts(shards):
    s = summarise(shards)
    assert s["num_shards"] == 2 and s["images"] == 5
    assert s["status"] == {"ok": 3, "empty": 1, "unreadable": 1}
    assert s["unreadable_reasons"] == [("truncated PNG file", 1)]
    assert s["masks"] == 4
    assert s["masks_per_image"]["histogram"] == {0: 1, 1: 2, 2: 1}
    assert s["masks_per_image"]["mean"] == pytest.approx(1.0)
    assert s["score"]["p0"] == pytest.approx(0.6) and s["score"]["p100"] == pytest.approx(0.9)
    assert s["score"]["mean"] == pytest.approx(0.75)
    areas = sorted([100, 400, 128, 200])
    assert s["area_fraction"]["p0"] == pytest.approx(areas[0] / (H * W))
    assert s["area_fraction"]["p100"] == pytest.approx(areas[-1] / (H * W))
    assert s["bytes"] == sum(p.stat().st_size for p in shards.glob("shard-*.h5"))
    assert s["bytes_per_image"] == pytest.approx(s["bytes"] / 5)
    assert not s["mixed_fingerprints"] and s["fingerprints"] == {"a" * 64: 2}
    assert s["meta"]["backbone"] == "dinov2_vits14" and s["meta"]["embed_dim"] == C
    assert s["meta"]["feature_stride"] == 14 and s["meta"]["settings"]["top_k"] == 20
    assert s["missing_shards"] == [] and s["temp_files"] == [] and s["duplicate_image_ids"] == 0


def test_summary_printed_and_mixed_fingerprints_loud(shards):
    code, out, _ = run_cli([str(shards)])
    assert code == 0
    assert "ok 3  empty 1  unreadable 1" in out and "truncated PNG file" in out
    assert "MIXED" not in out and "a" * 64 in out
    # A third shard with another fingerprint after a gap, plus a leftover temp file.
    other = {**META, "fingerprint": "b" * 64}
    write_shard(shards / shard_name(3), [ok_record("a.png", 99, RECTS["a.png"], [0.5, 0.4])], other)
    (shards / "shard-00002.h5.1234.tmp").write_bytes(b"partial")
    s = summarise(shards)
    assert s["mixed_fingerprints"] and s["fingerprints"] == {"a" * 64: 2, "b" * 64: 1}
    assert s["missing_shards"] == [2] and s["temp_files"] == ["shard-00002.h5.1234.tmp"]
    code, out, err = run_cli([str(shards)])
    assert code == 0
    assert "MIXED FINGERPRINTS" in out and "INCOMPLETE" in out and "WARNING" in err
    assert "1234.tmp" in out


def test_plan_tells_missing_trailing_shards(shards):
    (shards / "plan.json").write_text(json.dumps({"num_shards": 4}))
    s = summarise(shards)
    assert s["planned_shards"] == 4 and s["missing_shards"] == [2, 3]


def test_image_listing(shards):
    path, index, rec = find_image(shards, 11)
    assert path.name == shard_name(0) and index == 0 and rec.file_name == "a.png"
    assert find_image(shards, "gone.png")[2].image_id == 15
    code, out, _ = run_cli([str(shards), "--image", "11"])
    assert code == 0
    section = out.split("image 11", 1)[1].splitlines()
    assert "a.png" in section[0] and "48x40" in section[0] and "status ok" in section[0]
    rows = [line.split() for line in section[2:4]]
    # index, score, area px, area %, box, seed position
    assert rows[0][:3] == ["0", "0.900", "100"] and rows[0][4] == "2,2,12,12"
    assert rows[0][5] == "(0,3,4)"
    assert rows[1][:3] == ["1", "0.600", "400"] and rows[1][4] == "20,10,40,30"
    assert rows[1][3] == f"{100 * 400 / (H * W):.2f}%"
    code, out, _ = run_cli([str(shards), "--image", "14"])
    assert "status unreadable" in out and "truncated PNG file" in out and "no masks" in out
    code, _, err = run_cli([str(shards), "--image", "777"])
    assert code == 2 and len(err.strip().splitlines()) == 1 and "777" in err


# --------------------------------------------------------------------------------------------
# Rendering


def test_render_pages_masks_and_placeholders(shards, tmp_path):
    pages = render(shards, tmp_path / "r", tmp_path / "images", max_images=5, grid=2, tile=64)
    assert [p.name for p in pages] == ["grid-0000.png", "grid-0001.png"]  # 4 + 1 cells
    first = cv2.cvtColor(cv2.imread(str(pages[0])), cv2.COLOR_BGR2RGB)
    assert first.shape == (128, 128, 3)
    # a.png is black: its second mask (palette colour 1 at 50 %) is visible in cell (0, 0).
    tint = np.round(0.5 * np.array(PALETTE[1])).astype(int)
    cell_a = first[:64, :64].reshape(-1, 3).astype(int)
    assert (np.abs(cell_a - tint).max(axis=1) <= 2).sum() > 300
    # Shard order: a, b, c | d (unreadable), gone (file missing) -> both grey placeholders.
    second = cv2.cvtColor(cv2.imread(str(pages[1])), cv2.COLOR_BGR2RGB)
    assert np.median(second[:64, :64]) == 128  # d.png, unreadable in the shard
    pages = render(shards, tmp_path / "r2", tmp_path / "images", max_images=3, grid=2, tile=64)
    assert len(pages) == 1
    # The whole grid again with a missing image root: placeholders everywhere, no crash.
    pages = render(shards, tmp_path / "r3", tmp_path / "nowhere", max_images=16, grid=4, tile=64)
    img = cv2.imread(str(pages[0]))
    assert len(pages) == 1 and np.median(img[:64, :64]) == 128


def test_render_cli_uses_config_image_root(shards, tmp_path):
    cfg = tmp_path / "exp.toml"
    cfg.write_text(f'[data]\ntrain_images = "{(tmp_path / "images").as_posix()}"\n')
    code, out, _ = run_cli(
        [str(shards), "--config", str(cfg), "--render", str(tmp_path / "png"), "--max-render", "2"]
    )
    assert code == 0 and "rendered 2 images" in out
    assert sorted(p.name for p in (tmp_path / "png").iterdir()) == ["grid-0000.png"]
    page = cv2.cvtColor(cv2.imread(str(tmp_path / "png" / "grid-0000.png")), cv2.COLOR_BGR2RGB)
    assert page.shape == (1024, 1024, 3)
    # Cell (0, 1) holds b.png (white) fitted into the tile, not a placeholder.
    assert (page[20:230, 300:500] == 255).all(axis=-1).mean() > 0.5


# --------------------------------------------------------------------------------------------
# COCO export


def test_to_coco_loads_and_round_trips(shards, tmp_path):
    path = tmp_path / "pseudo.json"
    data = to_coco(shards, path)
    coco = load_coco(path)
    assert sorted(coco.getImgIds()) == [11, 12, 13, 15]  # the unreadable image is left out
    assert coco.loadCats(coco.getCatIds()) == [
        {"id": 1, "name": "object", "supercategory": "object"}
    ]
    assert len(coco.getAnnIds()) == 4 == len(data["annotations"])
    for name in RECTS:
        anns = coco.loadAnns(coco.getAnnIds(imgIds=IDS[name]))
        assert [a["score"] for a in anns] == pytest.approx(SCORES[name])
        for ann, rect in zip(anns, RECTS[name]):
            np.testing.assert_array_equal(coco.annToMask(ann), rect_mask(rect))
            x0, y0, x1, y1 = rect
            assert ann["bbox"] == [x0, y0, x1 - x0, y1 - y0]
            assert ann["area"] == (x1 - x0) * (y1 - y0) and ann["iscrowd"] == 0
    # The same annotations are a valid results list for loadRes.
    with contextlib.redirect_stdout(io.StringIO()):
        res = coco.loadRes(json.loads(path.read_text())["annotations"])
    assert len(res.getAnnIds()) == 4
    code, out, _ = run_cli([str(shards), "--to-coco", str(tmp_path / "cli.json")])
    assert code == 0 and "4 images, 4 annotations" in out


# --------------------------------------------------------------------------------------------
# Recall against ground truth


def test_recall_identical_masks_is_perfect(shards, tmp_path):
    gt = write_gt(tmp_path / "gt.json", {**RECTS, "c.png": [], "d.png": []})
    r = recall_against_gt(shards, gt)
    m = r["metrics"]
    assert r["images_evaluated"] == 5 and r["images_not_in_gt"] == 0
    assert r["gt_instances"] == 4 and r["masks"] == 4
    for key in ("AR@10", "AR@20", "AR50@10", "AR50@20", "AP", "AP50", "AP75"):
        assert m[key] == pytest.approx(1.0), key
    # One mask per image finds a.png's best object and the single objects of b and gone: 3 / 4.
    assert m["AR@1"] == pytest.approx(0.75) and m["AR50@1"] == pytest.approx(0.75)
    assert m["AR@20_small"] == pytest.approx(1.0) and m["AR@20_large"] is None


def test_recall_disjoint_masks_is_zero(shards, tmp_path):
    far = {name: [(44, 36, 48, 40)] for name in RECTS}  # a corner no pseudo mask touches
    gt = write_gt(tmp_path / "gt.json", far)
    r = recall_against_gt(shards, gt)
    assert r["images_evaluated"] == 3 and r["images_not_in_gt"] == 2  # c, d not in this GT
    for key in ("AR@1", "AR@10", "AR@20", "AR50@20", "AP", "AP50"):
        assert r["metrics"][key] == pytest.approx(0.0), key


def test_recall_half_cases(shards, tmp_path):
    # Every image gets as many extra objects as it has pseudo masks, none of them covered:
    # recall 1/2 at every IoU; precision is 1 up to recall 0.5 and 0 beyond, so AP = 51/101
    # (101 recall points, 0.00 to 0.50 reached).
    missed = [(40, 32, 47, 39), (0, 30, 10, 40)]
    extra = {name: [*rects, *missed[: len(rects)]] for name, rects in RECTS.items()}
    r = recall_against_gt(shards, write_gt(tmp_path / "gt1.json", extra))
    assert r["metrics"]["AR@20"] == pytest.approx(0.5)
    assert r["metrics"]["AR50@20"] == pytest.approx(0.5)
    assert r["metrics"]["AP"] == pytest.approx(51 / 101)
    # GT masks that contain, or lie inside, their pseudo mask with IoU 0.625 (area ratio 5/8):
    # matched at IoU 0.5, 0.55 and 0.6 only, so AR = AP = 3/10.
    grown = {
        "a.png": [(2, 2, 12, 18), (20, 6, 40, 38)],
        "b.png": [(0, 0, 8, 10)],
        "gone.png": [(5, 0, 15, 32)],
    }
    for name, rects in grown.items():
        for pseudo, gt in zip(RECTS[name], rects):
            inter = (rect_mask(pseudo) & rect_mask(gt)).sum()
            assert inter / (rect_mask(pseudo) | rect_mask(gt)).sum() == 0.625
    r = recall_against_gt(shards, write_gt(tmp_path / "gt2.json", grown))
    m = r["metrics"]
    assert m["AR@20"] == pytest.approx(0.3) and m["AP"] == pytest.approx(0.3)
    assert m["AR50@20"] == pytest.approx(1.0) and m["AP50"] == pytest.approx(1.0)
    assert m["AP75"] == pytest.approx(0.0)


def test_recall_score_cuts_and_cli_json(shards, tmp_path):
    gt = write_gt(tmp_path / "gt.json", RECTS)
    r = recall_against_gt(shards, gt, score_cuts=[0.95, 0.75])
    cuts = {b["min_score"]: b for b in r["by_score"]}
    assert cuts[0.75]["AR@20"] == pytest.approx(0.5)  # keeps 0.9 (a) and 0.8 (b) of 4 objects
    assert cuts[0.75]["masks_per_image"] == pytest.approx(2 / 3)
    assert cuts[0.95]["AR@20"] == pytest.approx(0.0) and cuts[0.95]["masks_per_image"] == 0
    code, out, _ = run_cli([str(shards), "--gt", str(gt), "--score-cuts", "0.75"])
    assert code == 0 and "AR50@20" in out
    saved = json.loads((shards / "recall.json").read_text())
    assert saved["metrics"]["AR@20"] == pytest.approx(1.0)
    assert saved["by_score"][0]["min_score"] == 0.75 and saved["gt"] == str(gt)


def test_recall_refuses_other_sizes_and_foreign_gt(shards, tmp_path):
    gt = write_gt(tmp_path / "gt.json", RECTS, sizes={"b.png": (W, H)})
    with pytest.raises(UserError, match="12 .*48x40 in the shards but 40x48"):
        recall_against_gt(shards, gt)
    foreign = tmp_path / "foreign.json"
    foreign.write_text(
        json.dumps(
            {
                "images": [{"id": 1, "file_name": "x", "height": 4, "width": 4}],
                "annotations": [],
                "categories": [],
            }
        )
    )
    with pytest.raises(UserError, match="none of the 5 shard images"):
        recall_against_gt(shards, foreign)


# --------------------------------------------------------------------------------------------
# Bad input


def test_bad_input_is_one_line(shards, tmp_path):
    (tmp_path / "empty").mkdir()
    bad = tmp_path / "bad"
    write_shard(bad / shard_name(0), [ImageRecord("c.png", 1, H, W, STATUS_EMPTY)], META)
    with h5py.File(bad / shard_name(0), "r+") as f:
        f.attrs["schema_version"] = 99
    cases = {
        str(tmp_path / "nope"): "not found",
        str(tmp_path / "empty"): "no shard files",
        str(bad): "schema version 99",
    }
    for folder, words in cases.items():
        code, out, err = run_cli([folder])
        assert code == 2 and words in err and len(err.strip().splitlines()) == 1, err
    code, _, err = run_cli([str(shards), "--gt", str(tmp_path / "missing.json")])
    assert code == 2 and "ground-truth file not found" in err


def test_duplicate_image_ids_refused_for_coco(shards, tmp_path):
    write_shard(
        shards / shard_name(2), [ok_record("a.png", IDS["a.png"], RECTS["a.png"], [0.5, 0.4])], META
    )
    assert summarise(shards)["duplicate_image_ids"] == 1
    with pytest.raises(UserError, match="image_id 11 appears twice"):
        to_coco(shards, tmp_path / "dup.json")


def test_cli_missing_folder_exits_2_without_traceback(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "pipeline", "inspect", "missing_dir"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
        env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "1"},
    )
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    assert proc.stderr.strip() == "pipeline inspect: error: shard folder not found: missing_dir"
