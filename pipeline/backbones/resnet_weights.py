"""ResNet-50 weights from self-supervised checkpoints (DenseCL, MoCo-v2, SwAV, DINO, torchvision).

The checkpoint's container (``state_dict``, ``teacher``...) and key prefix (``backbone.``,
``module.encoder_q.``...) are found by ``pipeline.backbones.weight_files.best_match``; what is left
over (projection heads, prototypes, momentum encoders, classifiers) is reported as ignored.
"""

from __future__ import annotations

import logging
from pathlib import Path

from torch import nn

from pipeline.backbones.weight_files import LoadReport, best_match, read_checkpoint
from pipeline.cli import UserError

log = logging.getLogger(__name__)


def load_resnet50_checkpoint(model: nn.Module, path: str | Path) -> LoadReport:
    """Load DenseCL / MoCo-v2 / SwAV / DINO / torchvision ResNet-50 weights into ``model``.

    ``model`` has torchvision's ResNet-50 parameter names without ``fc`` (``ResNet50`` in
    ``pipeline.backbones.backbone``). Raises UserError when the file holds no ResNet-50 (fewer than
    half
    of its tensors found, or any found with a wrong shape). ``num_batches_tracked`` buffers are
    optional.
    """
    obj = read_checkpoint(path)
    expected = {k: v.shape for k, v in model.state_dict().items()}
    required = [k for k in expected if not k.endswith("num_batches_tracked")]
    match = best_match(obj, expected)
    found = [k for k in required if match and k in match.tensors]
    if match is None or len(found) < len(required) / 2:
        raise UserError(
            f"{path} holds no ResNet-50 weights (best match: {len(found)} of "
            f"{len(required)} tensors); expected a torchvision-layout ResNet-50 "
            "checkpoint (DenseCL, MoCo-v2, SwAV, DINO, torchvision)"
        )
    if match.mismatched:
        raise UserError(
            f"{path}: tensor {match.prefix}{match.mismatched[0]} has the wrong shape "
            "for ResNet-50 (a different ResNet depth?)"
        )
    model.load_state_dict(match.tensors, strict=False)
    report = LoadReport(
        str(path),
        f"{match.location} {match.prefix}".strip(),
        len(match.tensors),
        [k for k in required if k not in match.tensors],
        sorted(match.ignored),
    )
    (log.warning if report.missing else log.info)("resnet50: %s", report.summary())
    return report
