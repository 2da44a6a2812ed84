"""Loaders of training batches: an endless, epoch-seeded, resumable sampler sharded over
torch.distributed ranks, the loader that counts what it handed out, and :func:`build_loader`.

The sampler yields ``(index, sample_seed)`` keys (``trainer.data.datasets.SampleKey``): the seed is
derived from (seed, epoch, position) and the datasets' augmentation draws only from it, so a
resumed run or a different worker count reproduces the same batches.
"""

from __future__ import annotations

import functools
import math
import os
import re
import threading
import time
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from pipeline.cli import UserError
from trainer.data.datasets import Batch, Collate, SampleKey
from trainer.engine.distributed import dist_info


class InfiniteSampler(Sampler):
    """Endless (index, sample_seed) keys: epoch e visits a permutation seeded by (seed, e).

    With ``world_size`` > 1 every epoch's order is padded to a multiple of world_size (its head
    repeated, as DistributedSampler does) and rank r takes positions r, r + world, ... .
    The state is (epoch, position) on this rank, derived from ``start`` = samples this rank has
    consumed, so setting ``start`` before iterating continues exactly where a run stopped.
    """

    def __init__(
        self, size: int, *, seed: int, shuffle: bool = True, rank: int = 0, world_size: int = 1
    ):
        if size <= 0:
            raise ValueError("InfiniteSampler needs a non-empty dataset")
        self.size, self.seed, self.shuffle = size, int(seed), shuffle
        self.rank, self.world_size = rank, world_size
        self.per_rank = math.ceil(size / world_size)  # samples per epoch on one rank
        self.start = 0

    def state_at(self, consumed: int) -> dict[str, int]:
        epoch, position = divmod(consumed, self.per_rank)
        return {"epoch": epoch, "position": position}

    def epoch_order(self, epoch: int) -> np.ndarray:
        """This rank's (per_rank,) dataset indices for ``epoch``."""
        if self.shuffle:
            order = np.random.default_rng([self.seed, epoch]).permutation(self.size)
        else:
            order = np.arange(self.size)
        total = self.per_rank * self.world_size
        if total > self.size:
            order = np.concatenate([order, np.resize(order, total - self.size)])
        return order[self.rank :: self.world_size]

    def sample_seed(self, epoch: int, position: int) -> int:
        """Augmentation seed of global position ``position`` of ``epoch`` (rank independent)."""
        return int(np.random.SeedSequence([self.seed, epoch, position]).generate_state(1)[0])

    def __iter__(self) -> Iterator[SampleKey]:
        state = self.state_at(self.start)
        epoch, position = state["epoch"], state["position"]
        while True:
            order = self.epoch_order(epoch)
            for p in range(position, self.per_rank):
                global_position = p * self.world_size + self.rank
                yield int(order[p]), self.sample_seed(epoch, global_position)
            epoch, position = epoch + 1, 0


class InfiniteLoader:
    """Endless batches from a DataLoader over an :class:`InfiniteSampler`, resumable.

    Counts the batches handed out (not the ones the workers prefetched), so
    :meth:`state_dict` is the exact point the training loop reached.
    """

    def __init__(self, loader: DataLoader, sampler: InfiniteSampler, batch_size: int):
        self.loader, self.sampler, self.batch_size = loader, sampler, batch_size
        self.consumed = 0  # samples handed out on this rank

    @property
    def dataset(self) -> Dataset:
        return self.loader.dataset

    @property
    def batches_per_epoch(self) -> float:
        return self.sampler.per_rank / self.batch_size

    def __iter__(self) -> Iterator[Batch]:
        self.sampler.start = self.consumed
        for batch in self.loader:
            self.consumed += self.batch_size
            yield batch

    def state_dict(self) -> dict[str, int]:
        state = self.sampler.state_at(self.consumed)
        state.update(
            size=self.sampler.size,
            world_size=self.sampler.world_size,
            batch_size=self.batch_size,
            seed=self.sampler.seed,
        )
        return state

    def load_state_dict(self, state: dict[str, int]) -> None:
        """Continue from a saved (epoch, position); takes effect at the next ``iter()``."""
        mine = self.state_dict()
        changed = [k for k in ("size", "world_size", "seed") if k in state and state[k] != mine[k]]
        if changed:
            warnings.warn(
                f"resuming with a different {', '.join(changed)} than the checkpoint: the data "
                "order will not continue exactly",
                stacklevel=2,
            )
        self.consumed = int(state["epoch"]) * self.sampler.per_rank + int(state["position"])


