"""The trainer commands with ``model.kind = "mask2former"``: pretrain (prompts and query
supervision on hand-made shards) with exact resume, finetune from it with the exact skipped class
layer, and evaluate reproducing the run's final AP. A random-weight ViT-S/14 at 56 px, as in
test_pretrain.py, and a tiny Mask2Former."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable
from pathlib import Path

import pytest

from pipeline.backbones.build import build_backbone
from pipeline.cli import UserError
from tests.trainer.helpers import TINY_MODEL, run_cli, train_records, write_tiny_coco
from tests.trainer.test_pretrain import TINY, make_shards
from trainer.config import load_config
from trainer.engine.checkpoint import load_checkpoint, load_matching, model_state
from trainer.engine.metrics_log import read_metrics
from trainer.model.factory import build_model
from trainer.model.mask2former.model import Mask2Former
from trainer.stages.finetune_init import load_init

ROOT = Path(__file__).resolve().parents[2]
# On top of test_pretrain's tiny settings (which hold a tiny K-Net's sizes).
MASK2FORMER = [
    "model.kind=mask2former",
    "model.decoder_layers=3",
    "model.encoder_layers=1",
    "model.encoder_ffn_dim=32",
    "model.num_points=64",
    "pretrain.prompt_keep=0.95",
    "pretrain.num_workers=0",  # no worker start-up (K-Net's test covers resuming one)
]
FINETUNE = [
    "finetune.batch_size=2",
    "finetune.short_side=56",
    "finetune.max_side=56",
    "finetune.num_workers=0",
    "finetune.log_every=1",
    "finetune.ckpt_every=2",
    "finetune.eval_every=2",
    "finetune.warmup_iters=1",
    "finetune.lr_steps=[]",
    "finetune.frozen_stages=-1",
]


def _sets(*groups: list[str]) -> list[str]:
    return [arg for group in groups for s in group for arg in ("--set", s)]


def _pretrain(shards: Path, out: Path, iters: int, *extra: str):
    return run_cli(
        "pretrain",
        "--config",
        str(ROOT / "configs" / "demo.toml"),
        "--shards",
        str(shards),
        "--out",
        str(out),
        "--iters",
        str(iters),
        *_sets(TINY, MASK2FORMER),
        *extra,
    )


def check_exact_resume(pretrain: Callable, shards: Path, out: Path, tmp_path: Path) -> None:
    """``out`` (3 iterations) resumed to 4 computes exactly what an uninterrupted run of 4 does."""
    code, _, stderr = pretrain(shards, out, 4, "--resume")
    assert code == 0, stderr
    code, _, stderr = pretrain(shards, tmp_path / "straight", 4)
    assert code == 0, stderr
    straight = read_metrics(tmp_path / "straight" / "metrics.jsonl")
    assert [r["loss"] for r in straight] == [r["loss"] for r in read_metrics(out / "metrics.jsonl")]


def labelled_sets(tmp_path: Path) -> list[str]:
    """A tiny labelled COCO train/val pair under tmp_path/data, as data.* assignments."""
    data = tmp_path / "data"
    write_tiny_coco(data, "train", num_images=4, seed=0, size=56)
    write_tiny_coco(data, "val", num_images=2, seed=1, size=56)
    return [
        f"data.train_images={data / 'train'}",
        f"data.train_json={data / 'annotations' / 'instances_train.json'}",
        f"data.val_images={data / 'val'}",
        f"data.val_json={data / 'annotations' / 'instances_val.json'}",
    ]


def test_pretrain_resume_finetune_evaluate(tmp_path, monkeypatch):
    shards = make_shards(tmp_path)
    out = tmp_path / "pretrain"
    code, _, stderr = _pretrain(shards, out, 3)
    assert code == 0, stderr
    records = train_records(out)
    for r in records:  # query supervision at every decoder layer, prompts on
        assert {f"loss_s{i}_kernel" for i in (1, 2, 3)} <= r.keys()
        assert "loss_init_cls" in r and "stat_prompt_cos" in r
    recorded = load_config(out / "config.toml")
    assert recorded.model.kind == "mask2former" and recorded.pretrain.prompt_keep == 0.95

    # The checkpoint holds a class-agnostic Mask2Former (one class + no object) that loads
    # completely into a fresh one.
    state = load_checkpoint(out / "checkpoints" / "last.pt")
    assert state["num_classes"] == 1
    model = Mask2Former(build_backbone(recorded.backbone), recorded.model, num_classes=1)
    assert load_matching(model, model_state(state, model, "last.pt"), allowed_skips=()) == []

    # Resumed to 4 iterations, it computes exactly what an uninterrupted run computes.
    check_exact_resume(_pretrain, shards, out, tmp_path)

    # Fine-tuning from it loads every tensor but the class layer, and says so.
    monkeypatch.chdir(tmp_path)
    sets = labelled_sets(tmp_path)
    args = ("--config", str(ROOT / "configs" / "demo.toml"), *_sets(TINY, MASK2FORMER, FINETUNE))
    init = str(out / "checkpoints" / "last.pt")
    run = tmp_path / "ft"
    common = (*args, *_sets(sets), "--frac", "1.0", "--iters", "2", "--out", str(run))
    code, _, err = run_cli("finetune", *common, "--init", init)
    assert code == 0, err
    skipped = "decoder.class_embed.bias, decoder.class_embed.weight"
    assert f"skipped 2 tensors (class layers): {skipped}" in err
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["skipped"] == skipped.split(", ") and metrics["num_classes"] == 2
    assert 0.0 <= metrics["final"]["AP"] <= 1.0

    # evaluate on the fine-tuned checkpoint reproduces the run's final evaluation.
    code, _, err = run_cli(
        "evaluate", "--checkpoint", str(run / "checkpoints" / "last.pt"), "--out", "eval.json"
    )
    assert code == 0, err
    report = json.loads(Path("eval.json").read_text())
    for key in ("AP", "AP50", "AP75"):
        assert report["metrics"][key] == pytest.approx(metrics["final"][key], abs=1e-9)

    # A K-Net cannot start from a Mask2Former checkpoint: an error naming what does not fit.
    knet_cfg = dataclasses.replace(recorded.model, kind="knet")
    with pytest.raises(UserError, match="does not fit the model"):
        load_init(build_model(knet_cfg, model.backbone, 2), init)


def test_study_compare_and_kernels_with_mask2former(tmp_path, monkeypatch):
    """The multi-run commands are model-agnostic: a Mask2Former study pre-trains its variants
    with their switches, compare reuses the study's checkpoint, kernels draws every query."""
    check_study_compare_kernels(tmp_path, monkeypatch, MASK2FORMER[:-1], "mask2former")


