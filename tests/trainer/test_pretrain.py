"""``python -m trainer pretrain`` on hand-made shards: a short real run, resume, shard checks."""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path
from types import SimpleNamespace

import cv2
import numpy as np
import pytest
import torch
from torch import nn

from pipeline.backbones.backbone import weights_fingerprint
from pipeline.backbones.build import build_backbone
from pipeline.cli import UserError
from pipeline.config import BackboneConfig
from pipeline.shards.plan import compute_fingerprint, is_batch_invariant, result_settings
from pipeline.shards.schema import STATUS_EMPTY, STATUS_OK, ImageRecord, shard_name, write_shard
from tests.trainer.helpers import TINY_MODEL_SETTINGS, run_cli, shard_rles, train_records
from trainer.config import load_config
from trainer.engine.checkpoint import load_checkpoint, load_matching, model_state
from trainer.engine.metrics_log import read_metrics
from trainer.stages.pretrain_shards import check_shards

ROOT = Path(__file__).resolve().parents[2]
VIT_DIM = 384
TINY = [
    "backbone.kind=dinov2_vits14",
    "backbone.weights=random",
    *TINY_MODEL_SETTINGS,
    "pretrain.short_side=56",
    "pretrain.max_side=84",
    "pretrain.batch_size=2",
    "pretrain.warmup_iters=2",
    "pretrain.lr_steps=[3]",
    "pretrain.log_every=1",
    "pretrain.eval_every=0",  # no pretext evaluation: these tests check the training records
    "pretrain.ckpt_every=2",
    "pretrain.num_workers=1",
    "pretrain.flip=0.5",
]


