"""Benchmark stage one on the demo images: where does proposals throughput go?

    python bench/proposals.py [--config configs/demo.toml] [--set section.key=value ...]
                              [--num-images 32] [--compare-images 400] [--ray-workers 1,2]
                              [--mem-sizes 32,128] [--profile-images 16] [--no-ray]
                              [--out bench/results/proposals.json]

Measured in one run, on one device, with the config's batch size (ratios, never pass/fail):
1. bare backbone forward throughput (images decoded, resized and batched beforehand);
2. end-to-end throughput through the local executor (decode, resize, forward, saliency, RLE,
   shard write) and its ratio to (1);
3. local against Ray with 1 and 2 workers on the same images (the demo's 400 by default), each
   as a ratio to local: throughput of the work itself (the local worker's construction and Ray's
   start-up excluded) and of the whole call including start-up;
4. peak RSS of a whole ``proposals`` run at two dataset sizes (goal: flat);
5. where the time goes: each stage run alone (fractions), plus the top cProfile entries of the
   end-to-end loop's main thread;
6. (1) and (2) again for every ``--precisions`` entry (``fp32``, ``bf16``, ``bf16:compile``...),
   each as a ratio to the first, with the backbone's achieved GFLOP/s against the CPU's peak
   (bench/flops.py), and (1) at every ``--batch-sizes`` entry and ``--threads`` count (in the
   last precision setting).
(3)-(5) run with the config's own precision.
Parts (3), (5) and (6) live in bench/proposals_executors.py, bench/proposals_profile.py and
bench/precisions.py, one question per file.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from bench.flops import step_flops  # noqa: E402
from bench.precisions import batch_size_runs, precision_runs, thread_runs  # noqa: E402
from bench.proposals_executors import executor_runs  # noqa: E402
from bench.proposals_profile import plan_batches, stage_profile, sync  # noqa: E402
from pipeline import cli  # noqa: E402
from pipeline.atomic_files import write_json  # noqa: E402
from pipeline.config import load_pipeline_config  # noqa: E402
from pipeline.executors.dispatch import run_local  # noqa: E402
from pipeline.executors.ray_cluster import machine_cpus  # noqa: E402
from pipeline.executors.worker import ProposalWorker  # noqa: E402
from pipeline.inputs.images import (  # noqa: E402
    decode_image,
    normalise,
    pad_batch,
    resize_keep_ratio,
)
from pipeline.inputs.listing import list_images  # noqa: E402
from pipeline.precision import autocast  # noqa: E402
from pipeline.shards.plan import make_plan  # noqa: E402


def bare_backbone(worker: ProposalWorker, items: list, shard_size: int) -> dict:
    """(1) forward passes only, on batches preloaded in memory (on the device)."""
    cfg, net, dev = worker.cfg, worker.backbone, worker.device
    tensors = {}
    for it in items:
        img, _ = resize_keep_ratio(
            decode_image(it.path, worker.min_side), cfg.short_side, cfg.max_side
        )
        tensors[it.file_name] = normalise(img)
    batches = [
        pad_batch([tensors[it.file_name] for it in b], net.size_divisor).to(dev)
        for b in plan_batches(items, shard_size, cfg.batch_size, worker.by_shape)
    ]
    with torch.inference_mode(), autocast(worker.precision, dev):
        t0 = time.perf_counter()
        worker._features(batches[0])  # warm-up (allocator, kernels; compilation when asked)
        sync(dev)
        warm = time.perf_counter() - t0
        t0 = time.perf_counter()
        for x in batches:
            worker._features(x)
        sync(dev)
        seconds = time.perf_counter() - t0
        with step_flops() as counted:  # every batch: grouped batches differ in padding
            for x in batches:
                net.saliency_features(x)
    per_image = counted.total / len(items)
    return {
        "images": len(items),
        "seconds": seconds,
        "warmup_seconds": warm,
        "images_per_s": len(items) / seconds,
        "gflop_per_image": per_image / 1e9,
        "gflops": per_image * len(items) / seconds / 1e9,
    }


def end_to_end(worker: ProposalWorker, items: list, shard_size: int, out: Path) -> dict:
    """(2) the local executor over the same images, writing real shards."""
    jobs = list(enumerate(make_plan(items, shard_size)))
    worker.out_dir = out / "warmup"
    run_local(worker, jobs[:1], lambda s: None)  # warm-up on one shard
    worker.out_dir = out / "local"
    summaries: list[dict] = []
    t0 = time.perf_counter()
    failed = run_local(worker, jobs, summaries.append)
    seconds = time.perf_counter() - t0
    masks = sum(s["masks"] for s in summaries)
    return {
        "images": len(items),
        "seconds": seconds,
        "images_per_s": len(items) / seconds,
        "masks_per_image": masks / max(1, len(items)),
        "failed_shards": len(failed),
    }


def peak_rss(args: argparse.Namespace, images: str, sizes: list[int], out: Path) -> dict:
    """(4) peak resident memory of a whole local ``proposals`` run, in a fresh process each."""
    res = {}
    for n in sizes:
        cmd = [
            sys.executable,
            __file__,
            "--_rss-child",
            "--config",
            args.config,
            "--images",
            images,
            "--num-images",
            str(n),
            "--out",
            str(out / f"rss{n}"),
        ]
        for o in args.overrides:
            cmd += ["--set", o]
        proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
        if proc.returncode != 0:
            raise RuntimeError(f"memory run with {n} images failed:\n{proc.stderr[-2000:]}")
        res[str(n)] = json.loads(proc.stdout.strip().splitlines()[-1])["peak_rss_mb"]
    return res


def rss_child(args: argparse.Namespace) -> None:
    argv = [
        "proposals",
        "--config",
        args.config,
        "--images",
        args.images,
        "--out",
        args.out,
        "--limit",
        str(args.num_images),
        "--executor",
        "local",
    ]
    for o in args.overrides:
        argv += ["--set", o]
    rc = cli.main("pipeline", {"proposals": "pipeline.executors.proposals"}, argv)
    if rc:
        sys.exit(rc)
    mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: kilobytes
    print(json.dumps({"peak_rss_mb": round(mb, 1)}))


def _arguments() -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--config", default="configs/demo.toml")
    p.add_argument("--set", dest="overrides", action="append", default=[])
    p.add_argument("--images", default=None, help="image folder (default data.train_images)")
    p.add_argument("--num-images", type=int, default=32, help="images for (1), (2), (3)")
    p.add_argument("--mem-sizes", default="32,128", help="dataset sizes for (4)")
    p.add_argument("--compare-images", type=int, default=400, help="images for (3)")
    p.add_argument("--ray-workers", default="1,2", help="Ray worker counts for (3)")
    p.add_argument("--profile-images", type=int, default=16, help="images for (5)")
    p.add_argument("--no-ray", action="store_true", help="skip (3)")
    p.add_argument("--precisions", default="fp32,bf16", help="settings for (6), '' to skip")
    p.add_argument("--batch-sizes", default="", help="batch sizes for (6), e.g. 4,8,16")
    p.add_argument("--threads", default="", help="torch thread counts for (6), e.g. 1,2")
    p.add_argument("--note", default="", help="how the machine was shared, for the record")
    p.add_argument("--out", default="bench/results/proposals.json")
    p.add_argument("--_rss-child", dest="rss_child", action="store_true", help=argparse.SUPPRESS)
    return p.parse_args()


def _measure(args: argparse.Namespace, cfg, images: str, items: list) -> dict:
    """Parts (1)-(6) in order, into one report (the machine's description first)."""
    mem_sizes = [int(s) for s in args.mem_sizes.split(",") if s]
    bench_items = items[: args.num_images]
    shard_size = cfg.proposals.shard_size
    worker = ProposalWorker(cfg.backbone, cfg.proposals, "unused")
    cuda = str(worker.device).startswith("cuda")
    report = {
        "device": torch.cuda.get_device_name(worker.device) if cuda else "cpu",
        "torch_threads": torch.get_num_threads(),
        "decode_threads": worker.decode_threads,
        "cpus": machine_cpus(),
        "note": args.note,
        "torch": torch.__version__,
        "images_dir": images,
        "num_images": len(bench_items),
        "batch_size": cfg.proposals.batch_size,
        "config": dataclasses.asdict(cfg),
    }
    with tempfile.TemporaryDirectory(prefix="bench-proposals-") as tmp:
        out = Path(tmp)
        report["bare_backbone"] = bare_backbone(worker, bench_items, shard_size)
        report["end_to_end_local"] = end_to_end(worker, bench_items, shard_size, out)
        report["profile"] = stage_profile(worker, items[: args.profile_images], out)
        fingerprint = worker.fingerprint
        del worker
        if not args.no_ray:
            cmp_items = items[: args.compare_images]
            ray_workers = [int(s) for s in args.ray_workers.split(",") if s]
            report["executors"] = executor_runs(cfg, cmp_items, out, ray_workers, fingerprint)
        report["peak_rss_mb"] = peak_rss(args, images, mem_sizes, out)
        settings = [s for s in args.precisions.split(",") if s]
        if settings:
            report["precisions"] = precision_runs(
                cfg, bench_items, shard_size, out, settings, bare_backbone, end_to_end
            )
        if args.batch_sizes:
            sizes = [int(s) for s in args.batch_sizes.split(",")]
            report["batch_sizes"] = batch_size_runs(
                cfg, bench_items, settings[-1], sizes, bare_backbone
            )
        if args.threads:
            counts = [int(s) for s in args.threads.split(",")]
            report["threads"] = thread_runs(cfg, bench_items, settings[-1], counts, bare_backbone)
    report["ratios"] = _ratios(report, mem_sizes)
    return report


def _ratios(report: dict, mem_sizes: list[int]) -> dict:
    bare = report["bare_backbone"]["images_per_s"]
    e2e = report["end_to_end_local"]["images_per_s"]
    ratios = {"end_to_end_over_bare": round(e2e / bare, 4)}
    if "executors" in report:
        ratios.update(report["executors"]["ratios"])
    rss = report["peak_rss_mb"]
    if len(mem_sizes) >= 2:
        ratios[f"rss_{mem_sizes[-1]}_over_{mem_sizes[0]}"] = round(
            rss[str(mem_sizes[-1])] / rss[str(mem_sizes[0])], 4
        )
    return ratios


def _print_summary(report: dict, batch_size: int, dest: Path) -> None:
    bare = report["bare_backbone"]["images_per_s"]
    e2e = report["end_to_end_local"]["images_per_s"]
    ratios, rss = report["ratios"], report["peak_rss_mb"]
    fr = report["profile"]["stage_fractions"]
    top = max(fr, key=fr.get)
    ray_txt = ""
    if "executors" in report:
        ex = report["executors"]
        ray_txt = f"; {ex['images']} images: local {ex['local']['images_per_s']:.2f} img/s, " + (
            ", ".join(
                f"ray {k} worker(s) {v['images_per_s']:.2f} img/s "
                f"(x{ex['ratios'][f'ray_{k}_over_local']:.2f}, "
                f"x{ex['ratios'][f'ray_{k}_over_local_with_start']:.2f} with start-up)"
                for k, v in ex["ray"].items()
            )
        )
    print(
        f"bench proposals on {report['device']} (batch {batch_size}, "
        f"{report['torch_threads']} threads): bare backbone {bare:.2f} img/s, end-to-end "
        f"{e2e:.2f} img/s (x{ratios['end_to_end_over_bare']:.2f}){ray_txt}; peak RSS "
        + ", ".join(f"{k} img {v:.0f} MB" for k, v in rss.items())
        + f"; largest stage {top} {fr[top]:.0%} -> {dest}"
    )
    for name, row in report.get("precisions", {}).get("settings", {}).items():
        bare, e2e = row["bare_backbone"], row["end_to_end_local"]
        print(
            f"  {name}: bare {bare['images_per_s']:.2f} img/s (x{bare['ratio']:.2f}, "
            f"{bare['gflops']:.0f} GFLOP/s), end-to-end {e2e['images_per_s']:.2f} img/s "
            f"(x{e2e['ratio']:.2f}; x{row['end_to_end_over_bare']:.2f} of bare)"
        )
    if "threads" in report:
        print(f"  threads: {report['threads']}")
    if "batch_sizes" in report:
        print(f"  batch sizes: {report['batch_sizes']}")


def main() -> int:
    args = _arguments()
    if args.rss_child:
        rss_child(args)
        return 0
    cfg, _ = load_pipeline_config(args.config, args.overrides)
    images = args.images or cfg.data.train_images
    if not Path(images).is_dir():
        print(f"bench: demo images not found at {images}; run `make data` first", file=sys.stderr)
        return 2
    try:
        items = list_images(images)
    except cli.UserError as e:
        print(f"bench: {e}; run `make data` first", file=sys.stderr)
        return 2
    report = _measure(args, cfg, images, items)
    _print_summary(report, cfg.proposals.batch_size, write_json(args.out, report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
