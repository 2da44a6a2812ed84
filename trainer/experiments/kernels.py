"""Per-kernel mean masks: what each kernel of a trained model has learned (the paper's last figure).

    python -m trainer kernels --checkpoint CKPT [--checkpoint CKPT2 ...] [--label NAME ...]
                              [--images val|train] [--limit N] [--out DIR]

For every kernel n, over the images: its **mean predicted mask** (sigmoid of the last update
stage's mask logits) and the **centres of its confident masks**. Pre-training and fine-tuning
checkpoints alike; the model runs as at test time (no prompts, no targets), one image at a time
(padded only to the model's size divisor, so no image's maps depend on the others).

The common canvas. Images differ in size and aspect ratio, so every map is brought to one square
canvas of ``--canvas`` (64) cells in normalised image coordinates, the way evaluation brings masks
to the image (trainer/stages/evaluate.py): sigmoid on the mask grid, bilinear up-sampling to the
padded input size, crop of the resized image (top-left; the padding is dropped), bilinear resize of
that crop to canvas x canvas (align_corners=False). Canvas cell (row i, column j) covers y in [i/64,
(i+1)/64) and x in [j/64, (j+1)/64) of the image's height and width, so a wide and a tall image are
both stretched to the square: positions and relative extents are comparable, aspect ratios are not.

A kernel's mask on an image is confident when its canvas map's maximum is > ``--threshold`` (0.5);
its centre is the mean (x, y) of the canvas cells > threshold (cell centres, in [0, 1]).

Writes into ``--out`` (default: ``kernels/`` beside the first checkpoint's run):
``kernels-<label>.npz`` (mean (N, c, c), centres (M, 3) rows of kernel, x, y; images) and
``kernels-<label>.png`` (one grid of N panels per checkpoint, dots on the mean masks), and with
two or more checkpoints ``kernels-side-by-side.png`` (the grids next to each other, same colour
scale: e.g. the SP and the baseline fine-tuned models).
"""

from __future__ import annotations

import argparse
import copy
import math
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader, Subset

from pipeline.atomic_files import write_json
from pipeline.cli import UserError
from pipeline.config import apply_override, from_dict
from trainer.config import Config
from trainer.data.coco_dataset import CocoDataset
from trainer.data.datasets import Collate
from trainer.data.transforms import Augment
from trainer.engine.checkpoint import load_checkpoint, load_matching, model_state, training_config

CANVAS = 64
MAX_CANVAS = 1024  # --canvas beyond this is refused: maps cost kernels x canvas^2 per image


def canvas_maps(
    mask_logits: Tensor,
    input_size: tuple[int, int],
    image_size: tuple[int, int],
    canvas: int = CANVAS,
) -> Tensor:
    """(N, h, w) mask logits of one image -> (N, canvas, canvas) probabilities on the common
    canvas (see the module docstring)."""
    probs = mask_logits.float().sigmoid()[None]
    probs = F.interpolate(probs, size=input_size, mode="bilinear", align_corners=False)
    crop = probs[:, :, : image_size[0], : image_size[1]]
    return F.interpolate(crop, size=(canvas, canvas), mode="bilinear", align_corners=False)[0]


def confident_centres(maps: Tensor, threshold: float = 0.5) -> Tensor:
    """(N, c, c) canvas maps -> (M, 3) rows (kernel, x, y) for the kernels whose max > threshold,
    (x, y) the mean cell centre of the cells > threshold, in [0, 1]."""
    c = maps.shape[-1]
    inside = maps > threshold
    confident = inside.flatten(1).any(1)
    centres = (torch.arange(c, dtype=torch.float32, device=maps.device) + 0.5) / c
    count = inside.sum((1, 2)).clamp(min=1).float()
    x = (inside.float() * centres[None, None, :]).sum((1, 2)) / count
    y = (inside.float() * centres[None, :, None]).sum((1, 2)) / count
    kernels = torch.arange(maps.shape[0], device=maps.device).float()
    return torch.stack([kernels, x, y], 1)[confident]


