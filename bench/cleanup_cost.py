"""What the mask clean-up (issue 22) costs next to the backbone, measured in one process.

    python bench/cleanup_cost.py [--config configs/demo.toml] [--images DIR] [--num-images 32]
                                 [--clean-config configs/photos.toml] [--repeats 3]
                                 [--out bench/results/cleanup_cost.json]

On the same decoded batches: the backbone forward, stage one's steps 2-8 in the paper's form and
in the cleaned form of ``--clean-config``'s ``[proposals]``, each the best of ``--repeats``
passes, interleaved so a shared machine slows all three alike. Reports the clean-up's extra time
as a share of backbone + paper-form proposals (a lower bound of stage one's time per image, so
the share is an upper bound of its throughput cost).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from pipeline.backbones import build_backbone  # noqa: E402
from pipeline.config import load_pipeline_config  # noqa: E402
from pipeline.images import (  # noqa: E402
    decode_image,
    list_images,
    normalise,
    pad_batch,
    resize_keep_ratio,  # noqa: E402
)
from pipeline.saliency import propose  # noqa: E402
from pipeline.shard_plan import CLEANUP_FIELDS  # noqa: E402


def best_time(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def time_batch(net, items: list, paper, cleaned, repeats: int) -> dict[str, float]:
    """Best-of-``repeats`` seconds of the backbone and of both forms on one batch."""
    stride = net.saliency_stride
    imgs = [decode_image(it.path) for it in items]
    resized = [resize_keep_ratio(im, paper.short_side, paper.max_side)[0] for im in imgs]
    sizes = [r.shape[:2] for r in resized]
    x = pad_batch([normalise(r) for r in resized], net.size_divisor)
    valid = [(math.ceil(h / stride), math.ceil(w / stride)) for h, w in sizes]
    orig = [im.shape[:2] for im in imgs]
    with torch.inference_mode():
        feats = net.saliency_features(x, sizes)
        runs = {
            "backbone": lambda: net.saliency_features(x, sizes),
            "paper": lambda: propose(feats, valid, sizes, orig, float(stride), paper),
            "cleaned": lambda: propose(feats, valid, sizes, orig, float(stride), cleaned),
        }
        return {name: best_time(fn, repeats) for name, fn in runs.items()}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--config", default="configs/demo.toml")
    p.add_argument("--clean-config", default="configs/photos.toml")
    p.add_argument("--images", default="data/demo/train")
    p.add_argument("--num-images", type=int, default=32)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--out", default="bench/results/cleanup_cost.json")
    args = p.parse_args()
    cfg = load_pipeline_config(args.config)[0]
    clean = load_pipeline_config(args.clean_config)[0].proposals
    paper = cfg.proposals
    switches = {k: getattr(clean, k) for k in CLEANUP_FIELDS}
    cleaned = dataclasses.replace(paper, **switches)
    net = build_backbone(cfg.backbone).eval()
    items = list_images(args.images)[: args.num_images]
    totals = {"backbone": 0.0, "paper": 0.0, "cleaned": 0.0}
    for s in range(0, len(items), paper.batch_size):
        batch = time_batch(net, items[s : s + paper.batch_size], paper, cleaned, args.repeats)
        totals = {k: totals[k] + batch[k] for k in totals}
    extra = totals["cleaned"] - totals["paper"]
    result = {
        "images": len(items),
        "threads": torch.get_num_threads(),
        "seconds": totals,
        "cleanup_extra_s": extra,
        "cleanup_share_of_stage": extra / (totals["backbone"] + totals["paper"]),
        "cleaned_settings": switches,
    }
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
