"""Pre-training step time by feature cache, precision and compilation, in one run, same images.

    python bench/train.py [--config configs/demo.toml] [--shards DIR] [--iters 40] [--warmup 10]
        [--modes off:fp32,on:fp32,on:bf16,on:bf16:cl,on:bf16:compile,on:bf16:t1,on:bf16:w0]
        [--set model.kind=mask2former|maskrcnn] [--profile N] [--out FILE]

Each mode is ``cache:precision[:compile][:cl]``: ``off`` runs the frozen backbone every step, ``on``
reads its levels from the feature cache (filled first, per precision, by one pass over every image
view the run will see); the precision is the autocast of the frozen backbone and the head
(pipeline/precision.py); ``compile`` torch.compiles the head (its first steps, which compile, are
in the untimed warm-up; their time is reported as ``compile_seconds``); ``cl`` puts the model's
convolution weights in channels-last (NHWC) memory format; ``tN`` runs the step with N torch
intra-op threads and ``wN`` with N DataLoader worker processes (0: in the training process),
instead of the process's thread count and the config's ``num_workers``. The same pre-training
objective trains ``--iters`` timed iterations after ``--warmup`` untimed ones, from the same seed
and the same sampler order. Reported per mode: iterations per second and its ratio to the first
mode, the step time split into data wait, backbone (levels: computed, or read and assembled),
model forward, matching and losses, backward and optimiser, peak memory (RSS sampled every 50 ms
on CPU, ``max_memory_allocated`` on CUDA), and the achieved GFLOP/s of the step (its FLOPs counted
once by torch's FlopCounterMode) against the CPU's peak (see ``bench/flops.py``). Writes
``bench/results/train.json``. ``--profile N`` adds, per mode, a torch.profiler summary of N more
steps: the ops with the most self time, and which lines of the project issue the memory copies.
Ratios, not absolute times, are the result: run nothing else
meanwhile.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import sys
import threading
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.flops import cpu_peak_gflops, step_flops  # noqa: E402
from pipeline.atomic_files import write_json  # noqa: E402
from pipeline.precision import autocast  # noqa: E402
from trainer.config import load_config  # noqa: E402
from trainer.engine.loop import compile_network  # noqa: E402
from trainer.stages.pretrain import build_pretraining  # noqa: E402

PHASES = ("data", "backbone", "forward", "losses", "backward", "optimiser")


class PeakRSS:
    """Largest resident set size seen by a sampling thread (CPU peak memory of this process)."""

    def __init__(self) -> None:
        self.peak, self._stop = 0, threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        page = os.sysconf("SC_PAGE_SIZE")
        while not self._stop.is_set():
            with open("/proc/self/statm") as f:
                self.peak = max(self.peak, int(f.read().split()[1]) * page)
            time.sleep(0.05)

    def __enter__(self) -> PeakRSS:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


def _timed(module: torch.nn.Module, key: str, clock: dict[str, float]) -> None:
    """Add ``module``'s forward wall time to ``clock[key]`` (forward hooks)."""
    start: list[float] = []
    module.register_forward_pre_hook(lambda *_: start.append(time.perf_counter()))
    module.register_forward_hook(
        lambda *_: clock.__setitem__(key, clock[key] + time.perf_counter() - start.pop())
    )


def parse_mode(text: str) -> dict:
    """``cache:precision[:compile][:cl][:tN][:wN]`` -> {"cache", "precision", "compile",
    "channels_last", "threads", "workers"} (threads, workers None: the process's and the
    config's)."""
    usage = "cache:precision[:compile][:cl][:tN][:wN]"
    parts = text.split(":")
    flags = parts[2:]
    counts = {f[0]: f[1:] for f in flags if f[:1] in ("t", "w") and f[1:].isdigit()}
    named = [f for f in flags if f not in ("compile", "cl")]
    shape_ok = (
        len(parts) >= 2
        and len(named) == len(counts)
        and len(set(flags)) == len(flags)
        and int(counts.get("t", 1)) >= 1
    )
    if not shape_ok or parts[0] not in ("on", "off"):
        raise SystemExit(f"bench/train.py: bad mode {text!r} ({usage})")
    return {
        "cache": parts[0] == "on",
        "precision": parts[1],
        "compile": "compile" in flags,
        "channels_last": "cl" in flags,
        "threads": int(counts["t"]) if "t" in counts else None,
        "workers": int(counts["w"]) if "w" in counts else None,
    }


def mode_name(mode: dict) -> str:
    """The mode as ``parse_mode`` reads it."""
    flags = [f for f, on in (("compile", mode["compile"]), ("cl", mode["channels_last"])) if on]
    flags += [f"{k[0]}{mode[k]}" for k in ("threads", "workers") if mode.get(k) is not None]
    return ":".join([("on" if mode["cache"] else "off"), mode["precision"], *flags])


