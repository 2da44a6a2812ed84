"""The Mask R-CNN reference (``model.kind = "maskrcnn"``): torchvision's model on the project's
levels at their true strides, fine-tuned and evaluated through the same commands (its AP is
pycocotools' own score of its detections), refused by pretrain and kernels, and added to compare
as a reference row. A random-weight ViT-S/14 at 56 px or a random ResNet-50 at 64 px."""

from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path

import pytest
import torch
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from pipeline.backbones.build import build_backbone
from pipeline.config import BackboneConfig
from tests.trainer.helpers import TINY_MODEL, run_cli, train_records
from tests.trainer.test_mask2former_commands import labelled_sets
from tests.trainer.test_pretrain import TINY, make_shards
from trainer.config import load_config
from trainer.model.factory import build_model
from trainer.model.maskrcnn import MaskRCNNReference

ROOT = Path(__file__).resolve().parents[2]
DEMO = str(ROOT / "configs" / "demo.toml")
FINETUNE = [
    "model.kind=maskrcnn",
    "model.roi_samples=32",
    "finetune.batch_size=2",
    "finetune.short_side=56",
    "finetune.max_side=56",
    "finetune.num_workers=0",
    "finetune.log_every=1",
    "finetune.ckpt_every=2",
    "finetune.eval_every=2",
    "finetune.frozen_stages=-1",
    "maskrcnn.warmup_iters=1",
    "maskrcnn.lr_steps=[]",
    "maskrcnn.lr=0.003",
]
TORCHVISION_LOSSES = {
    "loss_objectness",
    "loss_rpn_box_reg",
    "loss_classifier",
    "loss_box_reg",
    "loss_mask",
}


def _sets(*groups: list[str]) -> list[str]:
    return [arg for group in groups for s in group for arg in ("--set", s)]


def _vit_model() -> MaskRCNNReference:
    torch.manual_seed(0)
    backbone = build_backbone(BackboneConfig(kind="dinov2_vits14", weights="random"))
    cfg = load_config(DEMO).model
    cfg.kind, cfg.channels = "maskrcnn", TINY_MODEL.channels
    return build_model(cfg, backbone, num_classes=2)


def test_levels_at_their_true_strides():
    """A /14 ViT's levels sit at strides 3.5, 7, 14, 28 (+ P6 at 56): anchors step by them and
    RoIAlign samples at 1 / stride, where torchvision alone would infer 3 and 1/4."""
    model = _vit_model()
    assert model.strides == (3.5, 7.0, 14.0, 28.0) and model.size_divisor == 28
    anchors = model.detector.rpn.anchor_generator
    assert anchors.level_strides == (3.5, 7.0, 14.0, 28.0, 56.0)
    assert [s[0] for s in anchors.sizes] == [28.0, 56.0, 112.0, 224.0, 448.0]
    images = torch.zeros(1, 3, 56, 84)
    feats = list(model.detector.backbone(model._levels(images)).values())
    assert [tuple(f.shape[-2:]) for f in feats] == [(16, 24), (8, 12), (4, 6), (2, 3), (1, 2)]
    from torchvision.models.detection.image_list import ImageList

    boxes = anchors(ImageList(images, [(56, 84)]), feats)[0]
    level0 = boxes[: 16 * 24 * 3].view(16, 24, 3, 4)
    centre_x = (level0[0, :, 1, 0] + level0[0, :, 1, 2]) / 2
    assert torch.allclose(centre_x, torch.arange(24) * 3.5)
    pooler = model.detector.roi_heads.box_roi_pool
    assert pooler.scales == [1 / 3.5, 1 / 7, 1 / 14, 1 / 28]
    # FPN level k = round(log2 stride) = 2..5: a 224-px box goes to stride 14 (level 4).
    level = pooler.map_levels([torch.tensor([[0.0, 0.0, 224.0, 224.0]])])
    assert level.tolist() == [2]


def test_training_step_gives_torchvision_losses():
    model = _vit_model()
    model.backbone.freeze(-1)
    model.train()
    masks = torch.zeros(1, 56, 56)
    masks[0, 10:40, 8:30] = 1
    targets = [
        {"masks": masks, "boxes": torch.tensor([[8.0, 10, 30, 40]]), "labels": torch.tensor([1])}
    ]
    losses = model(torch.randn(1, 3, 56, 56), targets)
    assert set(losses) == TORCHVISION_LOSSES
    sum(losses.values()).backward()
    assert all(p.grad is None for p in model.backbone.parameters())
    assert model.detector.roi_heads.mask_predictor.mask_fcn_logits.weight.grad.abs().sum() > 0


