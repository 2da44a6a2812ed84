"""The Ray cluster a proposals run uses, and how its actors share the machine.

Private local cluster (``RAY_ADDRESS`` unset). What is exposed, and what guards it:

- Ray's control plane (GCS server, raylet, object manager, runtime-env agent, every worker and
  actor) listens on TCP ports; Ray 2.x binds its gRPC servers to all interfaces and offers no
  setting to change that, so they are reachable from the network wherever a firewall allows.
- Token authentication is therefore forced on (``RAY_AUTH_MODE=token``, also over a user's
  ``RAY_AUTH_MODE=disabled``): every RPC must carry the 256-bit token in ``~/.ray/auth_token``
  (Ray's default path), which this module creates, or tightens, to mode 0600 before Ray reads it.
- The node address is asked to be loopback (Ray replaces 127.0.0.1 with the host's address for
  its own peers), the dashboard is off, usage stats are off, and nothing else is started.

Existing cluster (``RAY_ADDRESS`` set): the address is probed with a timeout first, so an
unreachable one fails in one line instead of Ray's minutes of retries. That cluster's safety is
its operator's: run it with ``RAY_AUTH_MODE=token`` on every node and the same token
(docs/security.md).

Only this module and ``pipeline.executors.dispatch`` import Ray, and only when ``--executor ray``
is used.
"""

from __future__ import annotations

import logging
import os
import secrets
import socket
import stat
import sys
from dataclasses import dataclass
from pathlib import Path

from pipeline.cli import UserError

CONNECT_TIMEOUT_S = 10.0  # to reach RAY_ADDRESS before giving up
# CPU actors on a machine without GPUs when --workers is not given: one actor per this many
# cores. A ViT-S/ResNet-50 forward scales well to a few threads, and every actor holds its own
# copy of the backbone, so many one-thread actors cost memory for little gain.
CPU_THREADS_PER_ACTOR = 4


# --------------------------------------------------------------------------------------------
# How actors share the machine


@dataclass(frozen=True)
class ActorPlan:
    """How many actors, and for each: Ray CPUs reserved, torch threads, decode threads, GPUs."""

    cpus: tuple[int, ...]  # Ray num_cpus per actor (= its torch threads)
    decode_threads: tuple[int | None, ...]  # None: the worker's own default
    gpus: int  # num_gpus per actor (0 or 1)

    @property
    def actors(self) -> int:
        return len(self.cpus)


def _split(total: int, parts: int) -> tuple[int, ...]:
    """``total`` cores over ``parts`` actors as evenly as possible (each at least one)."""
    base, extra = divmod(max(total, parts), parts)
    return tuple(base + (1 if i < extra else 0) for i in range(parts))


