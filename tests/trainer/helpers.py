"""Helpers shared by the trainer tests: tiny model settings, tiny COCO sets and RLE masks, the
``python -m trainer`` dispatcher with captured output, and the training records of a run."""

from __future__ import annotations

import contextlib
import io
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import cv2
import numpy as np
from pycocotools import mask as mask_util

from pipeline.__main__ import COMMANDS as PIPELINE_COMMANDS
from pipeline.cli import main
from trainer.__main__ import COMMANDS
from trainer.config import ModelConfig
from trainer.engine.metrics_log import read_metrics

# A K-Net small enough for CPU tests (6 kernels of width 16, 2 update stages).
TINY_MODEL = ModelConfig(num_kernels=6, channels=16, num_stages=2, num_heads=2, ffn_dim=32)
# The same model as ``--set`` assignments for the command-line tests.
TINY_MODEL_SETTINGS = [
    f"model.{name}={getattr(TINY_MODEL, name)}"
    for name in ("num_kernels", "channels", "num_stages", "num_heads", "ffn_dim")
]


def _captured(prog: str, commands: dict[str, str], argv: Sequence[str]) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(prog, commands, list(argv))
    return code, out.getvalue(), err.getvalue()


def run_cli(*argv: str) -> tuple[int, str, str]:
    """``python -m trainer ARGV`` in this process: (exit code, stdout, stderr)."""
    return _captured("trainer", COMMANDS, argv)


def run_pipeline(*argv: str) -> tuple[int, str, str]:
    """``python -m pipeline ARGV`` in this process: (exit code, stdout, stderr)."""
    return _captured("pipeline", PIPELINE_COMMANDS, argv)


def train_records(out_dir: Path) -> list[dict[str, Any]]:
    """The kind "train" records of ``out_dir/metrics.jsonl``, in file order."""
    return [r for r in read_metrics(out_dir / "metrics.jsonl") if r["kind"] == "train"]


def coco_rle(mask: np.ndarray) -> dict[str, Any]:
    """(h, w) 0/1 mask -> COCO compressed RLE with a str "counts" (JSON-serialisable)."""
    rle = mask_util.encode(np.asfortranarray(mask.astype(np.uint8)))
    rle["counts"] = rle["counts"].decode()
    return rle


def coco_annotation(
    mask: np.ndarray, ann_id: int, image_id: int, category_id: int
) -> dict[str, Any]:
    """A non-crowd COCO annotation of an (h, w) 0/1 mask: RLE segmentation, area and bbox."""
    rle = coco_rle(mask)
    return {
        "id": ann_id,
        "image_id": image_id,
        "category_id": category_id,
        "segmentation": rle,
        "area": float(mask.sum()),
        "bbox": [float(v) for v in mask_util.toBbox(rle)],
        "iscrowd": 0,
    }


def shard_rles(masks: np.ndarray) -> list[bytes]:
    """(k, h, w) 0/1 masks -> the k compressed RLE counts that a proposal shard stores."""
    return [r["counts"] for r in mask_util.encode(np.asfortranarray(masks.transpose(1, 2, 0)))]


def write_tiny_coco(
    root: Path,
    split: str,
    num_images: int,
    seed: int,
    size: int = 64,
    category_ids: Sequence[int] = (2, 7),
) -> Path:
    """``root/split/<id>.png`` and ``root/annotations/instances_<split>.json``: random-noise
    size x size images (ids 100, 103, ...) with 1-2 filled rectangles/ellipses each, one
    annotation per shape with a category drawn from ``category_ids``. Returns the JSON path."""
    rng = np.random.default_rng(seed)
    folder = root / split
    folder.mkdir(parents=True)
    images, anns = [], []
    for i in range(num_images):
        image_id = 100 + 3 * i
        img = rng.integers(0, 255, (size, size, 3), dtype=np.uint8)
        for _ in range(int(rng.integers(1, 3))):
            m = np.zeros((size, size), np.uint8)
            x0, y0 = rng.integers(0, size // 2, 2)
            w, h = rng.integers(12, size // 2, 2)
            if rng.random() < 0.5:
                m[y0 : y0 + h, x0 : x0 + w] = 1
            else:
                centre, axes = (int(x0 + w // 2), int(y0 + h // 2)), (int(w // 2), int(h // 2))
                cv2.ellipse(m, centre, axes, 0, 0, 360, 1, -1)
            img[m > 0] = rng.integers(0, 255, 3)
            anns.append(coco_annotation(m, len(anns) + 1, image_id, int(rng.choice(category_ids))))
        cv2.imwrite(str(folder / f"{image_id}.png"), img[:, :, ::-1])
        images.append(
            {"id": image_id, "file_name": f"{image_id}.png", "height": size, "width": size}
        )
    cats = [{"id": c, "name": f"class{c}"} for c in category_ids]
    path = root / "annotations" / f"instances_{split}.json"
    path.parent.mkdir(exist_ok=True)
    path.write_text(json.dumps({"images": images, "annotations": anns, "categories": cats}))
    return path
