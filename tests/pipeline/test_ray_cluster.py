"""The Ray cluster a run uses: a bad RAY_ADDRESS fails fast, the private cluster is locked down."""

from __future__ import annotations

import os
import re
import socket
import stat
import time
import tomllib
from pathlib import Path

import pytest

from pipeline.cli import UserError
from pipeline.executors.ray_cluster import probe_address, ray_init, secure_token_file


def _closed_port() -> int:
    with socket.socket() as s:  # bound, never listening: connecting is refused at once
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_unreachable_address_is_one_line_and_fast():
    address = f"127.0.0.1:{_closed_port()}"
    t0 = time.monotonic()
    with pytest.raises(UserError) as e:
        probe_address(address, timeout=2)
    assert time.monotonic() - t0 < 5
    msg = str(e.value)
    assert len(msg.splitlines()) == 1 and address in msg and "--executor local" in msg


@pytest.mark.parametrize("address", ["nonsense", "host:", ":123"])
def test_malformed_address_is_refused(address):
    with pytest.raises(UserError, match="not host:port"):
        probe_address(address)


def test_token_file_is_private(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.delenv("RAY_AUTH_TOKEN", raising=False)
    monkeypatch.delenv("RAY_AUTH_TOKEN_PATH", raising=False)
    path = secure_token_file()
    assert path == tmp_path / ".ray" / "auth_token"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600 and len(path.read_text()) == 64
    token = path.read_text()
    os.chmod(path, 0o644)  # as Ray itself writes it
    assert secure_token_file() == path and stat.S_IMODE(path.stat().st_mode) == 0o600
    assert path.read_text() == token  # an existing token is kept, only tightened


@pytest.mark.ray
def test_unreachable_ray_address_fails_the_command(tmp_path, monkeypatch, capsys):
    pytest.importorskip("ray")
    monkeypatch.setenv("RAY_ADDRESS", f"127.0.0.1:{_closed_port()}")
    t0 = time.monotonic()
    with pytest.raises(UserError, match="cannot reach the Ray cluster"):
        ray_init(connect_timeout=2)
    assert time.monotonic() - t0 < 10


@pytest.mark.ray
def test_private_cluster_forces_token_auth(tmp_path, monkeypatch, capsys):
    ray = pytest.importorskip("ray")
    if ray.is_initialized():
        pytest.skip("a Ray cluster is already running in this process")
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")  # what Ray's own warning suggests
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.delenv("RAY_AUTH_TOKEN", raising=False)
    monkeypatch.delenv("RAY_AUTH_TOKEN_PATH", raising=False)
    ray, started = ray_init(num_cpus=1)
    try:
        from ray._private.authentication.authentication_utils import is_token_auth_enabled

        assert started and is_token_auth_enabled()
        token = tmp_path / ".ray" / "auth_token"
        assert stat.S_IMODE(token.stat().st_mode) == 0o600
        assert "RAY_AUTH_MODE=disabled ignored" in capsys.readouterr().err
    finally:
        ray.shutdown()


def test_pyproject_requires_a_ray_with_token_auth():
    root = Path(__file__).resolve().parents[2]
    deps = tomllib.loads((root / "pyproject.toml").read_text())["project"]["dependencies"]
    [spec] = [d for d in deps if re.match(r"ray\b", d)]
    low = re.search(r">=\s*([\d.]+)", spec)
    assert low, spec
    assert tuple(int(x) for x in low.group(1).split(".")) >= (2, 52), spec


def test_a_port_that_is_not_ray_fails_in_bounded_time():
    """It accepts TCP (the old probe passed) but never speaks gRPC: ray.init would hang."""
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        address = f"127.0.0.1:{server.getsockname()[1]}"
        t0 = time.monotonic()
        with pytest.raises(UserError) as e:
            probe_address(address, timeout=1)
    assert time.monotonic() - t0 < 4
    msg = str(e.value)
    assert len(msg.splitlines()) == 1 and "is not a Ray cluster" in msg and address in msg
