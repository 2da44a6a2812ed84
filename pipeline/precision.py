"""Numeric precision of a stage: ``"fp32"`` (the default) or ``"bf16"`` autocast, on CPU and CUDA.

Both stages spend their time in matrix products and convolutions, which a CPU with native bf16
(AVX512_BF16 or AMX) runs about 1.5x faster in bf16 than in fp32 (docs/benchmarks.md). Autocast
keeps reductions, norms and losses in fp32 and runs the products in bf16, so the code paths stay
the same and a precision is one setting (``proposals.precision``, ``pretrain.precision``,
``finetune.precision``). ``"fp16"`` (with loss scaling) exists on CUDA only; ``"auto"`` picks bf16
where the device runs it natively and fp32 elsewhere, once, when the config is loaded.

On a CPU without native bf16, oneDNN emulates it, which is slower than fp32: asking for bf16
there is a one-line error instead of a silent slow-down.
"""

from __future__ import annotations

import contextlib
from pathlib import Path

import torch

from pipeline.cli import UserError
from pipeline.ranges import PRECISIONS


def cpu_has_native_bf16() -> bool:
    """Whether this CPU computes bf16 in hardware (AVX512_BF16 or AMX tiles).

    Asks torch's CPU capability query; an older torch without it falls back to the kernel's
    CPU flags."""
    names = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    query = [getattr(torch.cpu, n, None) for n in names]
    if all(q is not None for q in query):
        return any(bool(q()) for q in query)
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return " avx512_bf16" in flags or " amx_bf16" in flags


def auto_precision(device: torch.device | str | None = None) -> str:
    """What ``precision = "auto"`` means on ``device`` (default: where a stage runs): bf16 on a
    GPU that supports it or a CPU with native bf16, where it is the faster path, else fp32."""
    device = torch.device(device) if device is not None else default_device()
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp32"
    return "bf16" if cpu_has_native_bf16() else "fp32"


def default_device() -> torch.device:
    """Where a stage runs when nothing else is said: the first GPU, else the CPU."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def check_precision(precision: str, device: torch.device | str, key: str) -> str:
    """``precision`` if ``device`` can run it, else a UserError naming ``key``."""
    device = torch.device(device)
    if precision not in PRECISIONS or precision == "auto":  # "auto" is resolved at load time
        raise UserError(f"{key} = {precision!r}: expected one of {', '.join(PRECISIONS)}")
    if precision == "fp16" and device.type != "cuda":
        raise UserError(f"{key} = 'fp16' needs a CUDA device; on a CPU use 'bf16' or 'fp32'")
    if precision == "bf16" and device.type == "cpu" and not cpu_has_native_bf16():
        raise UserError(
            f"{key} = 'bf16': this CPU has no native bf16 (AVX512_BF16 or AMX), where it would run "
            "slower than fp32; set it to 'fp32'"
        )
    return precision


def autocast(precision: str, device: torch.device | str):
    """The autocast context of ``precision`` on ``device`` (a no-op context for fp32)."""
    device = torch.device(device)
    if precision == "fp32":
        return contextlib.nullcontext()
    dtype = torch.float16 if precision == "fp16" else torch.bfloat16
    return torch.autocast(device.type, dtype=dtype)


def effective_precision(precision: str, amp: bool | str, device: torch.device | str) -> str:
    """A section's precision from its ``precision`` key and the older ``amp`` key, which meant
    autocast on CUDA only (True or "bf16": bf16, "fp16": fp16) and fp32 elsewhere, so that old
    configs and run folders mean what they meant. ``precision`` wins when it is not fp32."""
    if precision != "fp32" or not amp or torch.device(device).type != "cuda":
        return precision
    return "fp16" if amp == "fp16" else "bf16"


def stage_precision(section: object, device: torch.device | str, stage: str) -> str:
    """The precision a training section (``pretrain``, ``finetune``, or the engine's Schedule built
    from one) runs in on ``device``, from its ``precision`` and older ``amp`` keys; a UserError
    naming ``<stage>.precision`` when the device cannot run it."""
    amp = getattr(section, "amp", False)
    wanted = effective_precision(getattr(section, "precision", "fp32"), amp, device)
    return check_precision(wanted, device, f"{stage}.precision")
