"""Run folders and checkpoints written before the packages were regrouped still resume and
evaluate. ``tests/fixtures/legacy_run`` was written by main at 344cb4e (flat ``trainer/`` and
``pipeline/``): a tiny project, a pre-training stopped at iteration 2 of 4 and a 2-iteration
fine-tuning; every path in it is relative to that folder."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from tests.trainer.helpers import run_cli, train_records
from tests.trainer.tiny_project import sets

FIXTURE = Path(__file__).parent / "fixtures" / "legacy_run"


@pytest.fixture
def legacy(tmp_path, monkeypatch) -> Path:
    root = tmp_path / "legacy_run"
    shutil.copytree(FIXTURE, root)
    monkeypatch.chdir(root)
    return root


def test_an_old_pretraining_run_resumes_to_its_end(legacy, recwarn):
    before = train_records(legacy / "pretrain")
    assert [r["iter"] for r in before] == [1, 2]
    code, _, err = run_cli(
        "pretrain", "--config", "tiny.toml", *sets(), "--out", "pretrain", "--iters", "4",
        "--resume",
    )  # fmt: skip
    assert code == 0, err
    # keys added since the run was written read as the values it was made with: no warning
    assert not [w for w in recwarn if "changed settings" in str(w.message)]
    after = train_records(legacy / "pretrain")
    assert [r["iter"] for r in after] == [1, 2, 3, 4]
    assert after[:2] == before  # the old records are kept as they were
    assert (legacy / "pretrain" / "checkpoints" / "iter_0000004.pt").exists()


def test_an_old_finetuned_checkpoint_evaluates_to_its_recorded_metrics(legacy):
    out = legacy / "eval.json"
    code, _, err = run_cli(
        "evaluate", "--config", "tiny.toml", *sets(), "--checkpoint",
        "finetune/checkpoints/last.pt", "--out", str(out),
    )  # fmt: skip
    assert code == 0, err
    recorded = json.loads((legacy / "finetune" / "metrics.json").read_text())["final"]
    got = json.loads(out.read_text())["metrics"]
    for key in ("AP", "AP50", "AP75", "APs", "APm", "APl"):
        assert got[key] == pytest.approx(recorded[key], abs=1e-9), key
    # the same masks, classes and scores as the fine-tuning's own final evaluation (up to the
    # float rounding a different thread count gives: a border pixel, the fifth decimal)
    _assert_same_detections(legacy / "eval-segm.json", legacy / "finetune" / "detections-val.json")


def _assert_same_detections(got_path: Path, want_path: Path) -> None:
    from pycocotools import mask as mask_utils

    got, want = (json.loads(p.read_text()) for p in (got_path, want_path))
    assert want and len(got) == len(want)
    unmatched = list(range(len(want)))
    for d in got:
        same = [
            i
            for i in unmatched
            if (want[i]["image_id"], want[i]["category_id"]) == (d["image_id"], d["category_id"])
            and abs(want[i]["score"] - d["score"]) < 1e-3
        ]
        assert same, d["image_id"]
        ious = [float(mask_utils.iou([d["segmentation"]], [want[i]["segmentation"]], [0])[0, 0])
                for i in same]  # fmt: skip
        best = max(range(len(same)), key=ious.__getitem__)
        assert ious[best] > 0.95, ious[best]
        unmatched.remove(same[best])