def build(cfg, shards: Path, mode: dict, cache_dir: Path, device: torch.device):
    """The pretrain command's own set-up (trainer.stages.pretrain.build_pretraining), mode as asked.

    A model that Saliency Prompt does not pre-train (``model.kind = "maskrcnn"``) trains here on
    the same images, batch and input size with the pseudo masks as class-agnostic labels and no
    prompts or kernel supervision: its step time and memory beside the query-based kinds'."""
    from trainer.model.factory import QUERY_KINDS

    cfg = copy.deepcopy(cfg)
    cfg.pretrain.feature_cache, cfg.pretrain.feature_cache_dir = mode["cache"], str(cache_dir)
    cfg.pretrain.precision = mode["precision"]
    if mode.get("workers") is not None:  # DataLoader processes beside the step's threads
        cfg.pretrain.num_workers = mode["workers"]
    if cfg.model.kind not in QUERY_KINDS:
        cfg.pretrain.prompts = cfg.pretrain.kernel_supervision = False
    built = build_pretraining(cfg, shards, None, device)
    optimizer = built.optimizer
    if cfg.model.kind not in QUERY_KINDS:  # its own optimiser ([maskrcnn]), as fine-tuning uses
        from trainer.engine.optim import optimizer_from_section

        optimizer, _ = optimizer_from_section(built.objective, cfg.maskrcnn)
    if mode.get("channels_last"):  # conv weights NHWC: oneDNN's preferred layout for bf16
        built.objective.to(memory_format=torch.channels_last)
    if mode["compile"]:
        compile_network(built.objective)
    return built.objective.to(device), built.loader, built.frozen, built.store, optimizer


def _origin(event) -> str:
    """Where a profiled op comes from: the project's innermost frame on the Python stack of the
    op or of the op that called it (autocast's casts are nested in the op they feed), or, in
    backward, the autograd node that ran it."""
    while event is not None:
        # An op's own stack when recorded; else its ancestors, among them the Python-function
        # events ("path/file.py(line): name") that with_stack records around the ops.
        for frame in [*(event.stack or ()), event.name]:
            path = frame.split(" ", 1)[0]
            for package in ("trainer/", "pipeline/"):
                if path.startswith(package) or f"/{package}" in path:
                    return package + frame.split(package, 1)[1]
        if event.name.startswith("autograd::engine::evaluate_function: "):
            return "backward: " + event.name.split(": ", 1)[1]
        event = event.cpu_parent
    return "elsewhere"


def profile_steps(step, steps: int) -> dict:
    """torch.profiler over ``steps`` steps: the ops with the most self CPU time, and where the
    memory copies (casts between precisions included) come from."""
    from collections import Counter

    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], with_stack=True) as prof:
        for _ in range(steps):
            step()
    # Operator events only ("aten::...", "torchvision::..."): with_stack also records the Python
    # calls around them, whose self time would be counted twice.
    events = [e for e in prof.events() if e.device_type.name == "CPU" and "::" in e.name]
    total = sum(e.self_cpu_time_total for e in events) or 1.0
    by_op, calls, copies, copy_calls = Counter(), Counter(), Counter(), Counter()
    for e in events:
        by_op[e.name] += e.self_cpu_time_total
        calls[e.name] += 1
        if e.name in ("aten::copy_", "aten::_to_copy"):  # a cast's time is in both
            origin = _origin(e)
            copies[origin] += e.self_cpu_time_total
            copy_calls[origin] += e.name == "aten::copy_"
    return {
        "steps": steps,
        "ops": [
            {"op": op, "share": t / total, "calls_per_step": calls[op] / steps}
            for op, t in by_op.most_common(15)
        ],
        "copies": [
            {"origin": o, "share": t / total, "calls_per_step": copy_calls[o] / steps}
            for o, t in copies.most_common(12)
        ],
    }


