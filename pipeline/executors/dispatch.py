"""Executors of a proposals run: where and how the shards' ProposalWorkers run.

``local`` runs one worker in this process, shard after shard. ``ray`` runs actors as
``pipeline.executors.ray_cluster.plan_actors`` sizes them (one per GPU, else CPU actors sharing the
cores) and balances the work: shards are cut into batches (``pipeline.executors.work_units``) that
any free actor takes, two in flight per actor so decoding overlaps the backbone; once no batch is
left, an idle actor takes a copy of a batch still running elsewhere, and the first answer wins, so a
slow actor does not hold the run's tail. The driver writes each shard when all its batches are in. A
failed batch is retried (also when its actor died) before its shard is recorded as failed. Both
executors write identical shards.
"""

from __future__ import annotations

import errno
import logging
import time
from collections import deque
from collections.abc import Callable
from pathlib import Path
from typing import Any

from pipeline.cli import UserError
from pipeline.config import BackboneConfig, ProposalConfig
from pipeline.executors.ray_cluster import ActorPlan, cluster_shape, plan_actors, ray_init
from pipeline.executors.work_units import Job, Piece, ShardAssembler, shard_pieces
from pipeline.executors.worker import ProposalWorker, count_records
from pipeline.inputs.image_files import ImageLimits
from pipeline.shards.plan import is_batch_invariant
from pipeline.shards.schema import shard_name, write_shard

MAX_RETRIES = 2  # extra attempts per shard (local) or batch (Ray) before the shard fails
log = logging.getLogger(__name__)


# --------------------------------------------------------------------------------------------
# Executors: both call on_batch(images, masks) per batch and on_done(summary) per written shard,
# and return {shard index: error} for the shards that failed.


# A full, read-only or forbidden output folder: retrying or moving to the next shard cannot help,
# so the run stops at once and the command prints one line for it (pipeline/cli.py).
DISK_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM})


def run_local(
    worker: ProposalWorker,
    jobs: list[Job],
    on_done: Callable[[dict], None],
    on_batch: Callable[[int, int], None] | None = None,
) -> dict[int, str]:
    """Shards in order, in this process, with the same retry policy as Ray."""
    failed: dict[int, str] = {}
    for index, items in jobs:
        for attempt in range(MAX_RETRIES + 1):
            try:
                result = worker.process_shard(index, items, on_batch)
            except OSError as e:
                if e.errno in DISK_ERRNOS:  # no other shard can be written either: stop, one line
                    raise
                log.warning("shard %d attempt %d failed: %s", index, attempt + 1, e)
                if attempt == MAX_RETRIES:
                    failed[index] = f"{type(e).__name__}: {e}"
            except Exception as e:  # recorded below; the other shards still run
                log.warning("shard %d attempt %d failed: %s", index, attempt + 1, e)
                if attempt == MAX_RETRIES:
                    failed[index] = f"{type(e).__name__}: {e}"
            else:
                on_done(result)
                break
    return failed


# --------------------------------------------------------------------------------------------
# Ray

DEPTH = 2  # batches in flight per actor: one decodes while the other runs the backbone
SPAWN_TIMEOUT_S = 600.0  # actors must be placed and have built their backbone by then


def _last_line(e: BaseException) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[-1]


class _Actors:
    """The run's actors: started as planned, checked against the driver, replaced when dead."""

    def __init__(
        self, ray, worker_cls, plan: ActorPlan, args: tuple, fingerprint: str, kwargs=None
    ):
        class RayProposalWorker(worker_cls):
            def cancelled(self) -> bool:  # a copy that lost the race stops before the backbone
                return ray.get_runtime_context().is_canceled()

        self.ray, self.plan, self.args, self.fingerprint = ray, plan, args, fingerprint
        self.kwargs = dict(kwargs or {})
        self.cls = ray.remote(RayProposalWorker)
        self.live: dict[int, Any] = {}  # id -> handle
        self.slot: dict[int, int] = {}  # id -> index into the plan's shares
        self._next = 0

    def start(self, slots: list[int]) -> list[int]:
        """Start one actor per plan slot, in parallel; each must hold the driver's weights."""
        ids = []
        for s in slots:
            opts = {"num_cpus": self.plan.cpus[s], "max_concurrency": DEPTH}
            if self.plan.gpus:
                opts["num_gpus"] = self.plan.gpus
            handle = self.cls.options(**opts).remote(
                *self.args, None, self.plan.cpus[s], self.plan.decode_threads[s], **self.kwargs
            )
            self.live[self._next], self.slot[self._next] = handle, s
            ids.append(self._next)
            self._next += 1
        try:
            refs = [self.live[i].get_fingerprint.remote() for i in ids]
            for got in self.ray.get(refs, timeout=SPAWN_TIMEOUT_S):
                if got != self.fingerprint:
                    raise RuntimeError(
                        "a Ray worker built a backbone with different weights "
                        f"(fingerprint {got[:12]} != {self.fingerprint[:12]})"
                    )
        except Exception:
            for i in ids:  # none of them is given work
                self.ray.kill(self.live.pop(i), no_restart=True)
            raise
        return ids

    def replace(self, dead: int) -> None:
        """Kill a dead actor's handle and start another in its slot (best effort)."""
        handle = self.live.pop(dead, None)
        if handle is None:
            return
        self.ray.kill(handle, no_restart=True)
        try:
            self.start([self.slot[dead]])
        except Exception as e:  # cannot replace it: carry on with the others
            log.warning("could not restart a Ray worker: %s", _last_line(e))

    def call(self, actor: int, method: str, *args):
        return getattr(self.live[actor], method).remote(*args)