def test_finetune_evaluate_and_refusals(tmp_path, monkeypatch):
    """finetune (frozen ViT, feature cache on) and evaluate take Mask R-CNN like any kind; the
    reported AP is pycocotools' own score of the detections evaluate wrote."""
    monkeypatch.chdir(tmp_path)
    args = ("--config", DEMO, *_sets(TINY, FINETUNE, labelled_sets(tmp_path)))
    code, _, err = run_cli(
        "finetune", *args, "--frac", "1.0", "--iters", "2", "--init", "none", "--out", "ft"
    )
    assert code == 0, err
    assert set(train_records(Path("ft"))[0]) >= TORCHVISION_LOSSES | {"lr"}
    assert train_records(Path("ft"))[0]["lr"] == pytest.approx(
        0.003
    )  # [maskrcnn]'s, not finetune's
    metrics = json.loads(Path("ft/metrics.json").read_text())
    assert metrics["num_classes"] == 2 and 0.0 <= metrics["final"]["AP"] <= 1.0
    assert any(Path("feature-cache").rglob("*.npz"))  # levels came from the cache (beside ft)

    ckpt = "ft/checkpoints/last.pt"
    code, _, err = run_cli("evaluate", "--checkpoint", ckpt, "--out", "eval.json")
    assert code == 0, err
    report = json.loads(Path("eval.json").read_text())["metrics"]
    assert report["AP"] == pytest.approx(metrics["final"]["AP"], abs=1e-9)
    detections = json.loads(Path("eval-segm.json").read_text())
    assert detections and report["detections"] == len(detections)
    with contextlib.redirect_stdout(io.StringIO()):
        gt = COCO(str(tmp_path / "data" / "annotations" / "instances_val.json"))
        ev = COCOeval(gt, gt.loadRes(detections), iouType="segm")
        ev.evaluate(), ev.accumulate(), ev.summarize()
    assert report["AP"] == pytest.approx(float(ev.stats[0]), abs=1e-12)
    assert report["AP50"] == pytest.approx(float(ev.stats[1]), abs=1e-12)

    code, _, err = run_cli("kernels", "--checkpoint", ckpt, "--out", "k")
    assert code == 2 and len(err.strip().splitlines()) == 1 and "no kernels" in err


def test_pretrain_refuses_maskrcnn(tmp_path):
    shards = make_shards(tmp_path)
    code, _, err = run_cli(
        "pretrain",
        "--config",
        DEMO,
        "--shards",
        str(shards),
        "--out",
        str(tmp_path / "p"),
        *_sets(TINY, ["model.kind=maskrcnn"]),
    )
    assert code == 2
    assert len(err.strip().splitlines()) == 1 and "query-based models" in err
    assert not (tmp_path / "p").exists()


def test_compare_reference_row(tmp_path, monkeypatch):
    """compare --reference maskrcnn: a third row, one run per seed, same split and budget."""
    from tests.trainer.tiny_project import pretrain, sets, write_project

    monkeypatch.chdir(tmp_path)
    toml = write_project(tmp_path)
    ckpt = pretrain(toml, tmp_path / "pre", 2)
    common = ("--config", str(toml), *sets("maskrcnn.warmup_iters=1", "maskrcnn.lr_steps=[]"))
    code, out, err = run_cli(
        "compare", *common, "--frac", "0.5", "--seeds", "0,1", "--iters", "1",
        "--pretrained", str(ckpt), "--reference", "maskrcnn", "--out", "c",
    )  # fmt: skip
    assert code == 0, err
    results = json.loads(Path("c/results.json").read_text())
    refs = [r for r in results["runs"] if r["row"] == "maskrcnn"]
    assert sorted(r["seed"] for r in refs) == [0, 1]
    assert all(r["init"] == "none" and r["iterations"] == 1 for r in refs)
    assert all(0.0 <= r["final"]["AP"] <= 1.0 for r in refs)
    assert load_config(Path(refs[0]["out"]) / "config.toml").model.kind == "maskrcnn"
    assert results["summary"]["maskrcnn"]["n"] == 2
    assert set(results["summary"]) == {"sp", "baseline", "maskrcnn"}
    md = Path("c/results.md").read_text()
    assert "Mask R-CNN reference" in md and "Mask R-CNN reference" in out
    assert Path("c/ap_vs_iter.png").is_file()

    code, _, err = run_cli("compare", *common, "--reference", "yolo", "--out", "c2")
    assert code == 2 and "unknown --reference 'yolo'" in err


def test_maskrcnn_section_only_binds_maskrcnn_runs(tmp_path):
    """A run folder recorded before [maskrcnn] existed (or under other [maskrcnn] values) is the
    same K-Net run; a Mask R-CNN run made with another [maskrcnn] recipe is not."""
    import dataclasses
    import tomllib

    from pipeline.cli import UserError
    from pipeline.config import dump_toml
    from trainer.experiments.compare import reference_config
    from trainer.experiments.runs import check_same_settings

    cfg = load_config(DEMO)
    cfg.finetune.out = str(tmp_path)
    recorded = tomllib.loads(dump_toml(dataclasses.asdict(cfg)))
    del recorded["maskrcnn"]
    (tmp_path / "config.toml").write_text(dump_toml(recorded))
    check_same_settings(cfg)  # no error: K-Net does not read [maskrcnn]

    mrcnn = reference_config(cfg, "maskrcnn")
    (tmp_path / "config.toml").write_text(dump_toml(dataclasses.asdict(mrcnn)))
    check_same_settings(mrcnn)
    mrcnn.maskrcnn.lr = 0.02
    with pytest.raises(UserError, match="maskrcnn.lr"):
        check_same_settings(mrcnn)
