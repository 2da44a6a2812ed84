"""FLOPs of a step and the CPU's peak, so the benchmarks can say how far they are from the hardware.

A step's FLOPs come from torch's FlopCounterMode (matrix products and convolutions, forward and
backward: the work that dominates; elementwise work is not counted, so achieved GFLOP/s is a
lower bound). The peak is cores x clock x FLOPs per cycle per core. The clock is what the kernel
reports (/proc/cpuinfo "cpu MHz": the nominal clock in a VM, where boost is not visible). FLOPs
per cycle: 32 in fp32 for AVX-512 on Zen 4 (two 256-bit FMA pipes; 512-bit instructions run as two
halves), doubled for bf16 dot products (VDPBF16PS); other CPUs pass ``flops_per_cycle``.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

from torch.utils.flop_counter import FlopCounterMode


class _Counted:
    total: float = 0.0


@contextlib.contextmanager
def step_flops():
    """Counts the FLOPs run inside the block into ``.total``."""
    counted = _Counted()
    mode = FlopCounterMode(display=False)
    with mode:
        yield counted
    counted.total = float(mode.get_total_flops())


def cpu_peak_gflops(flops_per_cycle: float = 32.0) -> dict[str, float]:
    """{"fp32", "bf16", "mhz", "cores"}: this process's CPUs' peak GFLOP/s."""
    mhz = 0.0
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("cpu MHz"):
                mhz = max(mhz, float(line.split(":")[1]))
    except (OSError, ValueError):
        pass
    cores = len(os.sched_getaffinity(0))
    fp32 = cores * mhz * 1e6 * flops_per_cycle / 1e9
    return {"fp32": fp32, "bf16": 2 * fp32, "mhz": mhz, "cores": float(cores)}