class _Schedule:
    """Hands pieces to free actors, copies a straggler's pieces to idle ones, retries failures,
    and writes each shard as soon as all its pieces are in."""

    def __init__(
        self, ray, actors: _Actors, jobs: list[Job], batching: tuple[int, bool], write, on_batch
    ):
        """``batching``: (batch_size, by_shape) as ``work_units.shard_batches`` takes them."""
        self.ray, self.actors, self.write, self.on_batch = ray, actors, write, on_batch
        self.batching = batching
        self.jobs = deque(jobs)  # cut into pieces one shard at a time (reading image headers)
        self.queue: deque[Piece] = deque()  # pieces to hand out: retries first
        self.assembler = ShardAssembler(jobs)
        self.running: dict[Any, tuple[Piece, int]] = {}  # ref -> (piece, actor id)
        self.copies: dict[tuple[int, int], list] = {}  # piece key -> refs in flight
        self.load = dict.fromkeys(actors.live, 0)
        self.finished: set[tuple[int, int]] = set()
        self.attempts: dict[tuple[int, int], int] = {}
        self.failed: dict[int, str] = {}

    def run(self) -> dict[int, str]:
        while True:
            self._fill()
            if not self.running:  # all done, or every actor is gone: the rest cannot run
                break
            [ref], _ = self.ray.wait(list(self.running), num_returns=1)
            self._collect(ref)
        left = {p.shard for p in self.queue} | {index for index, _ in self.jobs}
        self.failed.update({s: "no Ray worker left" for s in left - set(self.failed)})
        return self.failed

    def _next(self) -> Piece | None:
        """The next piece to hand out (None when there is none), skipping failed shards'."""
        while self.queue or self.jobs:
            if not self.queue:
                self.queue.extend(shard_pieces(self.jobs.popleft(), *self.batching))
            piece = self.queue.popleft()
            if piece.shard not in self.failed:
                return piece
        return None

    def _issue(self, piece: Piece, actor: int) -> None:
        ref = self.actors.call(actor, "process_batch", list(piece.items))
        self.running[ref] = (piece, actor)
        self.copies.setdefault(piece.key, []).append(ref)
        self.load[actor] = self.load.get(actor, 0) + 1

    def _fill(self) -> None:
        """Round-robin, so every actor has a piece before any has two."""
        for level in range(1, DEPTH + 1):
            for actor in list(self.actors.live):
                if self.load.get(actor, 0) >= level:
                    continue
                piece = self._next()
                if piece is not None:
                    self._issue(piece, actor)
                elif self.load.get(actor, 0) == 0 and (piece := self._straggler(actor)):
                    self._issue(piece, actor)

    def _straggler(self, actor: int) -> Piece | None:
        """The newest unfinished piece running on one other actor only: the likeliest not yet
        started. (A finished piece's lost copy may still be running: never copy that.)"""
        for piece, owner in reversed(list(self.running.values())):
            if piece.key in self.finished or piece.shard in self.failed:
                continue
            if owner != actor and len(self.copies[piece.key]) == 1:
                return piece
        return None

    def _collect(self, ref) -> None:
        piece, actor = self.running.pop(ref)
        self.load[actor] = self.load.get(actor, 0) - 1
        self.copies[piece.key].remove(ref)
        if piece.key in self.finished or piece.shard in self.failed:
            return  # a copy that lost the race, or part of a shard given up on
        try:
            records = self.ray.get(ref)
        except self.ray.exceptions.RayActorError as e:
            err = f"worker died: {e}".splitlines()[0]
            self.actors.replace(actor)
            self.load.update(dict.fromkeys(set(self.actors.live) - set(self.load), 0))
        except self.ray.exceptions.TaskCancelledError:
            return
        except Exception as e:
            err = _last_line(e)
        else:
            if records is not None:
                self._done(piece, records)
                return
            err = "cancelled"  # only a finished piece's copies are cancelled; be safe anyway
        self._failure(piece, err)

    def _done(self, piece: Piece, records: list) -> None:
        self.finished.add(piece.key)
        for other in self.copies[piece.key]:  # copies still queued or waiting never run
            self.ray.cancel(other)
        if self.on_batch is not None:
            self.on_batch(len(records), sum(r.num_masks for r in records))
        whole = self.assembler.add(piece, records)
        if whole is not None:
            try:
                self.write(piece.shard, whole)
            except OSError as e:
                if e.errno in DISK_ERRNOS:  # a full or read-only disk fails every shard: stop
                    raise
                self.failed[piece.shard] = f"{type(e).__name__}: {e}"

    def _failure(self, piece: Piece, err: str) -> None:
        if self.copies[piece.key]:
            return  # another copy is still running; it may succeed
        n = self.attempts[piece.key] = self.attempts.get(piece.key, 0) + 1
        log.warning(
            "shard %d batch at %d attempt %d failed: %s", piece.shard, piece.positions[0], n, err
        )
        if n > MAX_RETRIES:
            self.failed[piece.shard] = err
            self.assembler.drop(piece.shard)
        else:
            self.queue.appendleft(piece)