def run_mode(cfg, shards, mode: dict, cache_dir: Path, iters: int | None, warmup: int, device,
             profile: int = 0):  # fmt: skip
    """Train ``warmup`` then ``iters`` timed iterations (None: two passes over the dataset), then
    one more whose FLOPs are counted (outside the timing: the counter slows the step), then
    ``profile`` profiled ones."""
    objective, loader, frozen, store, optimizer = build(cfg, shards, mode, cache_dir, device)
    if iters is None:
        iters = -(-len(loader.dataset) // cfg.pretrain.batch_size) * 2
    clock = dict.fromkeys(PHASES, 0.0)
    clip = cfg.pretrain.clip_grad if cfg.model.kind != "maskrcnn" else cfg.maskrcnn.clip_grad
    clip = clip if clip > 0 else float("inf")
    _timed(objective.knet, "forward", clock)  # Mask R-CNN: its losses are inside its forward
    if getattr(objective, "criterion", None) is not None:
        _timed(objective.criterion, "losses", clock)
    if getattr(objective, "kernel_supervision", None) is not None:
        _timed(objective.kernel_supervision, "losses", clock)
    objective.train()
    batches = iter(loader)
    hits = misses = 0

    def step() -> None:
        nonlocal hits, misses
        t0 = time.perf_counter()
        batch = next(batches).to(device)
        t1 = time.perf_counter()
        cached = sum("cached_levels" in info for info in batch.infos)
        hits, misses = hits + cached, misses + len(batch.infos) - cached
        images = frozen(batch.images, batch.infos) if frozen is not None else batch.images
        t2 = time.perf_counter()
        with autocast(mode["precision"], device):
            out = objective(images, batch.targets)
        loss = sum(v.float() for k, v in out.items() if k.startswith("loss_"))
        t3 = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        t4 = time.perf_counter()
        torch.nn.utils.clip_grad_norm_(objective.parameters(), clip)
        optimizer.step()
        t5 = time.perf_counter()
        for key, dt in zip(("data", "backbone", "backward", "optimiser"),
                           (t1 - t0, t2 - t1, t4 - t3, t5 - t4)):  # fmt: skip
            clock[key] += dt

    with PeakRSS() as rss:
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        warm_start = time.perf_counter()
        for _ in range(warmup):
            step()
        clock.update(dict.fromkeys(PHASES, 0.0))
        hits = misses = 0
        begin = time.perf_counter()
        for _ in range(iters):
            step()
        seconds = time.perf_counter() - begin
        shares = {k: v / seconds for k, v in clock.items()}
        hit_rate = hits / max(hits + misses, 1)
        with step_flops() as counted:
            step()
        profiled = profile_steps(step, profile) if profile else None
    peak = torch.cuda.max_memory_allocated() if device.type == "cuda" else rss.peak
    return {
        **mode,
        "iters_per_s": iters / seconds,
        "seconds": seconds,
        "warmup_seconds": begin - warm_start,
        "gflop_per_iter": counted.total / 1e9,
        "gflops": counted.total * iters / seconds / 1e9,
        "share": shares,
        "other_share": max(0.0, 1 - sum(shares.values())),
        "cache_hit_rate": hit_rate,
        "peak_memory_mib": peak / 2**20,
        "cache_store": store.stats() if store is not None else None,
        "profile": profiled,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", default="configs/demo.toml")
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    parser.add_argument("--shards", default="")
    parser.add_argument("--iters", type=int, default=40)
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--modes", default="off:fp32,on:fp32,on:bf16,on:bf16:compile")
    parser.add_argument("--cache-dir", default="runs/bench/feature-cache")
    parser.add_argument("--out", default="bench/results/train.json")
    parser.add_argument(
        "--profile", type=int, default=0, help="profile this many steps after each mode's timing"
    )
    args = parser.parse_args()
    cfg = load_config(args.config, args.overrides)
    shards = Path(args.shards or cfg.pretrain.shards or f"runs/{cfg.name}/proposals")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    modes = [parse_mode(m) for m in args.modes.split(",")]
    fill_seconds = {}
    for precision in sorted({m["precision"] for m in modes if m["cache"]}):
        # Fill the cache with an untimed pass twice as long as the dataset (both flips appear).
        t0 = time.perf_counter()
        fill = parse_mode(f"on:{precision}")
        run_mode(cfg, shards, fill, Path(args.cache_dir), None, 0, device)
        fill_seconds[precision] = time.perf_counter() - t0
    results = []
    default_threads = torch.get_num_threads()
    for mode in modes:
        torch.set_num_threads(mode["threads"] or default_threads)  # intra-op threads of the step
        m = run_mode(
            cfg, shards, mode, Path(args.cache_dir), args.iters, args.warmup, device, args.profile
        )
        torch.set_num_threads(default_threads)
        m["ratio"] = m["iters_per_s"] / (results[0]["iters_per_s"] if results else m["iters_per_s"])
        results.append(m)
        shares = ", ".join(f"{k} {100 * v:.0f}%" for k, v in m["share"].items())
        print(
            f"{mode_name(mode)}: {m['iters_per_s']:.2f} it/s "
            f"({m['ratio']:.2f}x), {m['gflops']:.0f} GFLOP/s; {shares}; hits "
            f"{100 * m['cache_hit_rate']:.0f}%; peak {m['peak_memory_mib']:.0f} MiB",
            flush=True,
        )
        for key, label in (("ops", "op"), ("copies", "origin")) if m["profile"] else ():
            top = "; ".join(
                f"{r[label]} {100 * r['share']:.1f}% ({r['calls_per_step']:.0f}/step)"
                for r in m["profile"][key][:6]
            )
            print(f"  profile, {key}: {top}", flush=True)
    report = {
        "command": " ".join(sys.argv),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}",
        "device": str(device),
        "model": cfg.model.kind,
        "batch_size": cfg.pretrain.batch_size,
        "input": [cfg.pretrain.short_side, cfg.pretrain.max_side],
        "cache_fill_seconds": fill_seconds,
        "peak_gflops": cpu_peak_gflops() if device.type == "cpu" else None,
        "threads_default": default_threads,
        "workers_default": cfg.pretrain.num_workers,
        "modes": results,
    }
    write_json(args.out, report)
    print(json.dumps({"cache_fill_seconds": fill_seconds, "peak_gflops": report["peak_gflops"]}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
