"""A picture of demo images with their instance masks and class names (``data --preview``)."""

from __future__ import annotations

import contextlib
import io
import math
from pathlib import Path

import cv2
import numpy as np

from pipeline.cli import UserError


def write_preview(out_dir: Path, png: Path, split: str = "train", count: int = 6) -> None:
    """Draw the first ``count`` images of ``split`` with coloured masks and class names."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from pycocotools.coco import COCO

    with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints its progress
        coco = COCO(str(out_dir / "annotations" / f"instances_{split}.json"))
    ids = sorted(coco.getImgIds())[:count]
    if not ids:
        raise UserError(f"no {split} images to preview in {out_dir}")
    cols = min(3, len(ids))
    rows = math.ceil(len(ids) / cols)
    fig = Figure(figsize=(4.2 * cols, 4.0 * rows), dpi=100)
    FigureCanvasAgg(fig)
    palette = np.array(
        [
            [230, 25, 75],
            [60, 180, 75],
            [255, 225, 25],
            [0, 130, 200],
            [245, 130, 48],
            [145, 30, 180],
            [70, 240, 240],
            [240, 50, 230],
        ],
        float,
    )
    for k, image_id in enumerate(ids):
        info = coco.imgs[image_id]
        img = cv2.imread(str(out_dir / split / info["file_name"]), cv2.IMREAD_COLOR)[:, :, ::-1]
        shown = img.astype(float)
        ax = fig.add_subplot(rows, cols, k + 1)
        anns = coco.loadAnns(coco.getAnnIds(imgIds=[image_id]))
        for j, ann in enumerate(anns):
            m = coco.annToMask(ann).astype(bool)
            colour = palette[j % len(palette)]
            shown[m] = 0.6 * shown[m] + 0.4 * colour
        ax.imshow(shown.astype(np.uint8))
        for j, ann in enumerate(anns):
            colour = palette[j % len(palette)] / 255
            ax.contour(coco.annToMask(ann), levels=[0.5], colors=[colour], linewidths=1.2)
            x, y = ann["bbox"][:2]
            ax.text(
                x,
                y,
                coco.cats[ann["category_id"]]["name"],
                fontsize=8,
                va="bottom",
                color="black",
                bbox={"facecolor": colour, "alpha": 0.8, "pad": 1, "lw": 0},
            )
        ax.set_title(
            f"{info['file_name']}  {info['width']}x{info['height']}  {len(anns)} instances",
            fontsize=9,
        )
        ax.axis("off")
    fig.tight_layout()
    png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png)
