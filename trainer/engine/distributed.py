"""Process-group set-up for ``torchrun`` launches (DDP), and a no-op stand-in without one.

A single process (no WORLD_SIZE, or WORLD_SIZE=1) never creates a process group, so every helper
here is safe to call unconditionally.
"""

from __future__ import annotations

import os

import torch
import torch.distributed as dist


def init_distributed() -> torch.device:
    """Join the ``torchrun`` process group when WORLD_SIZE is set; return this process's device.

    NCCL with one GPU per process (LOCAL_RANK) when CUDA is present, gloo on CPU.
    """
    cuda = torch.cuda.is_available()
    device = torch.device("cpu")
    if cuda:
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        torch.cuda.set_device(device)
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if cuda else "gloo")
    return device


def shutdown_distributed(barrier: bool = True) -> None:
    """Leave the process group. After a normal end the barrier first keeps one rank from tearing
    down its connections while another still uses them; after an error (barrier=False) the
    other ranks may never arrive, so the group is destroyed at once."""
    if dist.is_available() and dist.is_initialized():
        if barrier:
            dist.barrier()
        dist.destroy_process_group()


def barrier() -> None:
    """Wait for every rank (a no-op without a process group)."""
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def dist_info() -> tuple[int, int]:
    """(rank, world_size) of the initialised process group, (0, 1) without one."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1
