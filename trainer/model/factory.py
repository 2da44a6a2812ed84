"""The model is a choice, not a fork: ``model.kind`` picks K-Net, Mask2Former, QueryInst or the
Mask R-CNN reference, and its criterion.

Every query-based model takes the backbone, returns the output contract of docs/architecture.md
("init", "stages" with "masks", "logits", "kernels", and "pyramid"), exposes strides, mask_stride,
size_divisor, num_classes and num_kernels, and lists in ``CLASS_LAYER_PREFIXES`` the parameters
whose shape depends on the class count. Everything else (engine, prompts, kernel supervision,
checkpoints, evaluation) serves both through that contract. Mask R-CNN (trainer/model/maskrcnn.py)
shares the attributes, not the contract: it computes its own losses (no criterion, no prompts) and
decodes its own COCO results; fine-tuning, evaluation, compare and study take it like the others.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from torch import nn

from trainer.config import ModelConfig
from trainer.criterion.point_sampling import PointSampling

if TYPE_CHECKING:
    from pipeline.backbones.backbone import Backbone

MODEL_KINDS = ("knet", "mask2former", "maskrcnn", "queryinst")
# Kinds with object queries / kernels: the ones Saliency Prompt pre-trains and `kernels` draws.
QUERY_KINDS = ("knet", "mask2former", "queryinst")


def check_query_based(cfg: ModelConfig, what: str) -> None:
    """ValueError (one line) when ``what`` needs a query-based model and ``cfg.kind`` is not."""
    if cfg.kind not in QUERY_KINDS:
        raise ValueError(
            f"{what} is for query-based models ({', '.join(QUERY_KINDS)}), not "
            f"model.kind = '{cfg.kind}'"
        )


def _check_kind(cfg: ModelConfig) -> None:
    if cfg.kind not in MODEL_KINDS:
        raise ValueError(f"unknown model.kind '{cfg.kind}' (expected one of {MODEL_KINDS})")


def build_model(cfg: ModelConfig, backbone: Backbone, num_classes: int) -> nn.Module:
    """The ``cfg.kind`` model over ``backbone`` with ``num_classes`` classes."""
    _check_kind(cfg)
    if cfg.kind == "maskrcnn":
        from trainer.model.maskrcnn import MaskRCNNReference

        return MaskRCNNReference(backbone, cfg, num_classes)
    from trainer.model.knet import KNet
    from trainer.model.mask2former.model import Mask2Former
    from trainer.model.queryinst.model import QueryInst
    from trainer.model.scoring import set_inference

    model_class = {"mask2former": Mask2Former, "queryinst": QueryInst}.get(cfg.kind, KNet)
    model = model_class(backbone, cfg, num_classes)
    set_inference(model, cfg.kind, cfg.test_score, cfg.test_nms_iou)
    return model


def point_sampling(cfg: ModelConfig) -> PointSampling | None:
    """Point sampling for the mask costs and losses, or None for dense ones: ``model.mask_loss``
    "points" or "dense", or "auto" = the model's published choice (Mask2Former points, K-Net
    dense)."""
    use_points = cfg.mask_loss == "points" or (
        cfg.mask_loss == "auto" and cfg.kind == "mask2former"
    )
    if not use_points:
        return None
    return PointSampling(cfg.num_points, cfg.oversample, cfg.importance)


def build_criterion(cfg: ModelConfig, num_classes: int, drop_loss_iou: float = 0.0) -> nn.Module:
    """The ``cfg.kind`` model's set criterion: outputs, targets -> (losses, assignments), where
    assignments[0] belongs to the initial prediction and assignments[i] to stage / layer i.
    ``cfg.criterion_form`` picks the mask and Dice forms; drop_loss_iou > 0 switches on DropLoss
    (trainer/criterion/drop_loss.py; pre-training's ``drop_loss_iou``)."""
    _check_kind(cfg)
    check_query_based(cfg, "a set criterion (Mask R-CNN computes its own losses)")
    points = point_sampling(cfg)
    form = cfg.criterion_form
    if cfg.kind == "queryinst":  # box-matched, RoI masks: no mask cost, no point sampling
        from trainer.model.queryinst.criterion import QueryInstCriterion

        return QueryInstCriterion(num_classes, drop_loss_iou=drop_loss_iou)
    if cfg.kind == "mask2former":
        from trainer.model.mask2former.criterion import Mask2FormerCriterion

        return Mask2FormerCriterion(num_classes, points, form=form, drop_loss_iou=drop_loss_iou)
    from trainer.criterion.losses import SetCriterion

    return SetCriterion(num_classes, points=points, form=form, drop_loss_iou=drop_loss_iou)
