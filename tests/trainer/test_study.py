"""``python -m trainer study`` on a tiny project: every variant pre-trains with its switches
really switched (the loss terms and prompt statistics in its metrics.jsonl show it), the baseline
is fine-tuned once per seed, one report holds them all, and a second call reuses everything."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from pipeline.cli import UserError
from tests.trainer.helpers import run_cli, train_records
from tests.trainer.tiny_project import sets, write_project
from trainer.experiments.study import parse_variants


def test_study_runs_each_variant_with_its_switches(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    toml = write_project(tmp_path)
    args = (
        "study",
        "--config",
        str(toml),
        *sets(),
        "--frac",
        "0.5",
        "--seeds",
        "0",
        "--variants",
        "full,neither,ks_frozen,decor:ks_decorrelation=0.5",
        "--iters",
        "1",
        "--pretrain-iters",
        "1",
        "--out",
        "study",
    )
    code, out, err = run_cli(*args)
    assert code == 0, err
    folder = Path("study")

    def records(variant: str) -> dict:
        (r,) = train_records(folder / f"pretrain-{variant}-p0")
        return r

    full, neither, frozen, decor = (records(v) for v in ("full", "neither", "ks_frozen", "decor"))
    for r, kernel, prompts in ((full, True, True), (neither, False, False), (frozen, True, True)):
        assert any(k.endswith("_kernel") for k in r) == kernel
        assert ("stat_target_spread" in r) == kernel
        assert ("stat_prompt_cos" in r) == prompts
    assert "loss_ks_decorrelation" in decor and "loss_ks_decorrelation" not in full
    # The frozen projection is a buffer, never a parameter; the paper's Linear is a parameter.
    from trainer.engine.checkpoint import load_checkpoint

    extras = {
        v: load_checkpoint(folder / f"pretrain-{v}-p0" / "checkpoints" / "last.pt")["extras"]
        for v in ("full", "ks_frozen")
    }
    assert "kernel_supervision.basis" in extras["ks_frozen"]
    assert "kernel_supervision.proj.weight" in extras["full"]

    results = json.loads((folder / "results.json").read_text())
    rows = {(r["row"], r["seed"]) for r in results["runs"]}
    assert rows == {(v, 0) for v in ("full", "neither", "ks_frozen", "decor", "baseline")}
    assert set(results["summary"]) == {"full", "neither", "ks_frozen", "decor", "baseline"}
    for v in ("full", "neither", "ks_frozen", "decor"):
        (pair,) = results["summary"][v]["difference"]["pairs"]
        run = next(r for r in results["runs"] if r["row"] == v)
        base = next(r for r in results["runs"] if r["row"] == "baseline")
        assert pair["AP"] == pytest.approx(run["final"]["AP"] - base["final"]["AP"])
    pre = results["settings"]["pretraining"]
    assert pre["neither-p0"]["loss_kinds"] == sorted(set(pre["neither-p0"]["loss_kinds"]))
    assert (
        "kernel" in pre["full-p0"]["loss_kinds"] and "kernel" not in pre["neither-p0"]["loss_kinds"]
    )
    text = (folder / "results.md").read_text()
    assert (
        "seeded split" in text
        and "neither (pseudo masks only)" in text
        and "Pre-training runs" in text
    )
    assert (folder / "ap_vs_iter.png").stat().st_size > 0
    # A killed or repeated study reuses every finished pre-training and fine-tuning.
    code, _, err = run_cli(*args)
    assert code == 0, err
    assert err.count("reusing the finished pre-training") == 4
    assert err.count("reusing the finished run") == 5
    # Copied to another study folder (e.g. a compare's pre-training and runs brought into a
    # study), every run is still recognised as the same run.
    shutil.copytree(folder, "copied")
    code, _, err = run_cli(*args[:-1], "copied")
    assert code == 0, err
    assert err.count("reusing the finished pre-training") == 4
    assert err.count("reusing the finished run") == 5


def test_variant_names():
    chosen = parse_variants(["full", "no_prompts", "x:prompts=false+ks_target=detached"])
    assert chosen["full"][1] == [] and chosen["no_prompts"][1] == ["pretrain.prompts=false"]
    assert chosen["x"][1] == ["pretrain.prompts=false", "pretrain.ks_target=detached"]
    with pytest.raises(UserError, match="unknown study variant"):
        parse_variants(["fulll"])
    with pytest.raises(UserError, match="unique"):
        parse_variants(["full", "full"])