def _start_time(pid: int) -> str | None:
    """The process's start time (Linux /proc; "" elsewhere when it runs), None when it is gone
    or a zombie: with the pid it names one process even after the pid is reused."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return None
    except OSError:  # no /proc (macOS): signal 0 only says whether the pid exists
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return None
        except PermissionError:
            pass
        return ""
    fields = stat.rsplit(")", 1)[1].split()  # after "pid (comm)": state, ppid, ...
    return None if fields[0] in ("Z", "X") else fields[19]


def _exit_with_trainer(trainer_pid: int, started: str | None, every: float) -> None:
    while started is not None and _start_time(trainer_pid) == started:
        time.sleep(every)
    os._exit(1)


def _worker_init(trainer_pid: int, worker_id: int) -> None:
    # DataLoader already limits torch to one thread per worker; OpenCV would start a pool per core.
    cv2.setNumThreads(1)
    # A worker's parent is the fork server, not the trainer, so DataLoader's own check (its
    # parent pid) misses a trainer killed by any signal: the worker, and the fork server it keeps
    # open, would live on. Each worker watches the trainer itself and exits when it is gone.
    started = _start_time(trainer_pid)
    watch = threading.Thread(
        target=_exit_with_trainer, args=(trainer_pid, started, 1.0), daemon=True
    )
    watch.start()


def worker_init(num_workers: int) -> Callable[[int], None] | None:
    """The ``worker_init_fn`` of every loader with workers (None without): one OpenCV thread,
    and exit when the process building the loader dies."""
    return functools.partial(_worker_init, os.getpid()) if num_workers > 0 else None


def worker_context() -> str | None:
    import multiprocessing

    return "forkserver" if "forkserver" in multiprocessing.get_all_start_methods() else None


def build_loader(
    dataset: Dataset,
    batch_size: int,
    *,
    size_divisor: int,
    device: torch.device | str,
    num_workers: int = 2,
    seed: int = 0,
    infinite: bool = True,
    shuffle: bool = True,
    prefetch_factor: int = 2,
    setting: str = "batch_size",
) -> InfiniteLoader | DataLoader:
    """A loader of :class:`Batch` es.

    infinite=True (training): an :class:`InfiniteLoader` (epoch-seeded shuffling, resumable
    state, sharded over ranks when torch.distributed is initialised). infinite=False
    (evaluation): one ordered pass, each rank taking every world_size-th image, last batch kept.
    Workers are persistent, pin_memory is used only for a CUDA device. A training
    ``batch_size`` above the images one process sees is refused, naming ``setting``: every
    batch would hold each image many times over (a batch of 1000 from 4 images seems to hang).
    """
    device = torch.device(device)
    rank, world = dist_info()
    common: dict[str, Any] = dict(
        batch_size=batch_size,
        num_workers=num_workers,
        collate_fn=Collate(size_divisor),
        pin_memory=device.type == "cuda",
        worker_init_fn=worker_init(num_workers),
        # An explicit generator: creating a loader iterator must not draw from the global torch
        # RNG, or a resumed run (which creates one more) would drift from an uninterrupted one.
        generator=torch.Generator().manual_seed(seed),
    )
    if num_workers > 0:
        # forkserver, not fork: a worker forked from a process whose other threads (OpenCV, the
        # proposals prefetch pool, Ray, BLAS) hold a lock at fork time can deadlock on it; a
        # worker started from the clean fork server cannot. Costs one interpreter start per run.
        common.update(
            persistent_workers=True,
            prefetch_factor=prefetch_factor,
            multiprocessing_context=worker_context(),
        )
    if infinite:
        sampler = InfiniteSampler(
            len(dataset), seed=seed, shuffle=shuffle, rank=rank, world_size=world
        )
        if batch_size > sampler.per_rank:
            each = f" per process ({world} processes)" if world > 1 else ""
            raise UserError(
                f"{setting} = {batch_size} is larger than the {sampler.per_rank} training "
                f"images{each}: every batch would repeat images; set it to at most "
                f"{sampler.per_rank}"
            )
        return InfiniteLoader(DataLoader(dataset, sampler=sampler, **common), sampler, batch_size)
    indices = list(range(rank, len(dataset), world))
    return DataLoader(dataset, sampler=indices, **common)


def worker_error_line(message: str) -> str:
    """The error itself from a DataLoader worker's re-raised message ("Caught UserError in
    DataLoader worker process 0. Original Traceback ... pipeline.cli.UserError: <error>"): its
    last line without the exception's class name. Other messages are returned as their last line."""
    last = message.strip().splitlines()[-1] if message.strip() else message
    if "DataLoader worker" in message:
        last = re.sub(r"^[\w.]+(Error|Exception): ", "", last)
    return last
