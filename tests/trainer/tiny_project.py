"""A tiny project folder for the compare and study tests: COCO train/val sets, proposal shards
from the same (seeded random) ResNet-50, a config, and the ``--set`` list that makes every stage
take seconds on a CPU."""

from __future__ import annotations

from pathlib import Path

from tests.trainer.helpers import TINY_MODEL_SETTINGS, run_cli, write_tiny_coco
from tests.trainer.test_pretrain import make_shards

SIZE = 64
CATEGORY_IDS = (2, 7)

SETTINGS = [
    "backbone.kind=resnet50",
    "backbone.weights=random",
    *TINY_MODEL_SETTINGS,
    "pretrain.short_side=64",
    "pretrain.max_side=64",
    "pretrain.batch_size=2",
    "pretrain.warmup_iters=1",
    "pretrain.lr_steps=[]",
    "pretrain.log_every=1",
    "pretrain.eval_every=0",  # no pretext evaluation: these tests check the training records
    "pretrain.ckpt_every=2",
    "pretrain.num_workers=0",
    "finetune.batch_size=2",
    "finetune.short_side=64",
    "finetune.max_side=64",
    "finetune.num_workers=0",
    "finetune.log_every=1",
    "finetune.ckpt_every=2",
    "finetune.eval_every=1",
    "finetune.warmup_iters=1",
    "finetune.lr_steps=[]",
    "finetune.frozen_stages=-1",
    "finetune.lr=0.001",
]


def sets(*extra: str) -> list[str]:
    """``--set`` arguments for SETTINGS plus ``extra`` assignments."""
    return [arg for s in (*SETTINGS, *extra) for arg in ("--set", s)]


def write_project(root: Path, num_train: int = 8) -> Path:
    """Data (``num_train`` training images), shards and ``root/tiny.toml`` (pretrain.shards set);
    returns the config path."""
    data = root / "data"
    write_tiny_coco(
        data, "train", num_images=num_train, seed=0, size=SIZE, category_ids=CATEGORY_IDS
    )
    write_tiny_coco(data, "val", num_images=2, seed=1, size=SIZE, category_ids=CATEGORY_IDS)
    shards = make_shards(root / "unlabelled", backbone="resnet50", dim=2048)
    toml = root / "tiny.toml"
    toml.write_text(
        "[data]\n"
        f'train_images = "{data / "train"}"\n'
        f'train_json = "{data / "annotations" / "instances_train.json"}"\n'
        f'val_images = "{data / "val"}"\n'
        f'val_json = "{data / "annotations" / "instances_val.json"}"\n'
        "[pretrain]\n"
        f'shards = "{shards}"\n'
    )
    return toml


def pretrain(toml: Path, out: Path, iters: int, *extra: str) -> Path:
    """A real pre-training run of ``iters`` iterations; returns its last checkpoint."""
    code, _, err = run_cli(
        "pretrain", "--config", str(toml), *sets(*extra), "--out", str(out), "--iters", str(iters)
    )
    assert code == 0, err
    return out / "checkpoints" / "last.pt"
