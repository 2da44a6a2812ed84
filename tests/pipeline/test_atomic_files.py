"""Atomic output files: the old content survives a failed write and no temporary file is left."""

from __future__ import annotations

import json
import os

import pytest

from pipeline import atomic_files
from pipeline.atomic_files import write_json, write_text


def test_write_json_round_trip_and_compact_form(tmp_path):
    path = write_json(tmp_path / "a" / "b.json", {"x": [1, 2], "y": "z"})
    assert json.loads(path.read_text()) == {"x": [1, 2], "y": "z"}
    assert "\n  " in path.read_text()  # indented by default
    compact = write_json(tmp_path / "c.json", {"x": [1, 2]}, indent=None)
    assert compact.read_text() == '{"x":[1,2]}\n'
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["a", "b.json", "c.json"]


def test_failed_replace_keeps_the_old_file_and_leaves_no_temp(tmp_path, monkeypatch):
    path = write_text(tmp_path / "out.txt", "old\n")

    def broken_replace(src, dst):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(atomic_files.os, "replace", broken_replace)
    with pytest.raises(OSError):
        write_text(path, "new\n")
    monkeypatch.setattr(atomic_files.os, "replace", os.replace)
    assert path.read_text() == "old\n"
    assert [p.name for p in tmp_path.iterdir()] == ["out.txt"]


def test_unserialisable_data_never_touches_the_file(tmp_path):
    path = write_json(tmp_path / "m.json", {"ok": 1})
    with pytest.raises(TypeError):
        write_json(path, {"bad": object()})
    assert json.loads(path.read_text()) == {"ok": 1}
