"""Executors of a proposals run: where and how the shards' ProposalWorkers run.

``local`` runs one worker in this process; ``ray`` runs one actor per GPU (or ``--workers`` CPU
actors) and hands out shards as actors become free, retrying a failed shard (also when its actor
died) before recording it as failed. Both write identical shards.
"""

from __future__ import annotations

import logging
import os
import time
from collections import deque
from collections.abc import Callable
from pathlib import Path
from typing import Any

from pipeline.cli import UserError
from pipeline.config import BackboneConfig, ProposalConfig
from pipeline.images import ImageItem
from pipeline.proposal_worker import ProposalWorker

MAX_RETRIES = 2  # extra attempts per shard before it is recorded as failed
log = logging.getLogger(__name__)


# --------------------------------------------------------------------------------------------
# Executors: both call on_done(summary) per finished shard and return {index: error} failures.

Job = tuple[int, list[ImageItem]]


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
            except Exception as e:  # recorded below; the other shards still run
                log.warning("shard %d attempt %d failed: %s", index, attempt + 1, e)
                if attempt == MAX_RETRIES:
                    failed[index] = f"{type(e).__name__}: {e}"
            else:
                on_done(result)
                break
    return failed


def ray_init(workers: int, num_cpus: int | None = None):
    """Connect to RAY_ADDRESS's cluster, or start a private local one (no dashboard, bound to
    127.0.0.1, quiet). Returns (ray module, whether this call started it)."""
    import ray  # only this module imports Ray, and only when asked to

    if ray.is_initialized():
        return ray, False
    root = str(Path(__file__).resolve().parent.parent)
    path = os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH", "")) if p)
    runtime_env = {"env_vars": {"PYTHONPATH": path}}
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    try:
        if os.environ.get("RAY_ADDRESS"):
            ray.init(
                address="auto",
                runtime_env=runtime_env,
                logging_level=logging.WARNING,
                log_to_driver=False,
            )
        else:
            cpus = num_cpus or (
                len(os.sched_getaffinity(0))
                if hasattr(os, "sched_getaffinity")
                else (os.cpu_count() or 1)
            )
            # No dashboard, and the node address asked to be loopback. (On Linux Ray swaps
            # 127.0.0.1 for the host's own address in resolve_ip_for_localhost, so its ports are
            # not loopback-only; Ray's token authentication, on by default, guards them.)
            ray.init(
                num_cpus=max(cpus, workers),
                include_dashboard=False,
                _node_ip_address="127.0.0.1",
                runtime_env=runtime_env,
                logging_level=logging.WARNING,
                log_to_driver=False,
            )
    except Exception as e:
        raise UserError(
            f"could not start Ray ({type(e).__name__}: {e}); try --executor local"
        ) from None
    return ray, True


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
) -> dict[int, str]:
    """One actor per GPU (else ``workers`` CPU actors); shards handed out as actors free up.

    ``stats``, when given, receives ``actors`` and ``spawn_s`` (seconds to start them).
    ``worker_cls`` is the actor's class (a subclass of ProposalWorker, e.g. in tests).
    """
    try:
        import ray  # noqa: F401
    except ImportError:
        raise UserError("ray is not installed; use --executor local") from None
    ray, started = ray_init(workers)
    try:
        gpus = int(ray.cluster_resources().get("GPU", 0))
        cpus = int(ray.cluster_resources().get("CPU", 1))
        if gpus:  # one actor per GPU; its share of the CPUs decodes images
            n = gpus
            share = max(1, cpus // gpus)
            opts, threads, decode = {"num_gpus": 1, "num_cpus": share}, None, share
        else:  # CPU actors split the cores between them
            n = max(1, workers)
            opts, threads, decode = {"num_cpus": 1}, max(1, cpus // n), None
        n = min(n, max(1, len(jobs)))
        actor_cls = ray.remote(worker_cls)

        def spawn(count: int) -> list:
            """Start ``count`` actors in parallel; each must hold the driver's weights."""
            actors = [
                actor_cls.options(**opts).remote(
                    backbone_cfg, cfg, str(out_dir), None, threads, decode
                )
                for _ in range(count)
            ]
            for got in ray.get([a.get_fingerprint.remote() for a in actors]):
                if got != fingerprint:
                    raise RuntimeError(
                        "a Ray worker built a backbone with different weights "
                        f"(fingerprint {got[:12]} != {fingerprint[:12]})"
                    )
            return actors

        queue = deque(jobs)
        attempts: dict[int, int] = {}
        failed: dict[int, str] = {}
        t_spawn = time.perf_counter()
        try:
            idle = spawn(n)
        except Exception as e:
            msg = (str(e).strip().splitlines() or [type(e).__name__])[-1]
            raise UserError(f"could not start the Ray workers: {msg}") from None
        if stats is not None:
            stats.update(actors=n, spawn_s=time.perf_counter() - t_spawn)
        running: dict[Any, tuple[Job, Any]] = {}
        while queue or running:
            while idle and queue:
                actor = idle.pop()
                job = queue.popleft()
                running[actor.process_shard.remote(*job)] = (job, actor)
            done, _ = ray.wait(list(running), num_returns=1)
            job, actor = running.pop(done[0])
            try:
                result = ray.get(done[0])
            except ray.exceptions.RayActorError as e:
                err = f"worker died: {e}".splitlines()[0]
                ray.kill(actor, no_restart=True)
                try:
                    idle += spawn(1)
                except Exception as e2:  # cannot replace it: carry on with the others
                    log.warning("could not restart a Ray worker: %s", e2)
            except Exception as e:
                err = (str(e).strip().splitlines() or [type(e).__name__])[-1]
                idle.append(actor)
            else:
                idle.append(actor)
                on_done(result)
                continue
            index = job[0]
            attempts[index] = attempts.get(index, 0) + 1
            log.warning("shard %d attempt %d failed: %s", index, attempts[index], err)
            if attempts[index] > MAX_RETRIES:
                failed[index] = err
            else:
                queue.appendleft(job)
            if not idle and not running:  # every worker is gone: the rest cannot run
                failed.update({j[0]: "no Ray worker left" for j in queue})
                queue.clear()
        return failed
    finally:
        if started:
            ray.shutdown()
