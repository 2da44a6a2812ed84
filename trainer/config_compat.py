"""How configs of runs made at different times are compared (``compare``/``study`` reuse and
``--resume``): keys added after runs existed read as the value those runs were made with, and keys
one model kind alone reads are left out of another kind's comparison.
"""

from __future__ import annotations

from dataclasses import asdict
from typing import Any

from pipeline.config import ProposalConfig
from trainer.config_experiments import EfficiencyConfig

# Keys added after run folders existed, at the value that reproduces those runs. A config recorded
# before a key existed reads as holding this value, so older runs still resume and are reused.
LATER_DEFAULTS: dict[str, Any] = {
    "pretrain.precision": "fp32",
    "pretrain.compile": False,
    "finetune.precision": "fp32",
    "finetune.compile": False,
    "pretrain.partial_shards": False,
    "model.test_score": "auto",
    "model.test_nms_iou": 0.0,
    # Pre-training before the held-out pretext fit and the pseudo-mask selection existed.
    "pretrain.holdout": 0.0,
    "pretrain.holdout_seed": 0,
    "pretrain.eval_every": 0,
    "pretrain.teacher_val": "",
    "pretrain.pseudo_min_score": 0.0,
    "pretrain.pseudo_max_masks": 0,
    "pretrain.pseudo_min_area": 0.0,
    "model.criterion_form": "mask2former",
    "pretrain.drop_loss_iou": 0.0,
    "pretrain.eval_size": "train",
    "model.dii_stages": 6,
    "model.dynamic_dim": 64,
    "model.mask_convs": 4,
    "pretrain.init": "",
    "pretrain.ema_decay": 0.0,
}
# What the efficiency command repeats, not what a run does (left out of compare's reuse check).
LATER_DEFAULTS.update({f"efficiency.{k}": v for k, v in asdict(EfficiencyConfig()).items()})
# Stage one's precision and clean-up switches, at their defaults: fp32 and the paper's form, which
# older shards and runs were made with (the values are ProposalConfig's own, not repeated here).
LATER_DEFAULTS.update(
    {
        f"proposals.{key}": getattr(ProposalConfig(), key)
        for key in (
            "precision",
            "compile",
            "keep_component",
            "piece_share",
            "split_share",
            "hole_share",
            "dup_iou",
        )
    }
)
# Keys (dotted) or whole sections that one model kind alone reads: left out when configs of
# another kind are compared, so adding one never makes older runs of the other kinds differ.
KIND_ONLY: dict[tuple[str, ...], tuple[str, ...]] = {
    ("maskrcnn",): ("model.roi_samples", "maskrcnn"),
    # The query-based kinds' score form and set-criterion form (Mask R-CNN scores and matches
    # its own way), so choosing them never makes Mask R-CNN's runs differ.
    ("knet", "mask2former"): ("model.criterion_form",),
    ("knet", "mask2former", "queryinst"): ("model.test_score",),
    ("queryinst",): ("model.dii_stages", "model.dynamic_dim", "model.mask_convs"),
}


def with_later_defaults(recorded: dict[str, Any]) -> dict[str, Any]:
    """A recorded config (nested dict) with every missing :data:`LATER_DEFAULTS` key filled in,
    in place; returns it."""
    for dotted, value in LATER_DEFAULTS.items():
        section, key = dotted.split(".")
        if isinstance(recorded.get(section), dict):
            recorded[section].setdefault(key, value)
    return recorded


def comparable(tree: dict[str, Any]) -> dict[str, Any]:
    """A config (nested dict) as runs are compared: later keys filled in
    (:func:`with_later_defaults`) and other kinds' own keys (:data:`KIND_ONLY`) removed; in place,
    returns it."""
    with_later_defaults(tree)
    kind = tree.get("model", {}).get("kind", "knet")
    for owners, names in KIND_ONLY.items():
        if kind in owners:
            continue
        for name in names:
            section, _, key = name.partition(".")
            if key:
                tree.get(section, {}).pop(key, None)
            else:
                tree.pop(section, None)
    return tree
