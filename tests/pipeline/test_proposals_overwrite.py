"""proposals keeps what it did not write and never loses finished work: files of another schema
or tool stay (refused in one line), an interrupted ``--overwrite`` resumes its staging, and a
commit cut short among its renames is rolled forward by the next run."""

from __future__ import annotations

import json
import shutil

import h5py
import numpy as np

from pipeline.executors.worker import ProposalWorker
from pipeline.shards.schema import list_shards, read_meta, shard_name
from pipeline.shards.staging import COMMIT, STAGING
from tests.pipeline.test_proposals import _config, _images, _run, one_thread, weights  # noqa: F401


def _one_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    return err[0]


def test_foreign_files_and_other_schemas_are_kept(tmp_path, weights, capsys):  # noqa: F811
    images = _images(tmp_path / "imgs", 4)
    out = tmp_path / "out"
    out.mkdir()
    foreign = out / shard_name(0)
    foreign.write_bytes(b"a user's file that happens to have this name")
    assert _run(_config(tmp_path, weights), images, out) == 2
    line = _one_line(capsys)
    assert str(foreign) in line and "--overwrite" in line
    assert foreign.read_bytes().startswith(b"a user's file")

    foreign.unlink()
    assert _run(_config(tmp_path, weights), images, out) == 0
    with h5py.File(out / shard_name(1), "r+") as f:  # a shard of a future schema version
        f.attrs["schema_version"] = np.int64(2)
    before = (out / shard_name(1)).read_bytes()
    capsys.readouterr()
    assert _run(_config(tmp_path, weights), images, out) == 2
    assert "schema version 2" in _one_line(capsys)
    assert (out / shard_name(1)).read_bytes() == before


def test_interrupted_overwrite_resumes_its_staging(tmp_path, weights, monkeypatch):  # noqa: F811
    images = _images(tmp_path / "imgs", 4)
    out = tmp_path / "out"
    assert _run(_config(tmp_path, weights), images, out) == 0
    old = read_meta(out / shard_name(0))["fingerprint"]
    real, calls = ProposalWorker.process_shard, []

    def preempted(self, index, items, on_batch=None):  # the job dies before shard 1
        calls.append(index)
        if index == 1:
            raise RuntimeError("preempted")
        return real(self, index, items, on_batch)

    monkeypatch.setattr(ProposalWorker, "process_shard", preempted)
    other = _config(tmp_path, weights, top_k=3)
    assert _run(other, images, out, "--overwrite") == 1
    assert read_meta(out / shard_name(0))["fingerprint"] == old  # old result untouched
    assert (out / STAGING / shard_name(0)).is_file()

    monkeypatch.setattr(ProposalWorker, "process_shard", real)
    assert _run(other, images, out, "--overwrite") == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["skipped_shards"] == [0] and summary["computed_shards"] == [1]
    assert {read_meta(p)["fingerprint"] for p in list_shards(out)} != {old}
    assert not (out / STAGING).exists()


def test_a_commit_cut_short_is_rolled_forward(tmp_path, weights):  # noqa: F811
    images = _images(tmp_path / "imgs", 4)
    out, new = tmp_path / "out", tmp_path / "new"
    assert _run(_config(tmp_path, weights), images, out) == 0
    other = _config(tmp_path, weights, top_k=3)
    assert _run(other, images, new) == 0
    # As a kill after the first rename leaves it: shard 0 new, shard 1 and the records staged.
    staging = out / STAGING
    staging.mkdir()
    names = [shard_name(0), shard_name(1), "plan.json", "summary.json"]
    (staging / COMMIT).write_text(json.dumps({"staged": names}))
    shutil.copyfile(new / shard_name(0), out / shard_name(0))
    for name in names[1:]:
        shutil.copyfile(new / name, staging / name)

    assert _run(other, images, out) == 0  # finishes the commit, then finds every shard done
    fingerprints = {read_meta(p)["fingerprint"] for p in list_shards(out)}
    assert fingerprints == {read_meta(new / shard_name(0))["fingerprint"]}
    assert json.loads((out / "summary.json").read_text())["skipped_shards"] == [0, 1]
    assert not staging.exists()