@torch.no_grad()
def kernel_statistics(
    model: nn.Module,
    loader: Any,
    device: torch.device,
    *,
    canvas: int = CANVAS,
    threshold: float = 0.5,
) -> dict[str, Any]:
    """Mean canvas map per kernel over the loader's images and every confident centre:
    {"mean": (N, c, c) float32 array, "centres": (M, 3) array, "images": count}."""
    model.eval()
    total, centres, images = None, [], 0
    for batch in loader:
        x = batch.images.to(device)
        masks = model(x)["stages"][-1]["masks"]
        for i, info in enumerate(batch.infos):
            maps = canvas_maps(masks[i], tuple(x.shape[-2:]), tuple(info["image_size"]), canvas)
            total = maps if total is None else total + maps
            centres.append(confident_centres(maps, threshold).cpu())
            images += 1
    if total is None:
        raise UserError("no image to draw the kernels from")
    return {
        "mean": (total / images).cpu().numpy(),
        "centres": torch.cat(centres).numpy(),
        "images": images,
    }


def collapse_summary(stats: dict[str, Any], active_share: float = 0.05) -> dict[str, float]:
    """How many kernels do distinct work: ``active`` kernels give a confident mask on at least
    ``active_share`` of the images; ``centre_spread`` is the standard deviation of all confident
    centres (x and y averaged, in image fractions: near 0 when every kernel predicts one central
    blob); ``mean_map_cosine`` the mean pairwise cosine of the active kernels' mean maps (near 1
    when they are copies of each other)."""
    mean, centres, images = stats["mean"], stats["centres"], max(int(stats["images"]), 1)
    counts = (
        np.bincount(centres[:, 0].astype(np.int64), minlength=mean.shape[0])
        if len(centres)
        else np.zeros(mean.shape[0], np.int64)
    )
    active = np.flatnonzero(counts >= active_share * images)
    spread = float(centres[:, 1:].std(axis=0).mean()) if len(centres) > 1 else 0.0
    cosine = float("nan")
    if len(active) > 1:
        flat = mean[active].reshape(len(active), -1)
        flat = flat / np.maximum(np.linalg.norm(flat, axis=1, keepdims=True), 1e-12)
        sim = flat @ flat.T
        cosine = float(sim[~np.eye(len(active), dtype=bool)].mean())
    return {
        "kernels": int(mean.shape[0]),
        "active": int(len(active)),
        "confident_masks_per_image": float(len(centres) / images),
        "centre_spread": spread,
        "mean_map_cosine": cosine,
    }


def load_model(path: Path, overrides: list[str]) -> tuple[nn.Module, Config]:
    """The model a training checkpoint holds, built from its own config (``--set`` applied)."""
    from pipeline.backbones.build import build_backbone
    from trainer.model.factory import QUERY_KINDS, build_model

    state = load_checkpoint(path)
    raw, num_classes = training_config(state, path)
    raw = copy.deepcopy(raw)
    for assignment in overrides:
        apply_override(raw, assignment)
    cfg = from_dict(Config, raw)
    if cfg.model.kind not in QUERY_KINDS:
        raise UserError(
            f"kernels: {path} is a model.kind = '{cfg.model.kind}' checkpoint, which has no "
            f"kernels (query-based models only: {', '.join(QUERY_KINDS)})"
        )
    model = build_model(cfg.model, build_backbone(cfg.backbone), int(num_classes))
    # strict: every tensor must fit (a frozen backbone is filled in from backbone.weights)
    load_matching(model, model_state(state, model, path), allowed_skips=())
    return model, cfg


def image_loader(cfg: Config, which: str, size_divisor: int, limit: int) -> DataLoader:
    """The val or train images (sorted by id, the first ``limit`` when > 0), resized as in
    fine-tuning evaluation (finetune.short_side / max_side, no flip or rotation)."""
    ft = cfg.finetune
    ann, root = (
        (cfg.data.val_json, cfg.data.val_images)
        if which == "val"
        else (cfg.data.train_json, cfg.data.train_images)
    )
    dataset = CocoDataset(
        ann, root, Augment(ft.short_side, ft.max_side), train=False, with_masks=False
    )
    if limit > 0:
        dataset = Subset(dataset, range(min(limit, len(dataset))))
    # One image per batch: padding to a batch's largest image changes what K-Net pools (its
    # kernels see the padded grid), so each image is padded only to the model's divisor and its
    # maps do not depend on which other images share its batch.
    return DataLoader(dataset, batch_size=1, collate_fn=Collate(size_divisor))


