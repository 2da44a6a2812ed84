"""Fine-tuning: init loading with the exact skipped keys, and a short end-to-end run.

The end-to-end tests use a tiny COCO set (helpers.write_tiny_coco: a few 64 x 64 images, two
categories with non-contiguous ids), a random-weight ResNet-50 and a tiny K-Net; the pre-training
checkpoint is written by the real engine from a class-agnostic objective with prompts and kernel
supervision.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from pipeline.backbones.build import build_backbone
from pipeline.cli import UserError
from pipeline.config import BackboneConfig
from tests.trainer.helpers import TINY_MODEL, TINY_MODEL_SETTINGS, run_cli, write_tiny_coco
from trainer.config import ModelConfig, load_config
from trainer.engine.checkpoint import load_checkpoint, save_checkpoint
from trainer.model.knet import KNet
from trainer.stages.finetune_init import load_init
from trainer.stages.finetune_setup import resolve, run_name

CATEGORY_IDS = (2, 7)  # write_tiny_coco's default: non-contiguous ids
SIZE = 64


@pytest.fixture(scope="module")
def backbone():
    torch.manual_seed(0)
    return build_backbone(BackboneConfig(kind="resnet50", weights="random"))


def test_load_init_skips_exactly_the_class_layers(tmp_path, backbone):
    torch.manual_seed(0)
    one = KNet(backbone, TINY_MODEL, num_classes=1)
    path = tmp_path / "pre.pt"
    save_checkpoint(path, {"model": one.state_dict()})
    three = KNet(backbone, TINY_MODEL, num_classes=3)
    skipped = load_init(three, path)
    class_keys = sorted(k for k in three.state_dict() if k.startswith(KNet.CLASS_LAYER_PREFIXES))
    # semantic conv (weight, bias) + one class head (weight, bias) per update stage.
    assert len(class_keys) == 2 + 2 * TINY_MODEL.num_stages
    assert skipped == class_keys
    for name, value in three.state_dict().items():
        if name not in skipped:
            torch.testing.assert_close(value, one.state_dict()[name], rtol=0, atol=0)
    # Same class count: nothing skipped.
    assert load_init(KNet(backbone, TINY_MODEL, num_classes=1), path) == []
    # Anything but a class layer that does not fit is an error naming it.
    extra = dict(one.state_dict())
    extra["stages.0.surprise"] = torch.zeros(3)
    save_checkpoint(tmp_path / "extra.pt", {"model": extra})
    with pytest.raises(UserError, match="unexpected: stages.0.surprise"):
        load_init(three, tmp_path / "extra.pt")
    missing = {k: v for k, v in one.state_dict().items() if not k.startswith("neck.")}
    save_checkpoint(tmp_path / "missing.pt", {"model": missing})
    with pytest.raises(UserError, match="missing: neck."):
        load_init(three, tmp_path / "missing.pt")
    wider = KNet(backbone, ModelConfig(**{**vars(TINY_MODEL), "ffn_dim": 48}), num_classes=1)
    save_checkpoint(tmp_path / "wider.pt", {"model": wider.state_dict()})
    with pytest.raises(UserError, match="shape-mismatched"):
        load_init(three, tmp_path / "wider.pt")


def test_resolve_names_and_defaults(tmp_path):
    toml = tmp_path / "tiny.toml"
    toml.write_text("[finetune]\nfrac = 0.1\n")
    cfg = load_config(toml)
    r = resolve(cfg, tag="sp")
    assert r.finetune.out == str(Path("runs/tiny") / "finetune-0.1-sp")
    assert r.finetune.init == str(Path("runs/tiny/pretrain/checkpoints/last.pt"))
    assert cfg.finetune.out == ""  # the input config is left alone
    r = resolve(cfg, frac=0.05, init="None", iters=7)
    assert r.finetune.out == str(Path("runs/tiny/finetune-0.05")) and r.finetune.init == "none"
    assert r.finetune.iters == 7 and run_name(0.05, "baseline") == "finetune-0.05-baseline"
    with pytest.raises(UserError, match="frac"):
        resolve(cfg, frac=1.5)
    with pytest.raises(UserError, match="iters"):
        resolve(cfg, iters=0)


# --------------------------------------------------------------------------------------------
# End to end


def _write_pretrain_checkpoint(cfg, out_dir: Path) -> Path:
    """A real stage-two checkpoint: class-agnostic objective with prompts and kernel supervision,
    one engine iteration on a hand-made batch with seeds."""
    from trainer.engine.loop import train
    from trainer.engine.optim import build_optimizer, build_scheduler
    from trainer.engine.schedule import Schedule
    from trainer.model.objective import build_objective

    torch.manual_seed(1)
    backbone = build_backbone(cfg.backbone)
    objective = build_objective(
        backbone, cfg.model, num_classes=1, prompts=True, kernel_supervision=True
    )
    images = torch.randn(2, 3, SIZE, SIZE)
    targets = []
    for _ in range(2):
        masks = torch.zeros(2, SIZE, SIZE)
        masks[0, 8:40, 8:30] = 1
        masks[1, 30:60, 20:50] = 1
        boxes = torch.tensor([[8.0, 8, 30, 40], [20.0, 30, 50, 60]])
        targets.append(
            {
                "masks": masks,
                "boxes": boxes,
                "labels": torch.zeros(2, dtype=torch.long),
                "seeds": torch.nn.functional.normalize(torch.randn(2, 2048), dim=1),
            }
        )
    optimizer = build_optimizer(objective, 1e-4, 0.05)
    scheduler = build_scheduler(optimizer, 0, 0.001, [], 0.1)
    train(
        objective,
        [(images, targets)],
        optimizer,
        scheduler,
        Schedule(iters=1, clip_grad=1.0, amp=False, log_every=1, ckpt_every=1),
        out_dir=out_dir,
        device="cpu",
        resume=False,
        config={"name": "pretrain-test"},
    )
    return out_dir / "checkpoints" / "last.pt"


TINY_SETTINGS = [
    "backbone.kind=resnet50",
    "backbone.weights=random",
    *TINY_MODEL_SETTINGS,
    "finetune.batch_size=2",
    "finetune.short_side=64",
    "finetune.max_side=64",
    "finetune.num_workers=0",
    "finetune.log_every=1",
    "finetune.ckpt_every=2",
    "finetune.eval_every=2",
    "finetune.warmup_iters=1",
    "finetune.lr_steps=[]",
    "finetune.rotate_prob=1.0",
]


@pytest.fixture
def tiny_project(tmp_path, monkeypatch):
    """A project folder with a tiny COCO set, a config and a pre-training checkpoint."""
    monkeypatch.chdir(tmp_path)
    data = tmp_path / "data"
    write_tiny_coco(data, "train", num_images=8, seed=0, size=SIZE, category_ids=CATEGORY_IDS)
    write_tiny_coco(data, "val", num_images=3, seed=1, size=SIZE, category_ids=CATEGORY_IDS)
    toml = tmp_path / "tiny.toml"
    toml.write_text(
        "[data]\n"
        f'train_images = "{data / "train"}"\n'
        f'train_json = "{data / "annotations" / "instances_train.json"}"\n'
        f'val_images = "{data / "val"}"\n'
        f'val_json = "{data / "annotations" / "instances_val.json"}"\n'
    )
    cfg = load_config(toml, [f"{s}" for s in TINY_SETTINGS])
    ckpt = _write_pretrain_checkpoint(cfg, tmp_path / "runs" / "tiny" / "pretrain")
    return toml, ckpt


def _sets() -> list[str]:
    return [arg for s in TINY_SETTINGS for arg in ("--set", s)]


def _finetune(toml: Path, iters: int, *extra: str, sets: list[str] | None = None):
    """``trainer finetune`` on half of the tiny training set; returns run_cli's (code, out, err)."""
    sets = _sets() if sets is None else sets
    return run_cli(
        "finetune", "--config", str(toml), *sets, "--frac", "0.5", "--iters", str(iters), *extra
    )


