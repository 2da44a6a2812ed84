"""One image's detections drawn over it (``trainer predict --render``): translucent masks with
outlines, boxes, and "class score" labels, the best detection on top."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np

from pipeline.cli import UserError
from pipeline.inspection.render import PALETTE, draw_text
from trainer.inference.instances import Instances

# Overlays larger than this (long side, pixels) are drawn downscaled: a 24 MP photograph's overlay
# need not be 24 MP to be read.
MAX_SIDE = 1600


def draw(image: np.ndarray, found: Instances) -> np.ndarray:
    """(H, W, 3) uint8 RGB -> the overlay, (h, w, 3) uint8 RGB with h, w <= MAX_SIDE."""
    h, w = image.shape[:2]
    s = min(1.0, MAX_SIDE / max(h, w))
    size = (max(1, round(w * s)), max(1, round(h * s)))
    view = cv2.resize(image, size, interpolation=cv2.INTER_AREA) if s < 1 else image.copy()
    canvas = view.astype(np.float32)
    masks = []
    for k in range(len(found) - 1, -1, -1):  # best drawn last (on top)
        m = found.masks[k].astype(np.uint8)
        if s < 1:
            m = cv2.resize(m, size, interpolation=cv2.INTER_NEAREST)
        colour = np.asarray(PALETTE[k % len(PALETTE)], np.float32)
        canvas[m > 0] = 0.5 * canvas[m > 0] + 0.5 * colour
        masks.append((k, m))
    view = canvas.round().clip(0, 255).astype(np.uint8)
    for k, m in masks:
        colour = PALETTE[k % len(PALETTE)]
        contours, _ = cv2.findContours(m, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
        cv2.drawContours(view, contours, -1, colour, 1)
        x0, y0, x1, y1 = (float(v) * s for v in found.boxes[k])
        cv2.rectangle(view, (round(x0), round(y0)), (round(x1) - 1, round(y1) - 1), colour, 1)
        label = f"{found.label_names[k]} {found.scores[k]:.2f}"
        draw_text(view, label, (round(x0) + 2, max(10, round(y0) + 11)), 0.4)
    return view


def write_overlay(path: Path, image: np.ndarray, found: Instances) -> Path:
    """Draw and save as PNG; UserError naming the file when it cannot be written."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if not cv2.imwrite(str(path), cv2.cvtColor(draw(image, found), cv2.COLOR_RGB2BGR)):
        raise UserError(f"cannot write {path}")
    return path
