"""Which background material has no salient subject? Stage one's own answer, measured.

For every candidate (photograph, treatment) of ``pipeline.demo.sources``, renders N background-only
images exactly as the demo generator draws backgrounds (same sizes, same colour jitter), runs the
demo config's stage one on them (frozen backbone + ``pipeline.saliency.propose.propose``) and
counts the
pseudo masks that survive. On a background with no subject every one of them is a false object:
pre-training would learn it as an object while the labels call it background. The demo's approved
list (``demo_sources.BACKGROUNDS``) is the candidates whose count is at most the plain texture
photographs' (``--reference``), chosen by this measurement, never by a trained model's AP.

    python bench/backgrounds.py [--config configs/demo.toml] [--num-images 12]

Writes ``bench/results/backgrounds.json`` and prints a table.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline.atomic_files import write_json  # noqa: E402
from pipeline.backbones.build import build_backbone  # noqa: E402
from pipeline.config import load_pipeline_config  # noqa: E402
from pipeline.demo.sources import PHOTOS, TREATMENTS, render_background  # noqa: E402
from pipeline.inputs.images import normalise, pad_batch, resize_keep_ratio  # noqa: E402
from pipeline.saliency.propose import propose  # noqa: E402

TEXTURES = ("brick.png", "grass.png", "gravel.png", "moon.png", "hubble_deep_field.jpg", "ihc.png")


def candidates() -> list[tuple[str, str]]:
    """Every photograph as a plain crop (textures, and the subject photos as data version 1 used
    them), and every subject photograph magnified or blurred."""
    out = [(name, "texture") for name in PHOTOS]
    subjects = [name for name in PHOTOS if name not in TEXTURES]
    out += [(name, t) for name in subjects for t in TREATMENTS if t != "texture"]
    return out


@torch.inference_mode()
def pseudo_masks(backbone, images: list[np.ndarray], cfg) -> list[int]:
    """Stage one on ``images``: the number of pseudo masks kept per image."""
    stride = float(backbone.saliency_stride)
    counts = []
    for start in range(0, len(images), 8):
        chunk = [
            resize_keep_ratio(im, cfg.short_side, cfg.max_side)[0]
            for im in images[start : start + 8]
        ]
        sizes = [im.shape[:2] for im in chunk]
        x = pad_batch([normalise(im) for im in chunk], backbone.size_divisor)
        feats = backbone.saliency_features(x, sizes)
        valid = [(math.ceil(h / stride), math.ceil(w / stride)) for h, w in sizes]
        orig = [im.shape[:2] for im in images[start : start + 8]]
        for p in propose(feats, valid, sizes, orig, stride, cfg):
            counts.append(int(p.masks.shape[0]))
    return counts


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", default="configs/demo.toml")
    parser.add_argument("--num-images", type=int, default=12)
    parser.add_argument("--out", default="bench/results/backgrounds.json")
    args = parser.parse_args()
    cfg, _ = load_pipeline_config(args.config, [])
    backbone = build_backbone(cfg.backbone).eval()
    rows, start = [], time.perf_counter()
    for name, treatment in candidates():
        images = []
        for i in range(args.num_images):
            rng = np.random.default_rng([cfg.data.seed, 7, i])  # same sizes for every candidate
            h = int(rng.integers(cfg.data.min_size, cfg.data.max_size + 1))
            w = int(rng.integers(cfg.data.min_size, cfg.data.max_size + 1))
            bg, _ = render_background(rng, h, w, ((name, treatment),))
            images.append(np.clip(np.round(bg), 0, 255).astype(np.uint8))
        counts = pseudo_masks(backbone, images, cfg.proposals)
        rows.append(
            {
                "photo": name,
                "treatment": treatment,
                "masks_per_image": float(np.mean(counts)),
                "images_with_mask": float(np.mean([c > 0 for c in counts])),
            }
        )
        print(
            f"{name:24s} {treatment:8s} masks/img {rows[-1]['masks_per_image']:5.2f}  "
            f"with a mask {rows[-1]['images_with_mask']:.2f}",
            flush=True,
        )
    ref = [
        r["masks_per_image"] for r in rows if r["treatment"] == "texture" and r["photo"] in TEXTURES
    ]
    report = {
        "command": " ".join(sys.argv),
        "num_images": args.num_images,
        "reference_textures": list(TEXTURES),
        "reference_masks_per_image": float(np.median(ref)),
        "seconds": time.perf_counter() - start,
        "rows": rows,
    }
    write_json(args.out, report)
    print(json.dumps({k: v for k, v in report.items() if k != "rows"}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
