"""Where the frozen-feature cache lands: runs/<name>/feature-cache for runs inside runs/<name>/,
beside the run folder for one sent elsewhere with --out, feature_cache_dir when set."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

from trainer.data.feature_cache import cache_dir

CFG = SimpleNamespace(name="demo")


def _section(out: str, folder: str = "") -> SimpleNamespace:
    return SimpleNamespace(out=out, feature_cache_dir=folder)


def test_runs_inside_the_config_folder_share_its_cache(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    shared = Path("runs/demo/feature-cache")
    assert cache_dir(CFG, _section("runs/demo/pretrain")) == shared
    assert cache_dir(CFG, _section("runs/demo/compare-0.1/sp-seed0")) == shared
    assert cache_dir(CFG, _section("")) == shared  # an old checkpoint without its out


def test_a_run_sent_elsewhere_keeps_its_cache_beside_it(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "elsewhere" / "pretrain"
    assert cache_dir(CFG, _section(str(out))) == tmp_path / "elsewhere" / "feature-cache"
    assert cache_dir(CFG, _section(str(out), "/data/cache")) == Path("/data/cache")
