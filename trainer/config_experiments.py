"""The config sections of the experiments: the Mask R-CNN reference's optimiser recipe
(``[maskrcnn]``), ``compare`` and ``study`` (``[compare]``), and ``efficiency``
(``[efficiency]``)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

from pipeline.ranges import (
    AT_LEAST_ONE,
    FRACTION,
    NON_NEGATIVE,
    POSITIVE,
    POSITIVE_FRACTION,
    SEED,
    OneOf,
    Range,
)


@dataclass
class MaskRCNNConfig:
    """The Mask R-CNN reference's optimiser (model.kind = "maskrcnn"): it replaces finetune's lr,
    weight decay, warm-up, steps and clipping; the budget (iters, batch, sizes, split, evaluation)
    stays finetune's. Defaults: torchvision's reference recipe (SGD, momentum 0.9, weight decay
    1e-4, lr 0.02 at batch 16 scaled linearly, 1,000 warm-up iterations at 0.001, x0.1 steps,
    no clipping); a config scales it to its batch and budget."""

    RANGES: ClassVar[dict[str, Range | OneOf]] = {
        "optimizer": OneOf(("sgd", "adamw")),
        "lr": POSITIVE,
        "momentum": FRACTION,
        "weight_decay": NON_NEGATIVE,
        "clip_grad": NON_NEGATIVE,
        "warmup_iters": NON_NEGATIVE,
        "warmup_ratio": FRACTION,
        "lr_steps": AT_LEAST_ONE,
        "lr_gamma": POSITIVE,
        "backbone_lr_mult": NON_NEGATIVE,
    }

    optimizer: str = "sgd"  # "sgd" (torchvision's) or "adamw" (ViTDet's)
    lr: float = 0.01  # 0.02 x 8 / 16: finetune.batch_size 8
    momentum: float = 0.9  # SGD only
    weight_decay: float = 1e-4
    clip_grad: float = 0.0  # 0: none, as torchvision
    warmup_iters: int = 1000
    warmup_ratio: float = 0.001
    lr_steps: list[int] = field(default_factory=lambda: [6653, 8132])  # finetune's
    lr_gamma: float = 0.1
    backbone_lr_mult: float = 1.0  # torchvision trains its backbone at the heads' rate


@dataclass
class CompareConfig:
    """``compare`` and ``study`` (trainer/experiments/compare.py, trainer/experiments/study.py):
    what is repeated."""

    RANGES: ClassVar[dict[str, Range | OneOf]] = {"seeds": SEED, "pretrain_seeds": SEED}

    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])  # fine-tuning seeds (finetune.seed)
    pretrain_seeds: list[int] = field(default_factory=lambda: [0])  # study: pretrain.seed values
    variants: list[str] = (
        field(  # study: pre-training variants (trainer/experiments/study.py VARIANTS)
            default_factory=lambda: ["full", "no_prompts", "no_ks", "neither"]
        )
    )


@dataclass
class EfficiencyConfig:
    """``efficiency`` (trainer/experiments/efficiency.py): the labelled fractions of the
    label-efficiency
    curve and each one's fine-tuning budget (the same for every init at a fraction)."""

    RANGES: ClassVar[dict[str, Range | OneOf]] = {"fracs": POSITIVE_FRACTION, "iters": AT_LEAST_ONE}

    def cross_checks(self) -> list[str]:
        problems = []
        if not self.fracs or any(a >= b for a, b in zip(self.fracs, self.fracs[1:])):
            problems.append(f"fracs must be increasing and not empty, got {self.fracs}")
        if self.iters and len(self.iters) != len(self.fracs):
            problems.append(
                f"iters must hold one budget per fraction ({len(self.fracs)}) or be empty, "
                f"got {self.iters}"
            )
        return problems

    fracs: list[float] = field(default_factory=lambda: [0.025, 0.05, 0.1, 0.2])
    iters: list[int] = field(default_factory=list)  # per fraction; empty = finetune.iters for all