def test_finetune_and_evaluate_end_to_end(tiny_project, monkeypatch):
    toml, ckpt = tiny_project
    code, out, err = _finetune(toml, 3)
    assert code == 0, err
    run = Path("runs/tiny/finetune-0.5")
    # Split: 4 of the 8 training images, all their annotations.
    split = json.loads((run / "split.json").read_text())
    assert len(split["images"]) == 4
    train = json.loads(Path("data/annotations/instances_train.json").read_text())
    chosen = {im["id"] for im in split["images"]}
    assert split["annotations"] == [a for a in train["annotations"] if a["image_id"] in chosen]
    # Init from the default pre-training checkpoint, skipping exactly the class layers.
    assert f"initialised from {ckpt.relative_to(Path.cwd())}" in err
    skipped = (
        "class_heads.0.bias, class_heads.0.weight, class_heads.1.bias, "
        "class_heads.1.weight, kernel_head.semantic_conv.bias, "
        "kernel_head.semantic_conv.weight"
    )
    assert f"skipped 6 tensors (class layers): {skipped}" in err
    assert "backbone identical to backbone.weights" in err  # random init is seeded
    # AP recorded at iterations 2 and 3 (eval_every=2, and at the end).
    curve = json.loads((run / "ap_curve.json").read_text())
    assert [r["iteration"] for r in curve] == [2, 3]
    assert all(0.0 <= r["AP"] <= 1.0 and r["images"] == 3 for r in curve)
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["final"]["iteration"] == 3 and metrics["iterations"] == 3
    assert metrics["best"]["AP"] == max(r["AP"] for r in curve)
    assert metrics["skipped"] == skipped.split(", ") and metrics["num_classes"] == 2
    assert metrics["train_seconds"] > 0
    assert (run / "checkpoints" / "last.pt").is_file() and (run / "config.toml").is_file()
    assert "| finetune-0.5 (final) |" in out
    state = load_checkpoint(run / "checkpoints" / "last.pt")
    assert state["num_classes"] == 2 and state["config"]["finetune"]["frac"] == 0.5

    # The evaluate command on that checkpoint reproduces the final evaluation.
    code, out, err = run_cli(
        "evaluate", "--checkpoint", str(run / "checkpoints" / "last.pt"), "--out", "eval.json"
    )
    assert code == 0, err
    report = json.loads(Path("eval.json").read_text())
    for key in ("AP", "AP50", "AP75"):
        assert report["metrics"][key] == pytest.approx(metrics["final"][key], abs=1e-9)
    detections = json.loads(Path("eval-segm.json").read_text())
    assert {d["category_id"] for d in detections} <= set(CATEGORY_IDS)
    assert len(detections) == report["metrics"]["detections"]
    # Class-agnostic: the same detections scored with useCats=0, to its own default file.
    code, _, err = run_cli(
        "evaluate", "--checkpoint", str(run / "checkpoints" / "last.pt"), "--class-agnostic"
    )
    assert code == 0, err
    agnostic = json.loads((run / "eval-last-agnostic.json").read_text())
    assert agnostic["class_agnostic"] is True
    assert agnostic["metrics"]["detections"] == report["metrics"]["detections"]
    assert json.loads((run / "eval-last-agnostic-segm.json").read_text()) == detections

    # Without --resume an existing run is refused; with it a finished run is only re-read.
    code, _, err = _finetune(toml, 3)
    assert code == 2 and "--resume" in err
    # The resume reads the run's checkpoint twice: once for the checks, once for the engine.
    reads = []
    real_load = torch.load
    folder = (run / "checkpoints").resolve()

    def counting_load(f, *args, **kwargs):
        if isinstance(f, (str, Path)) and Path(f).resolve().parent == folder:
            reads.append(Path(f).name)
        return real_load(f, *args, **kwargs)

    monkeypatch.setattr(torch, "load", counting_load)
    code, _, err = _finetune(toml, 3, "--resume")
    assert code == 0, err
    assert reads == ["last.pt", "last.pt"]
    again = json.loads((run / "metrics.json").read_text())
    assert again["final"] == metrics["final"]


def test_finetune_bad_init_is_a_clear_error(tiny_project, tmp_path):
    toml, _ = tiny_project
    code, _, err = _finetune(toml, 1, "--init", str(tmp_path / "nope.pt"))
    assert code == 2 and "checkpoint not found" in err