def draw_grids(stats: dict[str, dict[str, Any]], png: Path) -> Path:
    """One block per checkpoint, side by side: every kernel's mean mask (0-1, one colour scale)
    with its confident centres as dots."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = max(s["mean"].shape[0] for s in stats.values())
    cols = math.ceil(math.sqrt(n))
    rows = math.ceil(n / cols)
    fig = plt.figure(figsize=(1.1 * cols * len(stats) + 0.5, 1.1 * rows + 0.6))
    blocks = fig.subfigures(1, len(stats), squeeze=False)[0]
    for block, (label, s) in zip(blocks, stats.items()):
        axes = block.subplots(rows, cols, squeeze=False)
        block.suptitle(f"{label} ({s['images']} images)", fontsize=9)
        for k, ax in enumerate(axes.flat):
            ax.set_axis_off()
            if k >= s["mean"].shape[0]:
                continue
            ax.imshow(s["mean"][k], vmin=0, vmax=1, cmap="viridis", extent=(0, 1, 1, 0))
            dots = s["centres"][s["centres"][:, 0] == k]
            ax.scatter(dots[:, 1], dots[:, 2], s=3, c="red", linewidths=0)
            ax.set_title(f"{k} ({len(dots)})", fontsize=6, pad=1)
    fig.savefig(png, dpi=110)
    plt.close(fig)
    return png


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--checkpoint", action="append", required=True, help="checkpoint (repeat to compare)"
    )
    parser.add_argument("--label", action="append", default=[], help="name of each checkpoint")
    parser.add_argument("--images", choices=("val", "train"), default="val")
    parser.add_argument("--limit", type=int, default=0, help="first N images (0: all)")
    parser.add_argument("--out", default="", help="folder (default: kernels/ beside the run)")
    parser.add_argument("--canvas", type=int, default=CANVAS, help="canvas cells per side")
    parser.add_argument("--threshold", type=float, default=0.5, help="confident-mask threshold")
    parser.epilog = (
        "Model and data settings come from each checkpoint's own config (--set applies)."
    )


def _default_run(path: Path) -> Path:
    """runs/.../sp-seed0/checkpoints/last.pt -> runs/.../sp-seed0."""
    return path.parent.parent if path.parent.name == "checkpoints" else path.parent


def _default_label(path: Path) -> str:
    """The run's folder name for CKPT in a run's checkpoints/, else the file's stem."""
    return path.parent.parent.name if path.parent.name == "checkpoints" else path.stem


def run(args: argparse.Namespace) -> int:
    from trainer.engine.distributed import init_distributed

    paths = [Path(p) for p in args.checkpoint]
    labels = args.label or [_default_label(p) for p in paths]
    if len(labels) != len(paths) or len(set(labels)) != len(labels):
        raise UserError("give one distinct --label per --checkpoint (or none)")
    if not 2 <= args.canvas <= MAX_CANVAS or not 0.0 < args.threshold < 1.0:
        # (kernels x canvas^2 floats per image: 100000 cells a side would need terabytes)
        raise UserError(
            f"--canvas must be in [2, {MAX_CANVAS}] and --threshold in (0, 1), got "
            f"{args.canvas} and {args.threshold:g}"
        )
    out = Path(args.out) if args.out else _default_run(paths[0]) / "kernels"
    out.mkdir(parents=True, exist_ok=True)
    device = init_distributed()
    stats = {}
    for path, label in zip(paths, labels):
        model, cfg = load_model(path, args.overrides)
        model.to(device)
        loader = image_loader(cfg, args.images, model.size_divisor, args.limit)
        s = kernel_statistics(model, loader, device, canvas=args.canvas, threshold=args.threshold)
        np.savez(out / f"kernels-{label}.npz", **s)
        draw_grids({label: s}, out / f"kernels-{label}.png")
        summary = collapse_summary(s)
        write_json(out / f"kernels-{label}.json", summary)
        stats[label] = s
        print(
            f"kernels: {label}: {s['mean'].shape[0]} kernels over {s['images']} images, "
            f"{len(s['centres'])} confident masks, {summary['active']} kernels active on >= 5% "
            f"of the images, centre spread {summary['centre_spread']:.3f}, mean-map cosine "
            f"{summary['mean_map_cosine']:.2f} -> {out / f'kernels-{label}.png'}"
        )
    if len(stats) > 1:
        png = draw_grids(stats, out / "kernels-side-by-side.png")
        print(f"kernels: side by side -> {png}")
    return 0
