"""QueryInst in the commands after fine-tuning: ``predict`` (a fine-tuned checkpoint with its class
names, a pre-training one class-agnostic), ``evaluate``'s AP reproduced by ``predict`` on a COCO
file, ``pseudo-label`` writing a self-training round that ``inspect`` and ``pretrain`` read, and
``efficiency`` rows that recompute from the runs. A tiny project (random ResNet-50, 40 training
images) and a tiny QueryInst. ONNX export of QueryInst is in test_export.py."""

from __future__ import annotations

import json
import statistics
from pathlib import Path

import pytest

from pipeline.shards.folder import folder_problems
from pipeline.shards.schema import list_shards, read_meta
from pipeline.shards.shard_reader import ShardReader
from tests.trainer.helpers import run_cli, run_pipeline
from tests.trainer.test_predict import check_predict_scores_the_ap_of_evaluate
from tests.trainer.test_pseudo_label import stage_one_proposals
from tests.trainer.test_queryinst_commands import QUERYINST_MODEL as QUERYINST
from tests.trainer.tiny_project import CATEGORY_IDS, pretrain, sets, write_project
from trainer.inference.predictor import Predictor


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    """(root, config, pre-training checkpoint, fine-tuned checkpoint): a tiny QueryInst project."""
    root = tmp_path_factory.mktemp("queryinst")
    toml = write_project(root, num_train=40)
    pre = pretrain(toml, root / "pretrain", 1, *QUERYINST)
    run = root / "finetune"
    code, _, err = run_cli(
        "finetune", "--config", str(toml), *sets(*QUERYINST), "--frac", "0.25", "--iters", "2",
        "--init", str(pre), "--out", str(run),
    )  # fmt: skip
    assert code == 0, err
    return root, toml, pre, run / "checkpoints" / "last.pt"


def test_predict_gives_named_and_class_agnostic_detections(project, tmp_path):
    root, _, pre, ckpt = project
    images = sorted((root / "data" / "val").glob("*.png"))
    tuned = Predictor.from_checkpoint(ckpt)
    found = tuned(images[0])
    assert len(found) > 0 and found.masks.shape[1:] == (64, 64)
    assert set(found.label_names) <= {f"class{c}" for c in CATEGORY_IDS}
    agnostic = Predictor.from_checkpoint(pre)
    assert agnostic.class_agnostic and set(agnostic(images[0]).label_names) == {"object"}

    out = tmp_path / "out"
    code, _, err = run_cli(
        "predict", "--checkpoint", str(ckpt), "--images", str(root / "data" / "val"),
        "--out", str(out), "--score-threshold", "0",
    )  # fmt: skip
    assert code == 0, err
    detections = json.loads((out / "detections.json").read_text())
    assert len(detections) > 0 and {d["category_id"] for d in detections} <= set(CATEGORY_IDS)


def test_predict_on_the_val_file_scores_the_ap_of_evaluate(project, tmp_path):
    root, _, _, ckpt = project
    check_predict_scores_the_ap_of_evaluate(root, ckpt, tmp_path)


def test_a_self_training_round_from_queryinst_is_read_by_inspect_and_pretrain(project, tmp_path):
    root, toml, pre, _ = project
    proposals = stage_one_proposals(toml, root / "data" / "val", tmp_path / "proposals")
    out = tmp_path / "round2"
    code, _, err = run_cli(
        "pseudo-label", "--checkpoint", str(pre), "--shards", str(proposals), "--out", str(out),
        "--score-threshold", "0", "--max-masks", "3",
    )  # fmt: skip
    assert code == 0, err
    assert folder_problems(out) == []
    assert json.loads(read_meta(list_shards(out)[0])["self_training"])["round"] == 2
    records = [r for p in list_shards(out) for r in ShardReader(p).records()]
    assert len(records) == 2 and all(1 <= r.num_masks <= 3 for r in records)
    code, stdout, err = run_pipeline("inspect", str(out))
    assert code == 0 and "ok 2" in stdout, err
    code, _, err = run_cli(
        "pretrain", "--config", str(toml), *sets(*QUERYINST), "--shards", str(out),
        "--out", str(tmp_path / "pretrain2"), "--iters", "1",
    )  # fmt: skip
    assert code == 0 and "self-training round 2" in err, err


def test_efficiency_rows_with_queryinst_recompute_from_the_runs(project, tmp_path, monkeypatch):
    root, toml, pre, _ = project
    monkeypatch.chdir(tmp_path)
    budget = ("finetune.iters=1", "finetune.lr_steps=[]", "efficiency.fracs=[0.25]")
    code, _, err = run_cli(
        "efficiency", "--config", str(toml), *sets(*QUERYINST, *budget), "--init", str(pre),
        "--seeds", "0,1", "--out", "eff",
    )  # fmt: skip
    assert code == 0, err
    (fraction,) = json.loads(Path("eff/results.json").read_text())["fractions"]
    assert fraction["labelled_images"] == 10
    by = {}
    for r in fraction["runs"]:
        config = (Path(r["out"]) / "config.toml").read_text()
        assert 'kind = "queryinst"' in config
        final = json.loads((Path(r["out"]) / "metrics.json").read_text())["final"]
        assert r["AP"] == final["AP"]
        by[(r["row"], r["seed"])] = final["AP"]
    assert sorted(by) == [("baseline", 0), ("baseline", 1), ("sp", 0), ("sp", 1)]
    deltas = [by[("sp", s)] - by[("baseline", s)] for s in (0, 1)]
    diff = fraction["differences"]["sp - baseline"]["AP"]
    assert diff["mean"] == pytest.approx(statistics.mean(deltas))
    assert diff["sd"] == pytest.approx(statistics.stdev(deltas))
