"""The trainer commands with ``model.kind = "queryinst"``: pretrain (prompts and query supervision
on hand-made shards, class-agnostic, box targets from the pseudo masks) with exact resume,
finetune from it with exactly the class layers skipped, evaluate reproducing the run's final AP,
and kernels drawing every query. A random-weight ViT-S/14 at 56 px and a tiny QueryInst."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from pipeline.backbones.build import build_backbone
from tests.trainer.helpers import TINY_MODEL, run_cli, train_records
from tests.trainer.test_mask2former_commands import (
    FINETUNE,
    _sets,
    check_exact_resume,
    check_study_compare_kernels,
    labelled_sets,
)
from tests.trainer.test_pretrain import TINY, make_shards
from trainer.config import load_config
from trainer.engine.checkpoint import load_checkpoint, load_matching, model_state
from trainer.model.queryinst.model import QueryInst

ROOT = Path(__file__).resolve().parents[2]
# On top of test_pretrain's tiny settings (which hold a tiny K-Net's sizes): the tiny QueryInst's
# model keys, and with them the loader setting these commands use.
QUERYINST_MODEL = [
    "model.kind=queryinst",
    "model.dii_stages=2",
    "model.dynamic_dim=8",
    "model.mask_convs=1",
]
QUERYINST = [*QUERYINST_MODEL, "pretrain.num_workers=0"]


def _pretrain(shards: Path, out: Path, iters: int, *extra: str):
    config = str(ROOT / "configs" / "demo.toml")
    return run_cli(
        "pretrain",
        *("--config", config, "--shards", str(shards), "--out", str(out)),
        *("--iters", str(iters), *_sets(TINY, QUERYINST), *extra),
    )


def test_pretrain_resume_finetune_evaluate_kernels(tmp_path, monkeypatch):
    shards = make_shards(tmp_path)
    out = tmp_path / "pretrain"
    code, _, stderr = _pretrain(shards, out, 3)
    assert code == 0, stderr
    for r in train_records(out):  # box and mask losses and query supervision at every stage
        for i in (1, 2):
            assert {f"loss_s{i}_{t}" for t in ("cls", "l1", "giou", "dice", "kernel")} <= r.keys()
        assert "stat_prompt_cos" in r
    recorded = load_config(out / "config.toml")
    assert recorded.model.kind == "queryinst" and recorded.model.dii_stages == 2

    # The checkpoint holds a class-agnostic QueryInst that loads completely into a fresh one.
    state = load_checkpoint(out / "checkpoints" / "last.pt")
    assert state["num_classes"] == 1
    model = QueryInst(build_backbone(recorded.backbone), recorded.model, num_classes=1)
    assert load_matching(model, model_state(state, model, "last.pt"), allowed_skips=()) == []

    # Resumed to 4 iterations, it computes exactly what an uninterrupted run computes.
    check_exact_resume(_pretrain, shards, out, tmp_path)

    # Fine-tuning from it loads every tensor but the per-stage class layers, and says so.
    monkeypatch.chdir(tmp_path)
    sets = labelled_sets(tmp_path)
    args = ("--config", str(ROOT / "configs" / "demo.toml"), *_sets(TINY, QUERYINST, FINETUNE))
    init = str(out / "checkpoints" / "last.pt")
    run = tmp_path / "ft"
    common = (*args, *_sets(sets), "--frac", "1.0", "--iters", "2", "--out", str(run))
    code, _, err = run_cli("finetune", *common, "--init", init)
    assert code == 0, err
    skipped = [f"class_heads.{i}.{p}" for i in (0, 1) for p in ("bias", "weight")]
    assert f"skipped 4 tensors (class layers): {', '.join(skipped)}" in err
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["skipped"] == skipped and metrics["num_classes"] == 2
    assert 0.0 <= metrics["final"]["AP"] <= 1.0

    # evaluate on the fine-tuned checkpoint reproduces the run's final evaluation.
    ckpt = run / "checkpoints" / "last.pt"
    code, _, err = run_cli("evaluate", "--checkpoint", str(ckpt), "--out", "eval.json")
    assert code == 0, err
    report = json.loads(Path("eval.json").read_text())
    for key in ("AP", "AP50", "AP75"):
        assert report["metrics"][key] == pytest.approx(metrics["final"][key], abs=1e-9)

    # kernels draws one map per query (on the fine-tuned run, whose config names the tiny data).
    code, _, err = run_cli("kernels", "--checkpoint", str(ckpt), "--label", "qi", "--out", "k")
    assert code == 0, err
    saved = np.load(Path("k") / "kernels-qi.npz")
    assert saved["mean"].shape[0] == TINY_MODEL.num_kernels


def test_study_compare_and_kernels_with_queryinst(tmp_path, monkeypatch):
    """study pre-trains QueryInst variants with their switches, compare reuses the study's
    checkpoint, kernels draws every query (as for Mask2Former)."""
    check_study_compare_kernels(tmp_path, monkeypatch, QUERYINST_MODEL, "queryinst")