def _first_visible(jobs: list[Job]) -> str | None:
    """The first image the driver can see (a COCO listing may name missing files)."""
    for _, items in jobs:
        for it in items[:64]:
            if Path(it.path).is_file():
                return str(it.path)
    return None


def run_ray(
    backbone_cfg: BackboneConfig,
    cfg: ProposalConfig,
    out_dir: Path,
    jobs: list[Job],
    workers: int,
    fingerprint: str,
    on_done: Callable[[dict], None],
    stats: dict[str, Any] | None = None,
    worker_cls: type[ProposalWorker] = ProposalWorker,
    on_batch: Callable[[int, int], None] | None = None,
    limits: ImageLimits | None = None,
) -> dict[int, str]:
    """Actors as ``plan_actors`` sizes them for the cluster; batches balanced between them.

    ``workers``: CPU actors when there is no GPU (0: from the machine). ``stats``, when given,
    receives ``actors``, ``threads`` (per actor) and ``spawn_s`` (seconds to start them).
    ``worker_cls`` is the actor's class (a subclass of ProposalWorker, e.g. in tests).
    ``limits``: the image limits every actor decodes with (``[data]``; default ImageLimits()).
    """
    ray, started = ray_init()
    try:
        cpus, gpus, node_cpus = cluster_shape(ray)
        pieces = sum(-(-len(items) // max(1, cfg.batch_size)) for _, items in jobs)
        plan = plan_actors(cpus, gpus, workers, node_cpus)
        if not gpus and pieces < plan.actors:  # fewer batches than actors: fewer, wider actors
            plan = plan_actors(cpus, 0, pieces, node_cpus)
        t0 = time.perf_counter()
        args = (backbone_cfg, cfg, str(out_dir))
        actors = _Actors(ray, worker_cls, plan, args, fingerprint, {"limits": limits})
        try:
            first = actors.start(list(range(min(plan.actors, pieces))))
            meta = ray.get(actors.call(first[0], "get_meta"))
            seen = _first_visible(jobs)
            problem = seen and ray.get(actors.call(first[0], "can_read", seen))
        except ray.exceptions.GetTimeoutError:
            raise UserError(
                f"the Ray workers did not start within {SPAWN_TIMEOUT_S:g} s (each needs "
                f"{plan.cpus[0]} CPU(s){' and a GPU' if plan.gpus else ''} on one node)"
            ) from None
        except Exception as e:
            raise UserError(f"could not start the Ray workers: {_last_line(e)}") from None
        if problem:
            raise UserError(
                f"a Ray worker cannot read the images: {problem}; a multi-node run needs "
                "the images on storage every node sees, under the same absolute path"
            )
        if stats is not None:
            stats.update(
                actors=len(first),
                threads=list(plan.cpus[: len(first)]),
                spawn_s=time.perf_counter() - t0,
            )

        def write(index: int, records: list) -> None:
            t = time.perf_counter()
            write_shard(Path(out_dir) / shard_name(index), records, meta)
            on_done({**count_records(records), "index": index, "seconds": time.perf_counter() - t})

        batching = (cfg.batch_size, is_batch_invariant(backbone_cfg.kind))
        return _Schedule(ray, actors, jobs, batching, write, on_batch).run()
    finally:
        if started:
            ray.shutdown()
