"""Stage one in several settings from one backbone pass: the paper's form against clean-ups.

    python bench/teacher_variants.py --images data/demo/annotations/instances_val.json \\
        --image-root data/demo/val --out-root runs/variants/val \\
        --variant paper= --variant clean=proposals.keep_component=true,proposals.dup_iou=0.5

Each ``--variant NAME=KEY=VALUE,KEY=VALUE`` (``--set`` overrides on ``--config``; empty: the
config as it is) gets its own proposals folder ``OUT_ROOT/NAME`` with the shards, fingerprint and
plan.json that ``pipeline proposals`` would write for it (readable by ``pipeline inspect``), but
the backbone runs once per batch for all of them: the variants only differ after the features,
so on a shared machine one pass costs what one ``proposals`` run costs. Results are
deterministic and match ``pipeline proposals`` with the same settings (one shard per 64 images
of the sorted list, the config's batch size). Prints each variant's time in steps 2-8 and the
backbone's, measured in the same process (their ratio is the clean-up's throughput cost).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from pipeline.atomic_files import write_json  # noqa: E402
from pipeline.backbones.build import build_backbone  # noqa: E402
from pipeline.config import load_pipeline_config  # noqa: E402
from pipeline.executors.worker import ProposalWorker, to_records  # noqa: E402
from pipeline.inputs.listing import list_images  # noqa: E402
from pipeline.saliency.propose import propose  # noqa: E402
from pipeline.shards.plan import PLAN_FILE, make_plan, plan_hash, plan_inputs  # noqa: E402
from pipeline.shards.schema import shard_name, write_shard  # noqa: E402


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--config", default="configs/demo.toml")
    p.add_argument("--images", required=True)
    p.add_argument("--image-root", default=None)
    p.add_argument("--limit", type=int, default=0)
    p.add_argument("--out-root", required=True)
    p.add_argument("--variant", action="append", required=True, metavar="NAME=SETS")
    args = p.parse_args()
    base, _ = load_pipeline_config(args.config)
    net = build_backbone(base.backbone)
    workers = {}
    for spec in args.variant:
        name, _, sets = spec.partition("=")
        cfg = load_pipeline_config(args.config, [s for s in sets.split(",") if s])[0]
        out = Path(args.out_root) / name
        workers[name] = ProposalWorker(cfg.backbone, cfg.proposals, out, backbone=net)
    items = list_images(args.images, args.image_root)
    items = items[: args.limit] if args.limit > 0 else items
    shards = make_plan(items, base.proposals.shard_size)
    seconds, backbone_s = dict.fromkeys(workers, 0.0), 0.0
    first = next(iter(workers.values()))
    for index, shard in enumerate(shards):
        records = {name: [] for name in workers}
        for s in range(0, len(shard), base.proposals.batch_size):
            batch = [first.load(it) for it in shard[s : s + base.proposals.batch_size]]
            good = [b for b in batch if b.tensor is not None]
            t0 = time.perf_counter()
            feats, valid = first.features(good)
            backbone_s += time.perf_counter() - t0
            sizes = ([b.resized for b in good], [b.orig for b in good])
            for name, w in workers.items():
                t0 = time.perf_counter()
                props = propose(feats, valid, *sizes, float(net.saliency_stride), w.cfg)
                seconds[name] += time.perf_counter() - t0
                records[name] += to_records(batch, props)
        for name, w in workers.items():
            write_shard(w.out_dir / shard_name(index), records[name], w.meta)
    for name, w in workers.items():
        plan = {
            "plan_hash": plan_hash(shards),
            "fingerprint": w.fingerprint,
            "num_images": len(items),
            "shard_size": base.proposals.shard_size,
            "num_shards": len(shards),
        }
        write_json(w.out_dir / PLAN_FILE, {**plan, **plan_inputs(args.images, items)})
        print(f"{name}: {len(items)} images, steps 2-8 {seconds[name]:.1f} s -> {w.out_dir}")
    print(f"backbone forward {backbone_s:.1f} s (once for all variants)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
