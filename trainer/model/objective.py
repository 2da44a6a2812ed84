"""What the engine trains: the model + criterion (+ prompt-kernel matching, + kernel supervision).

The model is K-Net or Mask2Former (``model.kind``, trainer/model/factory.py); for Mask2Former read
"query" for "kernel" and "decoder layer" for "update stage" below. One forward pass: the model
runs with prompt-kernel matching injected between the kernel head and the
update stages (when enabled), the set criterion matches and scores every stage, and kernel
supervision (when enabled) pulls each matched kernel K^i_n toward its mask's projected seed. The
returned dict holds weighted losses ("loss_*", summed by the engine) and detached scalars to log
("stat_*").
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn

from trainer.config import ModelConfig
from trainer.criterion.prompts import KernelSupervision, PromptKernelMatching
from trainer.model.factory import QUERY_KINDS, build_criterion, build_model, check_query_based

if TYPE_CHECKING:
    from pipeline.backbones.backbone import Backbone


class Objective(nn.Module):
    """Wraps a model with its training losses.

    Args:
        knet: the model, K-Net or Mask2Former (what checkpoints save as "model"; the attribute
            keeps its first name so that checkpoints and their readers stay as they were).
        criterion: the model's set criterion (``build_criterion``).
        prompt_matching: ``PromptKernelMatching`` or None (switched off).
        kernel_supervision: ``KernelSupervision`` or None (switched off); its Linear is a
            pre-training-only module (checkpoint "extras").
    """

    def __init__(
        self,
        knet: nn.Module,
        criterion: nn.Module,
        prompt_matching: PromptKernelMatching | None = None,
        kernel_supervision: KernelSupervision | None = None,
    ) -> None:
        super().__init__()
        self.knet = knet
        self.criterion = criterion
        self.prompt_matching = prompt_matching
        self.kernel_supervision = kernel_supervision

    def forward(self, images: Tensor, targets: list[dict[str, Tensor]]) -> dict[str, Tensor]:
        """images: (B, 3, H, W) padded to ``knet.size_divisor``; targets: per image "masks"
        (L, H, W), "boxes" (L, 4), "labels" (L,), and "seeds" (L, Cs) with kernel supervision.

        Returns "loss_*" weighted scalars and "stat_*" detached scalars: stat_num_targets (mean
        masks per image), and when enabled stat_prompt_cos, stat_prompt_drop,
        stat_prompt_distinct (prompts), stat_target_spread (kernel supervision) and the
        criterion's own (stat_dropped with DropLoss).
        """
        stats: dict[str, Tensor] = {}
        inject = None
        if self.prompt_matching is not None:
            matching = self.prompt_matching
            boxes = [t["boxes"] for t in targets]
            stride = self.knet.strides[-1]  # P5's stride, read from the model

            def inject(kernels: Tensor, pyramid: list[Tensor]) -> Tensor:
                out, prompt_stats = matching(kernels, pyramid[-1], boxes, stride)
                stats.update(prompt_stats)
                return out

        outputs = self.knet(images, inject)
        losses, assignments = self.criterion(outputs, targets)
        for name in [k for k in losses if k.startswith("stat_")]:
            stats[name[len("stat_") :]] = losses.pop(name)
        if self.kernel_supervision is not None:
            if any("seeds" not in t for t in targets):
                raise ValueError("kernel supervision needs targets with 'seeds'")
            sup_losses, sup_stats = self.kernel_supervision(
                [s["kernels"] for s in outputs["stages"]],
                assignments[1:],
                [t["seeds"] for t in targets],
            )
            losses.update(sup_losses)
            stats.update(sup_stats)
        stats["num_targets"] = torch.tensor(
            sum(len(t["masks"]) for t in targets) / max(len(targets), 1)
        )
        result = dict(losses)
        for name, value in stats.items():
            result[f"stat_{name}"] = value.detach().float().to(images.device)
        return result


class DetectorObjective(nn.Module):
    """A model that computes its own training losses (the Mask R-CNN reference): forward returns
    them, plus stat_num_targets. ``knet`` is the model (the name checkpoints read)."""

    def __init__(self, knet: nn.Module) -> None:
        super().__init__()
        self.knet = knet

    def forward(self, images: Tensor, targets: list[dict[str, Tensor]]) -> dict[str, Tensor]:
        result = dict(self.knet(images, targets))
        count = sum(len(t["masks"]) for t in targets) / max(len(targets), 1)
        result["stat_num_targets"] = torch.tensor(float(count), device=images.device)
        return result


def build_objective(
    backbone: Backbone,
    model_cfg: ModelConfig,
    num_classes: int,
    *,
    prompts: bool,
    kernel_supervision: bool,
    prompt_slots: int = 20,
    prompt_keep: float = 0.9,
    ks_target: str = "linear",
    ks_decorrelation: float = 0.0,
    drop_loss_iou: float = 0.0,
) -> Objective:
    """The ``model_cfg.kind`` model over ``backbone`` with its criterion; prompt matching and
    kernel supervision as switched (pre-training: both on by default; fine-tuning: both off),
    DropLoss at ``drop_loss_iou`` (0: off; pre-training's switch).
    A model without a set criterion (Mask R-CNN) trains on its own losses, with neither."""
    knet = build_model(model_cfg, backbone, num_classes)
    if model_cfg.kind not in QUERY_KINDS:
        if prompts or kernel_supervision:
            check_query_based(model_cfg, "Saliency Prompt (prompts, kernel supervision)")
        return DetectorObjective(knet)
    criterion = build_criterion(model_cfg, num_classes, drop_loss_iou)
    matching = PromptKernelMatching(prompt_slots, prompt_keep) if prompts else None
    supervision = (
        KernelSupervision(
            int(backbone.embed_dim),
            model_cfg.channels,
            target=ks_target,
            decorrelation=ks_decorrelation,
        )
        if kernel_supervision
        else None
    )
    return Objective(knet, criterion, matching, supervision)
