"""Throughput of the one inference path two ways on the same checkpoint and images: ``evaluate``
(batched DataLoader over a COCO file, scored with COCOeval) and ``predict`` (one image at a time
from files, detections written, optional overlays).

    python bench/predict.py --checkpoint CKPT [--set data.val_json=... --set data.val_images=...]

Prints and writes (``--out``, default bench/results/predict.json) images/s of each; the images
are the checkpoint config's validation set. Both use the checkpoint's input size and the
evaluation's settings (no score cut), so they do the same model work.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline.inputs.listing import list_images  # noqa: E402
from trainer.inference.predict import predict_images  # noqa: E402
from trainer.inference.predictor import Predictor  # noqa: E402
from trainer.stages.coco_metrics import load_coco  # noqa: E402
from trainer.stages.evaluate import build_eval_loader, evaluate  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", required=True)
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    parser.add_argument("--out", default="bench/results/predict.json")
    args = parser.parse_args()
    p = Predictor.from_checkpoint(args.checkpoint, overrides=args.overrides, score_threshold=0.0)
    cfg = p.config
    loader = build_eval_loader(cfg, p.model.size_divisor, num_workers=0)
    t0 = time.perf_counter()
    metrics = evaluate(p, loader, load_coco(cfg.data.val_json), p.device)
    t_eval = time.perf_counter() - t0
    items = list_images(cfg.data.val_json, cfg.data.val_images)
    rows = {"evaluate": {"images": metrics["images"], "seconds": t_eval}}
    for render in (False, True):
        with tempfile.TemporaryDirectory() as out:
            counts = predict_images(p, items, Path(out), render)
        name = "predict --render" if render else "predict"
        rows[name] = {"images": counts["images"], "seconds": counts["seconds"]}
    for row in rows.values():
        row["images_per_second"] = row["images"] / row["seconds"]
    record = {
        "checkpoint": args.checkpoint,
        "overrides": args.overrides,
        "cpu_count": os.cpu_count(),
        "batch_size_evaluate": cfg.finetune.batch_size,
        "rows": rows,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(record, indent=2) + "\n")
    for name, row in rows.items():
        print(f"{name}: {row['images']:.0f} images, {row['images_per_second']:.2f} images/s")


if __name__ == "__main__":
    main()