def make_shards(
    folder: Path,
    backbone: str = "dinov2_vits14",
    dim: int = VIT_DIM,
    fingerprint: str | None = None,
) -> Path:
    """Two shards of 3 images each (one empty), bright rectangles as pseudo masks.

    By default they carry the fingerprint that the (seeded) random backbone and the demo config's
    proposal settings give, so pretrain's weight check accepts them."""
    made_with = load_config(ROOT / "configs" / "demo.toml").proposals
    if fingerprint is None:
        net = build_backbone(BackboneConfig(kind=backbone, weights="random"))
        fingerprint = compute_fingerprint(backbone, weights_fingerprint(net), made_with)
    rng = np.random.default_rng(0)
    images = folder / "images"
    images.mkdir(parents=True)
    for s in range(2):
        records = []
        for i in range(3):
            h, w = 48 + 8 * i, 64
            image = rng.integers(0, 60, (h, w, 3), dtype=np.uint8)
            k = 0 if i == 2 else 1 + (i + s) % 2
            masks = np.zeros((k, h, w), np.uint8)
            for j in range(k):
                y0, x0 = rng.integers(0, h // 2), rng.integers(0, w // 2)
                masks[j, y0 : y0 + h // 3, x0 : x0 + w // 3] = 1
                image[masks[j] > 0] = rng.integers(120, 255, 3)
            name = f"s{s}_{i}.png"
            cv2.imwrite(str(images / name), image[..., ::-1])
            seeds = rng.standard_normal((k, dim))
            seeds /= np.linalg.norm(seeds, axis=1, keepdims=True)
            records.append(
                ImageRecord(
                    name,
                    10 * s + i,
                    h,
                    w,
                    STATUS_OK if k else STATUS_EMPTY,
                    "",
                    shard_rles(masks),
                    np.zeros((k, 4), np.float32),
                    np.ones(k, np.float32),
                    seeds.astype(np.float16),
                    np.zeros((k, 3), np.int16),
                )
            )
        meta = {
            "fingerprint": fingerprint,
            "backbone": backbone,
            "feature_stride": 14,
            "embed_dim": dim,
            # as the worker writes them: a ResNet's batch_size is a result setting, the ViT's not
            "settings": json.dumps(
                result_settings(made_with, is_batch_invariant(backbone)), sort_keys=True
            ),
        }
        write_shard(folder / "proposals" / shard_name(s), records, meta)
    (folder / "proposals" / "config.toml").write_text(f'[proposals]\nimages = "{images}"\n')
    return folder / "proposals"


def _args(shards: Path, out: Path, iters: int, *extra: str) -> list[str]:
    sets = [a for s in TINY for a in ("--set", s)]
    return [
        "pretrain",
        "--config",
        str(ROOT / "configs" / "demo.toml"),
        "--shards",
        str(shards),
        "--out",
        str(out),
        "--iters",
        str(iters),
        *sets,
        *extra,
    ]


def test_short_pretrain_run_from_shards_and_resume(tmp_path):
    shards = make_shards(tmp_path)
    out = tmp_path / "pretrain"
    code, stdout, stderr = run_cli(*_args(shards, out, 3))
    assert code == 0, stderr
    assert "4 images from 2 shards" in stderr and "data-wait share" in stdout
    records = train_records(out)
    assert [r["iter"] for r in records] == [1, 2, 3]
    for r in records:
        losses = {k: v for k, v in r.items() if k.startswith("loss")}
        assert any(k.endswith("kernel") for k in losses)  # kernel supervision is on
        assert "stat_prompt_cos" in r  # prompts are on
        assert all(math.isfinite(v) for v in losses.values())
    ckpts = sorted(p.name for p in (out / "checkpoints").iterdir())
    assert ckpts == ["iter_0000002.pt", "iter_0000003.pt", "last.pt"]
    assert (out / "loss_curves.png").is_file() and (out / "config.toml").is_file()
    recorded = load_config(out / "config.toml")
    assert recorded.pretrain.iters == 3 and recorded.model.channels == 16

    # The checkpoint's "model" is a K-Net state dict without the frozen backbone (recorded by
    # its fingerprint); completed from the config's backbone it loads into a fresh K-Net.
    from pipeline.backbones.build import build_backbone
    from trainer.model.knet import KNet

    state = load_checkpoint(out / "checkpoints" / "last.pt")
    assert state["iteration"] == 3 and state["num_classes"] == 1 and state["extras"]
    assert not any(k.startswith("backbone.") for k in state["model"])
    knet = KNet(build_backbone(recorded.backbone), recorded.model, num_classes=1)
    full = model_state(state, knet, "last.pt")
    assert load_matching(knet, full, allowed_skips=()) == []

    # Without --resume the finished run is left alone, its config.toml included.
    before = (out / "config.toml").read_text()
    code, _, stderr = run_cli(*_args(shards, out, 4, "--set", "pretrain.lr=1.0"))
    assert code == 2 and "--resume" in stderr
    assert (out / "config.toml").read_text() == before

    # Resume continues the same run: the first three records are kept as they were.
    code, _, stderr = run_cli(*_args(shards, out, 4, "--resume"))
    assert code == 0, stderr
    again = train_records(out)
    assert [r["iter"] for r in again] == [1, 2, 3, 4]
    assert again[:3] == records
    assert load_checkpoint(out / "checkpoints" / "last.pt")["iteration"] == 4
    # ... and computes exactly what an uninterrupted run computes (prompt dropping, flips and
    # the DataLoader worker included).
    code, _, stderr = run_cli(*_args(shards, tmp_path / "straight", 4))
    assert code == 0, stderr
    straight = read_metrics(tmp_path / "straight" / "metrics.jsonl")
    assert [r["loss"] for r in straight] == [r["loss"] for r in again]


def test_missing_or_mismatched_shards_are_one_line_errors(tmp_path):
    code, _, stderr = run_cli(*_args(tmp_path / "none", tmp_path / "out", 1))
    assert code == 2 and "no proposal shards" in stderr
    resnet = make_shards(tmp_path / "r", backbone="resnet50", dim=2048)
    code, _, stderr = run_cli(*_args(resnet, tmp_path / "out", 1))
    assert code == 2 and "made with backbone 'resnet50'" in stderr
    narrow = make_shards(tmp_path / "n", dim=8)
    code, _, stderr = run_cli(*_args(narrow, tmp_path / "out", 1))
    assert code == 2 and "8-d seeds" in stderr
    assert not (tmp_path / "out" / "checkpoints").exists()


def test_check_shards_verifies_backbone_weights(tmp_path):
    backbone = nn.Linear(3, 4)
    backbone.embed_dim = VIT_DIM
    backbone.batch_invariant = True
    cfg = load_config(ROOT / "configs" / "demo.toml")
    cfg.backbone.weights = "some/checkpoint.pth"
    made_with = dataclasses.replace(cfg.proposals, top_k=cfg.proposals.top_k + 1, workers=7)
    good = compute_fingerprint(cfg.backbone.kind, weights_fingerprint(backbone), made_with)
    meta = {
        "fingerprint": good,
        "backbone": cfg.backbone.kind,
        "embed_dim": VIT_DIM,
        "settings": json.dumps(result_settings(made_with), sort_keys=True),
    }
    dataset = SimpleNamespace(folder=tmp_path, metas=[meta, meta], meta=meta)
    notes = check_shards(dataset, backbone, cfg)
    assert len(notes) == 1 and "(top_k)" in notes[0]  # workers does not change results
    with torch.no_grad():
        backbone.weight.add_(1.0)  # other weights: the recomputed fingerprint differs
    with pytest.raises(UserError, match="other dinov2_vits14 weights"):
        check_shards(dataset, backbone, cfg)
    mixed = SimpleNamespace(folder=tmp_path, metas=[meta, {**meta, "fingerprint": "x"}], meta=meta)
    with pytest.raises(UserError, match="mixes shards"):
        check_shards(mixed, backbone, cfg)
