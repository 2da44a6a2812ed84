"""Run a trained model on images: ``Predictor.from_checkpoint(path)(image)`` -> :class:`Instances`.

The one inference path of the project: ``trainer predict``, ``trainer evaluate`` and fine-tuning's
periodic evaluation all turn a batch into detections through :meth:`Predictor.predict_batch`.
An image is prepared exactly as the evaluation loader prepares it (decode, resize keeping the
ratio to the checkpoint's input size, ImageNet normalisation, padding to the model's divisor),
so a path, a numpy array and a PIL image of the same pixels give the same instances.

Two checkpoint kinds load: a fine-tuning checkpoint (its class names and COCO category ids are
recorded in it) and a pre-training checkpoint (one class-agnostic class, "object"). The model
kind comes from the checkpoint's own config through the model factory, so every kind the
factory builds is served.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from pipeline.cli import UserError
from pipeline.config import apply_override, from_dict
from pipeline.inputs.image_files import ImageLimits
from pipeline.precision import autocast, stage_precision
from trainer.config import Config
from trainer.data.datasets import Batch, Collate, make_sample
from trainer.data.transforms import Augment
from trainer.engine.checkpoint import load_checkpoint, load_matching, model_state, training_config
from trainer.inference.instances import Instances, boxes_of, decode, select
from trainer.model.scoring import detection_scores

AGNOSTIC_NAME = "object"


@dataclass
class Settings:
    """Decoding and input-size settings (defaults from the checkpoint's config).

    score_threshold: detections below it are dropped (0 keeps all, as evaluation does);
    max_detections: per image, before the score cut; mask_threshold: on the sigmoid mask;
    nms_iou: per-class mask NMS at this IoU (0: off); short_side / max_side: the input size.
    """

    short_side: int
    max_side: int
    mask_threshold: float = 0.3
    max_detections: int = 100
    score_threshold: float = 0.0
    nms_iou: float = 0.0


def unwrap(model: nn.Module) -> nn.Module:
    """The model inside an Objective and/or DistributedDataParallel wrapper."""
    model = getattr(model, "module", model)
    return getattr(model, "knet", model)


def as_rgb(image: Any, limits: ImageLimits | None = None) -> np.ndarray:
    """A path, a PIL image or a numpy array -> (H, W, 3) uint8 RGB. Paths decode as every
    command decodes them (EXIF orientation, 16-bit, alpha; pipeline/inputs/images.py) and raise
    ``UnreadableImage`` with the reason; arrays must be (H, W) or (H, W, 3) uint8 RGB."""
    if isinstance(image, (str, Path)):
        from pipeline.inputs.images import decode_image

        return decode_image(Path(image), limits=limits)
    if hasattr(image, "convert") and hasattr(image, "size"):  # a PIL image
        return np.array(image.convert("RGB"), dtype=np.uint8)
    array = np.asarray(image)
    if array.dtype != np.uint8:
        raise ValueError(f"expected a uint8 image array, got {array.dtype}")
    if array.ndim == 2:
        array = np.repeat(array[:, :, None], 3, axis=2)
    if array.ndim != 3 or array.shape[2] != 3:
        raise ValueError(f"expected an (H, W, 3) RGB array, got shape {array.shape}")
    return np.array(array, order="C")  # a writable copy: torch refuses read-only arrays


class Predictor:
    """A model in eval mode with its classes and decoding settings.

    model: any factory-built model (wrappers are unwrapped); categories: (COCO id, name) per
    contiguous class; inputs: batch images -> the model's input (a frozen backbone's per-image
    levels, ``trainer.data.frozen_features``), None when the model runs its own backbone; precision:
    the forward pass's autocast (``pipeline.precision``; decoding is fp32 either way).
    """

    def __init__(
        self,
        model: nn.Module,
        categories: Sequence[tuple[int, str]],
        settings: Settings,
        *,
        device: torch.device | str = "cpu",
        inputs: Callable | None = None,
        config: Config | None = None,
        precision: str = "fp32",
    ) -> None:
        self.model = unwrap(model)
        self.categories = [(int(i), str(n)) for i, n in categories]
        if getattr(self.model, "num_classes", len(self.categories)) != len(self.categories):
            raise UserError(
                f"the model predicts {self.model.num_classes} classes but "
                f"{len(self.categories)} categories were given"
            )
        self.settings = settings
        self.device = torch.device(device)
        self.inputs = inputs
        self.config = config
        self.precision = precision
        # Filled by from_checkpoint: the training iteration and the classes the checkpoint
        # recorded (None for a pre-training checkpoint or an older fine-tuning one).
        self.iteration: int | None = None
        self.recorded_categories: list | None = None

    @classmethod
    def from_checkpoint(
        cls,
        path: str | Path,
        *,
        device: torch.device | str = "cpu",
        overrides: Sequence[str] = (),
        **settings: Any,
    ) -> Predictor:
        """Load a fine-tuning or pre-training checkpoint; ``overrides``: ``--set`` assignments on
        its config; ``settings``: any :class:`Settings` field (None keeps the default)."""
        from pipeline.backbones.build import build_backbone
        from trainer.data.feature_cache import frozen_inputs
        from trainer.model.factory import build_model

        path = Path(path)
        state = load_checkpoint(path)
        raw, num_classes = training_config(state, path)  # crafted fields are one line
        raw = copy.deepcopy(raw)
        for assignment in overrides:
            apply_override(raw, assignment)
        cfg = from_dict(Config, raw)
        categories = checkpoint_categories(state, int(num_classes))
        model = build_model(cfg.model, build_backbone(cfg.backbone), int(num_classes))
        # strict: every tensor must fit (a frozen backbone is filled in from backbone.weights)
        load_matching(model, model_state(state, model, path), allowed_skips=())
        model.to(device).eval()
        section = cfg.finetune if state.get("categories") or num_classes > 1 else cfg.pretrain
        stage = "finetune" if section is cfg.finetune else "pretrain"
        precision = stage_precision(section, device, stage)
        # Without the cache: the per-image levels equal the cached ones bitwise.
        _, frozen, _ = frozen_inputs(
            model.backbone,
            enabled=False,
            cache_dir="",
            stage="predict",
            datasets=[],
            precision=precision,
        )
        chosen = {
            "short_side": section.short_side,
            "max_side": section.max_side,
            "mask_threshold": cfg.finetune.test_mask_threshold,
            "max_detections": cfg.finetune.max_detections,
            "nms_iou": cfg.model.test_nms_iou,
        }
        chosen.update({k: v for k, v in settings.items() if v is not None})
        predictor = cls(
            model,
            categories,
            Settings(**chosen),
            device=device,
            inputs=frozen,
            config=cfg,
            precision=precision,
        )
        predictor.iteration = state.get("iteration")
        predictor.recorded_categories = state.get("categories")
        return predictor

    @property
    def class_agnostic(self) -> bool:
        return [n for _, n in self.categories] == [AGNOSTIC_NAME]

    def prepare(self, image: Any, info: dict[str, Any] | None = None) -> dict[str, Any]:
        """One evaluation sample (resize only) from an image in any accepted form."""
        rgb = as_rgb(image)
        none = np.zeros((0, *rgb.shape[:2]), np.uint8)
        augment = Augment(self.settings.short_side, self.settings.max_side)
        rng = np.random.default_rng(0)  # unused: evaluation draws no augmentation
        return make_sample(rgb, none, np.zeros(0, np.int64), None, augment, rng, info or {})

    def __call__(self, image: Any) -> Instances:
        """Instances on one image: a path, a numpy (H, W, 3) uint8 RGB array or a PIL image."""
        batch = Collate(self.model.size_divisor)([self.prepare(image)])
        return self.predict_batch(batch)[0]

    @torch.no_grad()
    def predict_batch(self, batch: Batch) -> list[Instances]:
        """Instances per image of a trainer Batch (infos carry orig_size and image_size)."""
        model = self.model
        was_training = model.training
        model.eval()
        try:
            images = batch.images.to(self.device, non_blocking=self.device.type == "cuda")
            if self.inputs is not None:
                images = self.inputs(images, batch.infos)
            with autocast(self.precision, self.device):
                if hasattr(model, "detect"):  # Mask R-CNN decodes itself (torchvision's paste)
                    return [self._instances(*d) for d in model.detect(images, batch.infos)]
                last = model(images)["stages"][-1]
        finally:
            model.train(was_training)
        last = {k: v.float() if torch.is_tensor(v) else v for k, v in last.items()}
        return self._decode(model, last, tuple(images.shape[-2:]), batch.infos)

    def _decode(self, model, last, input_size, infos) -> list[Instances]:
        """A query-based model's last stage -> Instances per image, in fp32."""
        s = self.settings
        scores = detection_scores(model, last)
        out = []
        for i, info in enumerate(infos):
            found = decode(
                scores[i],
                last["masks"][i],
                input_size=input_size,
                image_size=tuple(info["image_size"]),
                orig_size=tuple(info["orig_size"]),
                mask_threshold=s.mask_threshold,
                max_detections=s.max_detections,
                score_threshold=s.score_threshold,
                nms_iou=s.nms_iou,
            )
            out.append(self._named(*found))
        return out

    def _instances(self, masks: np.ndarray, scores: np.ndarray, labels: np.ndarray) -> Instances:
        """Instances from a self-decoding model's binary masks at the original size, best first."""
        s = self.settings
        found = select(
            masks.astype(np.uint8),
            scores.astype(np.float32),
            labels.astype(np.int64),
            max_detections=s.max_detections,
            score_threshold=s.score_threshold,
            nms_iou=s.nms_iou,
        )
        return self._named(*found)

    def _named(self, masks, scores, labels, rles) -> Instances:
        return Instances(
            masks=masks.astype(bool),
            boxes=boxes_of(rles),
            scores=scores,
            labels=labels,
            label_names=[self.categories[int(c)][1] for c in labels],
            category_ids=[self.categories[int(c)][0] for c in labels],
            rles=rles,
        )


def checkpoint_categories(state: dict[str, Any], num_classes: int) -> list[tuple[int, str]]:
    """(COCO id, name) per class: recorded by fine-tuning; a pre-training checkpoint's single
    class is the class-agnostic "object" (id 1); an older fine-tuning checkpoint without names
    gets "class<i>" with ids 1..C."""
    recorded = state.get("categories")
    if recorded:
        return [(int(i), str(n)) for i, n in recorded]
    if num_classes == 1:
        return [(1, AGNOSTIC_NAME)]
    return [(i + 1, f"class{i + 1}") for i in range(num_classes)]
