"""bf16 autocast as a setting: stage one's masks against fp32's, the capability check, the cache's
and resume's refusal to mix precisions, and an old config's ``amp`` keeping its meaning."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import torch
from pycocotools import mask as mask_util

from pipeline import precision as precision_mod
from pipeline.cli import UserError
from pipeline.config import ProposalConfig
from pipeline.precision import check_precision, effective_precision
from pipeline.shards.plan import compute_fingerprint
from tests.pipeline.test_proposals import _images
from trainer.config_compat import with_later_defaults
from trainer.data.feature_cache import FeatureStore
from trainer.engine.resume import meaning_changes

NATIVE_BF16 = precision_mod.cpu_has_native_bf16()


def _masks(worker, items):
    from pipeline.inputs.listing import ImageItem

    records = worker._infer([worker.load(ImageItem(p.name, i, p)) for i, p in enumerate(items)])
    worker.scores = np.concatenate([r.scores for r in records if r.scores is not None])
    out = []
    for r in records:
        h, w = r.height, r.width
        rles = [{"size": [h, w], "counts": c} for c in (r.rles or [])]
        out.append(mask_util.decode(rles).transpose(2, 0, 1) if rles else np.zeros((0, h, w)))
    return out


def _best_iou(a: np.ndarray, masks: np.ndarray) -> float:
    if len(masks) == 0:
        return 0.0
    inter = (masks & a[None]).reshape(len(masks), -1).sum(1)
    union = (masks | a[None]).reshape(len(masks), -1).sum(1)
    return float((inter / np.maximum(union, 1)).max())


@pytest.mark.skipif(not NATIVE_BF16, reason="this CPU has no native bf16")
def test_bf16_stage_one_masks_match_fp32(tmp_path):
    """Two images through a tiny ViT: every fp32 mask has a bf16 mask at IoU >= 0.9 (the stated
    tolerance: bf16 keeps 8 bits of mantissa, so a few cells at a threshold may flip)."""
    from pipeline.backbones.vit import DinoV2ViTS14
    from pipeline.executors.worker import ProposalWorker

    torch.manual_seed(0)
    net = DinoV2ViTS14(pos_grid=4)
    cfg = ProposalConfig(
        short_side=56, max_side=84, score_threshold=0.3, min_center_y=0.0, max_box_width=1.0
    )
    items = sorted(_images(tmp_path / "img", 2).iterdir())
    found = {}
    for name in ("fp32", "bf16"):
        pcfg = dataclasses.replace(cfg, precision=name)
        worker = ProposalWorker(None, pcfg, tmp_path, device="cpu", backbone=net, fingerprint="x")
        found[name] = _masks(worker, items)
        found[name + " scores"] = worker.scores
    total = sum(len(m) for m in found["fp32"])
    assert total > 0
    a, b = found["fp32 scores"], found["bf16 scores"]  # bf16 did run: the scores moved, a little
    assert len(a) != len(b) or not np.array_equal(a, b)
    for a, b in zip(found["fp32"], found["bf16"]):
        assert abs(len(a) - len(b)) <= 1
        ious = [_best_iou(m.astype(bool), b.astype(bool)) for m in a]
        assert min(ious, default=1.0) >= 0.9, ious


def test_bf16_on_a_cpu_without_it_is_one_line(monkeypatch):
    monkeypatch.setattr(precision_mod, "cpu_has_native_bf16", lambda: False)
    with pytest.raises(UserError) as e:
        check_precision("bf16", "cpu", "proposals.precision")
    assert "proposals.precision" in str(e.value) and "\n" not in str(e.value)
    with pytest.raises(UserError, match="CUDA"):
        check_precision("fp16", "cpu", "finetune.precision")
    assert check_precision("fp32", "cpu", "x") == "fp32"


def test_old_amp_key_keeps_its_meaning():
    """amp meant bf16 autocast on CUDA only: fp32 on a CPU, bf16 on CUDA; precision wins."""
    assert effective_precision("fp32", True, "cpu") == "fp32"
    assert effective_precision("fp32", True, "cuda") == "bf16"
    assert effective_precision("fp32", "fp16", "cuda") == "fp16"
    assert effective_precision("bf16", False, "cpu") == "bf16"


def test_fp32_shards_keep_their_fingerprint_and_bf16_changes_it():
    cfg = ProposalConfig()
    assert compute_fingerprint("resnet50", "w", cfg) == compute_fingerprint(
        "resnet50", "w", dataclasses.replace(cfg, precision="fp32")
    )
    before = compute_fingerprint("resnet50", "w", cfg)
    assert (
        compute_fingerprint("resnet50", "w", dataclasses.replace(cfg, precision="bf16")) != before
    )


def test_feature_cache_keeps_precisions_apart(tmp_path):
    fp32 = FeatureStore(tmp_path, "a" * 64)
    bf16 = FeatureStore(tmp_path, "a" * 64, "bf16")
    assert fp32.folder != bf16.folder
    info = {"content": "c", "image_size": (4, 4)}
    fp32.put(info, [torch.ones(1, 2, 2, 2)])
    assert bf16.get(info) is None  # never served across precisions
    # A folder whose marker records another precision is refused, not mixed.
    marker = bf16.folder / "backbone.json"
    marker.write_text(json.dumps({"fingerprint": "a" * 64, "format": 2, "precision": "fp32"}))
    with pytest.raises(UserError, match="fp32 levels"):
        FeatureStore(tmp_path, "a" * 64, "bf16")


def test_resume_with_another_precision_is_a_meaning_change():
    then = {"pretrain": {"iters": 10}, "model": {}}  # recorded before precision existed
    same = {"pretrain": {"iters": 10, "precision": "fp32"}, "model": {}}
    other = {"pretrain": {"iters": 10, "precision": "bf16"}, "model": {}}
    assert meaning_changes("pretrain", then, same) == []
    assert meaning_changes("pretrain", then, other) == ["pretrain.precision ('fp32' -> 'bf16')"]
    assert with_later_defaults({"finetune": {}})["finetune"]["precision"] == "fp32"


def test_pretrain_refuses_bf16_without_native_support(tmp_path, monkeypatch):
    monkeypatch.setattr(precision_mod, "cpu_has_native_bf16", lambda: False)
    from tests.trainer import tiny_project

    toml = tiny_project.write_project(tmp_path)
    from tests.trainer.helpers import run_cli

    code, _, err = run_cli(
        "pretrain",
        "--config",
        str(toml),
        *tiny_project.sets("pretrain.precision=bf16"),
        "--out",
        str(tmp_path / "pt"),
        "--iters",
        "1",
    )
    assert code == 2 and "pretrain.precision" in err
    assert not (tmp_path / "pt" / "checkpoints").exists()


def test_auto_is_resolved_when_the_config_is_loaded(tmp_path, monkeypatch):
    """ "auto" never reaches a run: the loaded config holds bf16 or fp32, as the CPU allows, so a
    run's config.toml and the shards' fingerprint record what ran."""
    from pipeline.config import load_pipeline_config
    from trainer.config import load_config

    toml = tmp_path / "c.toml"
    toml.write_text('[proposals]\nprecision = "auto"\n[finetune]\nprecision = "auto"\n')
    for native, expected in ((True, "bf16"), (False, "fp32")):
        monkeypatch.setattr(precision_mod, "cpu_has_native_bf16", lambda n=native: n)
        monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
        assert load_pipeline_config(toml)[0].proposals.precision == expected
        assert load_config(toml).finetune.precision == expected