def check_study_compare_kernels(tmp_path, monkeypatch, settings: list[str], kind: str) -> None:
    """study (full and no_prompts variants), compare from its checkpoint, kernels on it, for a
    ``kind`` model set up by ``settings`` (``--set`` assignments on top of tiny_project's)."""
    import numpy as np

    from tests.trainer.tiny_project import sets, write_project

    monkeypatch.chdir(tmp_path)
    toml = write_project(tmp_path)
    common = ("--config", str(toml), *sets(*settings), "--frac", "0.5", "--seeds", "0")
    common = (*common, "--iters", "1")
    code, _, err = run_cli(
        "study", *common, "--variants", "full,no_prompts", "--pretrain-iters", "2", "--out", "s"
    )
    assert code == 0, err
    full, bare = (train_records(Path("s") / f"pretrain-{v}-p0") for v in ("full", "no_prompts"))
    assert all("stat_prompt_cos" in r and "loss_s1_kernel" in r for r in full)
    assert all("stat_prompt_cos" not in r and "loss_s1_kernel" in r for r in bare)
    results = json.loads((Path("s") / "results.json").read_text())
    assert {r["row"] for r in results["runs"]} == {"full", "no_prompts", "baseline"}
    ckpt = Path("s") / "pretrain-full-p0" / "checkpoints" / "last.pt"
    assert load_config(ckpt.parent.parent / "config.toml").model.kind == kind

    code, _, err = run_cli("compare", *common, "--pretrained", str(ckpt), "--out", "c")
    assert code == 0, err
    rows = {r["row"] for r in json.loads((Path("c") / "results.json").read_text())["runs"]}
    assert rows == {"sp", "baseline"}

    code, _, err = run_cli("kernels", "--checkpoint", str(ckpt), "--label", "m2f", "--out", "k")
    assert code == 0, err
    saved = np.load(Path("k") / "kernels-m2f.npz")
    assert saved["mean"].shape == (TINY_MODEL.num_kernels, 64, 64)  # one map per query