def plan_actors(cpus: int, gpus: int, workers: int, max_node_cpus: int | None = None) -> ActorPlan:
    """The actors a run starts on a cluster with ``cpus`` CPUs and ``gpus`` GPUs.

    GPUs: one actor per GPU (``workers`` is ignored), each with its share of the CPUs as decode
    threads. CPUs only: ``workers`` actors (0: one per ``CPU_THREADS_PER_ACTOR`` cores), never
    more than there are cores (oversubscribing only slows every actor down), splitting the cores
    between them as torch threads. ``max_node_cpus`` caps one actor's share so it fits a node.
    """
    cpus = max(1, int(cpus))
    cap = max(1, int(max_node_cpus or cpus))
    if gpus > 0:
        share = tuple(min(c, cap) for c in _split(cpus, gpus)) if cpus >= gpus else (1,) * gpus
        return ActorPlan(cpus=share, decode_threads=share, gpus=1)
    n = workers if workers > 0 else max(1, cpus // CPU_THREADS_PER_ACTOR)
    n = min(n, cpus)
    share = tuple(min(c, cap) for c in _split(cpus, n))
    return ActorPlan(cpus=share, decode_threads=(None,) * n, gpus=0)


def machine_cpus() -> int:
    """CPUs this process may use (its affinity mask, e.g. under taskset or a container)."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


# --------------------------------------------------------------------------------------------
# Locking the private cluster down


def _token_file() -> Path:
    return Path.home() / ".ray" / "auth_token"  # Ray's default token path


def secure_token_file() -> Path | None:
    """Make sure Ray's default token file exists with mode 0600; None when the token comes from
    RAY_AUTH_TOKEN / RAY_AUTH_TOKEN_PATH instead (the user's choice, left alone)."""
    if os.environ.get("RAY_AUTH_TOKEN") or os.environ.get("RAY_AUTH_TOKEN_PATH"):
        return None
    path = _token_file()
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    try:  # O_EXCL with 0600: the token is never readable by others, not even for a moment
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        if stat.S_IMODE(path.stat().st_mode) & 0o077:
            os.chmod(path, 0o600)  # Ray itself writes it 0644
        return path
    with os.fdopen(fd, "w") as f:
        f.write(secrets.token_hex(32))  # 256 bits, as Ray's own generator
    return path


def force_token_auth() -> None:
    """RAY_AUTH_MODE=token for this process and the cluster it starts, whatever was set."""
    mode = os.environ.get("RAY_AUTH_MODE")
    if mode is not None and mode.lower() != "token":
        print(
            f"proposals: RAY_AUTH_MODE={mode} ignored: the private Ray cluster always uses "
            "token authentication",
            file=sys.stderr,
        )
    os.environ["RAY_AUTH_MODE"] = "token"
    try:  # Ray caches its config per process; refresh it so this process sees token mode too
        from ray._raylet import Config

        Config.initialize("")
    except (ImportError, AttributeError):
        pass


def _reload_token() -> None:
    """Make Ray read the token file again (it caches the token, or its absence, per process)."""
    try:
        from ray._raylet import AuthenticationTokenLoader

        AuthenticationTokenLoader.instance().reset_cache()
    except (ImportError, AttributeError):
        pass


def token_auth_enabled() -> bool:
    from ray._private.authentication.authentication_utils import is_token_auth_enabled

    return bool(is_token_auth_enabled())


# --------------------------------------------------------------------------------------------
# Connecting


# An HTTP/2 client's opening (the preface, then an empty SETTINGS frame). Every gRPC server, Ray's
# GCS and Ray Client server among them, answers it with a SETTINGS frame of its own.
_H2_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + bytes([0, 0, 0, 4, 0, 0, 0, 0, 0])
_H2_SETTINGS = 4


def _answers_grpc(sock: socket.socket) -> bool:
    """Whether the server on ``sock`` answers an HTTP/2 opening with a SETTINGS frame (within
    the socket's timeout): a port that accepts TCP but is no gRPC server would make ray.init
    wait without end."""
    sock.sendall(_H2_PREFACE)
    head = b""
    while len(head) < 9:
        chunk = sock.recv(9 - len(head))
        if not chunk:
            return False
        head += chunk
    return head[3] == _H2_SETTINGS


def probe_address(address: str, timeout: float = CONNECT_TIMEOUT_S) -> None:
    """Raise UserError in one line unless ``address`` (host:port, ray://host:port) answers on TCP
    and as a gRPC server within ``timeout`` seconds. "auto" and "local" are left to Ray (no host
    to probe)."""
    if address.lower() in ("auto", "local"):
        return
    host, _, port = address.split("://", 1)[-1].rstrip("/").rpartition(":")
    if not host or not port.isdigit():
        raise UserError(f"RAY_ADDRESS={address} is not host:port")
    advice = "unset RAY_ADDRESS for a private local Ray, or use --executor local"
    try:
        sock = socket.create_connection((host.strip("[]"), int(port)), timeout=timeout)
    except OSError as e:
        reason = "timed out" if isinstance(e, TimeoutError) else (e.strerror or str(e))
        raise UserError(
            f"cannot reach the Ray cluster at RAY_ADDRESS={address} within {timeout:g} s "
            f"({reason}); {advice}"
        ) from None
    with sock:
        sock.settimeout(timeout)
        try:
            grpc = _answers_grpc(sock)
        except OSError:  # timed out, reset: no gRPC server there
            grpc = False
    if not grpc:
        raise UserError(
            f"RAY_ADDRESS={address} accepts connections but is not a Ray cluster (no gRPC "
            f"answer within {timeout:g} s); {advice}"
        )


def ray_init(num_cpus: int | None = None, connect_timeout: float = CONNECT_TIMEOUT_S):
    """Connect to RAY_ADDRESS's cluster, or start a private locked-down local one.

    Returns (ray module, whether this call started it: the caller shuts it down then)."""
    try:
        import ray  # only the Ray executor's modules import Ray, and only when asked to
    except ImportError:
        raise UserError("ray is not installed; use --executor local") from None
    if ray.is_initialized():
        return ray, False
    import pipeline  # the repository root holds the package: the workers import it from there

    root = str(Path(pipeline.__file__).resolve().parent.parent)
    path = os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH", "")) if p)
    common = {
        "runtime_env": {"env_vars": {"PYTHONPATH": path}},
        "logging_level": logging.WARNING,
        "log_to_driver": False,
    }
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    address = os.environ.get("RAY_ADDRESS", "")
    try:
        if address:
            probe_address(address, connect_timeout)
            ray.init(address="auto", **common)
        else:
            force_token_auth()
            secure_token_file()
            _reload_token()
            ray.init(
                num_cpus=num_cpus or machine_cpus(),
                include_dashboard=False,
                _node_ip_address="127.0.0.1",
                **common,
            )
            if not token_auth_enabled():
                ray.shutdown()
                raise UserError("Ray started without token authentication; refusing to run")
    except UserError:
        raise
    except Exception as e:
        msg = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise UserError(
            f"could not start Ray ({type(e).__name__}: {msg}); try --executor local"
        ) from None
    return ray, True


def cluster_shape(ray) -> tuple[int, int, int]:
    """(CPUs, GPUs, the most CPUs on one alive node) of the connected cluster."""
    res = ray.cluster_resources()
    node_cpus = [int(n["Resources"].get("CPU", 0)) for n in ray.nodes() if n.get("Alive")]
    return int(res.get("CPU", 1)), int(res.get("GPU", 0)), max(node_cpus or [1])
