"""A full disk or a read-only folder is one line naming the path and exit 2, never a traceback
or a crash (issue 15). The failures are injected: the tests run as any user, on any disk."""

from __future__ import annotations

import builtins
import errno
import os
import shutil
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch

from pipeline.atomic_files import write_json
from pipeline.cli import main
from pipeline.shards import schema as shards_module
from pipeline.shards.schema import STATUS_EMPTY, ImageRecord, list_temp_files, write_shard
from trainer.engine.checkpoint import save_checkpoint

ROOT = Path(__file__).resolve().parents[2]

META = {
    "fingerprint": "f" * 64,
    "backbone": "dinov2_vits14",
    "feature_stride": 14,
    "embed_dim": 4,
    "settings": {},
}


def _run_failing(monkeypatch, capsys, error: BaseException) -> tuple[int, str]:
    """Run ``prog fail`` whose command raises ``error``; (exit code, stderr)."""
    module = types.ModuleType("failing_command")
    module.add_arguments = lambda parser: None

    def run(args):
        raise error

    module.run = run
    monkeypatch.setitem(sys.modules, "failing_command", module)
    code = main("prog", {"fail": "failing_command"}, ["fail"])
    return code, capsys.readouterr().err


@pytest.mark.parametrize(
    "code, message",
    [
        (errno.ENOSPC, "no space left on device"),
        (errno.EROFS, "read-only file system"),
        (errno.EACCES, "permission denied (read-only?)"),
        (errno.EDQUOT, "disk quota exceeded"),
    ],
)
def test_cli_reports_disk_errors_in_one_line(monkeypatch, capsys, code, message):
    error = OSError(code, "ignored", "/runs/x/shard-00001.h5")
    exit_code, err = _run_failing(monkeypatch, capsys, error)
    assert exit_code == 2
    assert err == f"prog fail: error: /runs/x/shard-00001.h5: {message}\n"


def test_cli_keeps_tracebacks_for_other_os_errors(monkeypatch, capsys):
    with pytest.raises(OSError, match="Input/output error"):
        _run_failing(monkeypatch, capsys, OSError(errno.EIO, "Input/output error"))


class _FullDisk:
    """A file whose writes fail as on a full disk (write() names no file)."""

    def __init__(self, *args, **kwargs):
        self.real = builtins.open(*args, **kwargs)

    def write(self, data):
        raise OSError(errno.ENOSPC, "No space left on device")

    def __getattr__(self, name):
        return getattr(self.real, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.real.close()


def test_shard_write_on_full_disk_names_the_shard(tmp_path, monkeypatch):
    monkeypatch.setattr(shards_module, "open", _FullDisk, raising=False)
    path = tmp_path / "shard-00002.h5"
    with pytest.raises(OSError) as e:
        write_shard(path, [ImageRecord("a.jpg", 1, 20, 30, STATUS_EMPTY)], META)
    assert e.value.errno == errno.ENOSPC and e.value.filename == str(path)
    assert not path.exists() and list_temp_files(tmp_path) == []


def test_json_write_on_full_disk_names_the_file(tmp_path, monkeypatch):
    def full(self, *args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(Path, "write_text", full)
    with pytest.raises(OSError) as e:
        write_json(tmp_path / "summary.json", {"a": 1})
    assert e.value.errno == errno.ENOSPC and e.value.filename == str(tmp_path / "summary.json")


def test_checkpoint_write_on_full_disk_is_enospc(tmp_path, monkeypatch):
    """torch's zip writer says 'unexpected pos 57552704'; with the disk full that is ENOSPC."""

    def fail(*args, **kwargs):
        raise RuntimeError("[enforce fail at inline_container.cc:626] . unexpected pos 57552704")

    monkeypatch.setattr(torch, "save", fail)
    usage = shutil.disk_usage(tmp_path)
    monkeypatch.setattr(shutil, "disk_usage", lambda p: usage._replace(free=4096))
    path = tmp_path / "checkpoints" / "iter_0000010.pt"
    with pytest.raises(OSError) as e:
        save_checkpoint(path, {"iteration": 10})
    assert e.value.errno == errno.ENOSPC and e.value.filename == str(path)
    assert list((tmp_path / "checkpoints").iterdir()) == []
    # with space left the RuntimeError is not disguised as a full disk
    monkeypatch.setattr(shutil, "disk_usage", lambda p: usage._replace(free=2**40))
    with pytest.raises(RuntimeError, match="unexpected pos"):
        save_checkpoint(path, {"iteration": 10})


@pytest.mark.skipif(not hasattr(os, "fork"), reason="sets a POSIX resource limit")
def test_a_file_size_limit_is_the_disk_full_line(tmp_path):
    """EFBIG (ulimit -f; Python ignores SIGXFSZ) is as much the user's to fix as ENOSPC."""
    import resource

    config = tmp_path / "demo.toml"
    config.write_text(
        'name = "demo"\n[data]\nnum_train = 2\nnum_val = 1\nmin_size = 64\nmax_size = 80\n'
    )
    out = tmp_path / "data"
    limit = 1000  # bytes: every JPEG is larger

    def small_files():
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    run = subprocess.run(
        [sys.executable, "-m", "pipeline", "data", "--config", str(config), "--out", str(out)],
        capture_output=True,
        text=True,
        cwd=ROOT,
        preexec_fn=small_files,
        timeout=120,
    )
    err = run.stderr.strip().splitlines()
    assert run.returncode == 2 and len(err) == 1, run.stderr
    assert "file too large" in err[0] and str(out) in err[0]
