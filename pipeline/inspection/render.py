"""Rendering proposal masks over their images: one tile per image (translucent masks with
outlines, boxes and scores) laid out in PNG grid pages, as ``pipeline inspect --render`` draws.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import cv2
import numpy as np

from pipeline.cli import UserError
from pipeline.shards.folder_reader import iter_records, shard_paths
from pipeline.shards.schema import STATUS_EMPTY, STATUS_UNREADABLE, ImageRecord

# Distinct colours (RGB) for masks in rendered grids.
PALETTE = (
    (230, 25, 75),
    (60, 180, 75),
    (255, 225, 25),
    (0, 130, 200),
    (245, 130, 48),
    (145, 30, 180),
    (70, 240, 240),
    (240, 50, 230),
    (210, 245, 60),
    (250, 190, 212),
    (0, 128, 128),
    (170, 110, 40),
)


def draw_text(img: np.ndarray, text: str, org: tuple[int, int], scale: float = 0.4) -> None:
    """White text with a black outline, readable on any background (in place)."""
    cv2.putText(img, text, org, cv2.FONT_HERSHEY_SIMPLEX, scale, (0, 0, 0), 3, cv2.LINE_AA)
    cv2.putText(img, text, org, cv2.FONT_HERSHEY_SIMPLEX, scale, (255, 255, 255), 1, cv2.LINE_AA)


def render_tile(rec: ImageRecord, image: np.ndarray | None, note: str, tile: int) -> np.ndarray:
    """One (tile, tile, 3) uint8 RGB cell: the image fitted in, masks translucent with outlines,
    boxes and scores; a grey placeholder with ``note`` when ``image`` is None."""
    cell = np.full((tile, tile, 3), 32, np.uint8)
    if image is None:
        cell[:] = 128
        for i, line in enumerate([rec.file_name[-34:], note[:34], note[34:68]]):
            draw_text(cell, line, (6, tile // 2 - 10 + 16 * i))
        return cell
    h, w = image.shape[:2]
    s = min(tile / w, tile / h)
    nw, nh = max(1, round(w * s)), max(1, round(h * s))
    view = cv2.resize(image, (nw, nh), interpolation=cv2.INTER_AREA).astype(np.float32)
    draw_masks = not note and rec.num_masks > 0
    if draw_masks:
        masks = rec.decode_masks()  # (K,H,W) at the original size
        for k in range(rec.num_masks - 1, -1, -1):  # best mask drawn last (on top)
            m = cv2.resize(masks[k], (nw, nh), interpolation=cv2.INTER_NEAREST).astype(bool)
            view[m] = 0.5 * view[m] + 0.5 * np.asarray(PALETTE[k % len(PALETTE)], np.float32)
    view = view.round().clip(0, 255).astype(np.uint8)
    if draw_masks:
        for k in range(rec.num_masks):
            color = PALETTE[k % len(PALETTE)]
            x0, y0, x1, y1 = (float(v) * s for v in rec.boxes[k])
            cv2.rectangle(view, (round(x0), round(y0)), (round(x1) - 1, round(y1) - 1), color, 1)
            draw_text(view, f"{rec.scores[k]:.2f}", (round(x0) + 2, max(10, round(y0) + 11)), 0.35)
    oy, ox = (tile - nh) // 2, (tile - nw) // 2
    cell[oy : oy + nh, ox : ox + nw] = view
    draw_text(cell, f"{rec.image_id}: {rec.file_name[-24:]} ({rec.num_masks})", (4, 12))
    if note:
        draw_text(cell, note[:40], (4, tile - 8))
    return cell


def best_masks(rec: ImageRecord, top_k: int, min_score: float) -> ImageRecord:
    """``rec`` with only its masks scored >= ``min_score``, at most ``top_k`` (0: all)."""
    keep = [k for k in range(rec.num_masks) if rec.scores[k] >= min_score]
    keep = keep[:top_k] if top_k > 0 else keep
    if len(keep) == rec.num_masks:
        return rec
    return dataclasses.replace(
        rec,
        rles=[rec.rles[k] for k in keep],
        boxes=rec.boxes[keep],
        scores=rec.scores[keep],
        seeds=rec.seeds[keep],
        seed_pos=rec.seed_pos[keep],
    )


def render(
    shard_dir: str | Path,
    out_dir: str | Path,
    image_root: str | Path,
    max_images: int = 64,
    grid: int = 4,
    tile: int = 256,
    top_k: int = 0,
    min_score: float = 0.0,
    only: int | None = None,
) -> list[Path]:
    """Draw the first ``max_images`` images (shard order) as ``grid`` x ``grid`` PNG pages.

    Images that cannot be read under ``image_root`` (missing, unreadable, another size than the
    shard records) become a labelled placeholder. A file of another byte size than the one the
    proposals read (plan.json) is another picture under the same name: a UserError naming it,
    never masks drawn over the wrong image. ``top_k`` (0: all) and ``min_score`` choose the
    masks drawn; ``only`` draws the image with that image_id alone. Returns the PNG paths.
    """
    from pipeline.inputs.images import UnreadableImage, decode_image  # lazy: pulls in torch
    from pipeline.shards.plan import check_image_file, recorded_inputs

    if max_images < 1 or grid < 1 or tile < 32:
        raise UserError(
            f"render: need max_images >= 1, grid >= 1, tile >= 32 "
            f"(got {max_images}, {grid}, {tile})"
        )
    paths = shard_paths(shard_dir)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    root = Path(image_root)
    inputs = recorded_inputs(shard_dir)
    file_bytes, recorded_root = inputs.get("file_bytes", {}), inputs.get("image_root", root)
    cells: list[np.ndarray] = []
    for _, _, rec in iter_records(paths):
        if len(cells) >= max_images:
            break
        if only is not None and rec.image_id != only:
            continue
        rec = best_masks(rec, top_k, min_score)
        image, note = None, ""
        if rec.status == STATUS_UNREADABLE:
            note = f"unreadable: {rec.error}"
        else:
            if (root / rec.file_name).exists():
                check_image_file(root / rec.file_name, rec.file_name, file_bytes, recorded_root)
            try:
                image = decode_image(root / rec.file_name)
            except UnreadableImage as e:
                note = f"image {e}"
            if image is not None and image.shape[:2] != (rec.height, rec.width):
                note = f"size {image.shape[1]}x{image.shape[0]} != shard {rec.width}x{rec.height}"
            elif image is not None and rec.status == STATUS_EMPTY:
                note = f"empty: {rec.error or 'no mask survived'}"
        cells.append(render_tile(rec, image, note, tile))
    written = []
    per_page = grid * grid
    for page, start in enumerate(range(0, len(cells), per_page)):
        canvas = np.zeros((grid * tile, grid * tile, 3), np.uint8)
        for j, cell in enumerate(cells[start : start + per_page]):
            r, c = divmod(j, grid)
            canvas[r * tile : (r + 1) * tile, c * tile : (c + 1) * tile] = cell
        path = out / f"grid-{page:04d}.png"
        if not cv2.imwrite(str(path), cv2.cvtColor(canvas, cv2.COLOR_RGB2BGR)):
            raise UserError(f"cannot write {path}")
        written.append(path)
    return written
