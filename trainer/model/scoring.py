"""How a query-based model's last stage is ranked at inference: the detection score per
(query, class) and the optional duplicate removal after it (docs/method.md, stage three).

Two score forms:
  "class"     the class probability alone: K-Net's published inference (sigmoid of the logits);
  "maskness"  the class probability times the query's mask score, the mean foreground probability
              inside its own binary mask (sigmoid > 0.5 on the mask grid). This is SOLO's
              maskness, which stage one ranks its pseudo masks by and Mask2Former's published
              inference uses; it lets a confident, compact mask rank above a vague blob whose
              class score is as high.
"auto" is each model's published choice: K-Net "class", Mask2Former "maskness".

``model.test_nms_iou`` > 0 adds greedy per-class mask NMS after decoding
(trainer/inference/instances.py).
A set predictor should need none (each object wins one query), but an under-trained one repeats
an object in many queries; reports say which number is which.
"""

from __future__ import annotations

from torch import Tensor, nn

SCORE_FORMS = ("auto", "class", "maskness")
# The published inference of each kind, used for "auto".
PUBLISHED_SCORE = {"knet": "class", "mask2former": "maskness", "queryinst": "class"}


def resolve_score_form(form: str, kind: str) -> str:
    """ "class" or "maskness" for ``model.test_score`` = ``form`` on a ``kind`` model."""
    if form not in SCORE_FORMS:
        raise ValueError(f"model.test_score must be one of {SCORE_FORMS}, got '{form}'")
    return PUBLISHED_SCORE.get(kind, "class") if form == "auto" else form


def mask_scores(mask_logits: Tensor) -> Tensor:
    """(B, N) mean foreground probability inside each query's binary mask (sigmoid > 0.5),
    from (B, N, h, w) logits; 0 for an empty mask."""
    probs = mask_logits.float().sigmoid().flatten(2)
    inside = (probs > 0.5).to(probs.dtype)
    return (probs * inside).sum(-1) / (inside.sum(-1) + 1e-6)


def detection_scores(model: nn.Module, stage: dict[str, Tensor]) -> Tensor:
    """(B, N, C) detection scores of a prediction by the model's ``test_score`` form: its class
    probabilities (``class_probabilities`` where the model has its own, e.g. Mask2Former's
    softmax without no-object; else the sigmoid of the logits), times the mask score for
    "maskness"."""
    own = getattr(model, "class_probabilities", None)
    probs = own(stage) if own is not None else stage["logits"].float().sigmoid()
    kind = getattr(model, "kind", "knet")
    if resolve_score_form(getattr(model, "test_score", "auto"), kind) == "maskness":
        probs = probs * mask_scores(stage["masks"])[..., None]
    return probs


def set_inference(model: nn.Module, kind: str, test_score: str, test_nms_iou: float) -> None:
    """Record the inference rule (``model.test_score``, ``model.test_nms_iou``) on a built model
    as plain attributes (not parameters: checkpoints are unchanged, and a ``--set`` override
    at evaluation changes it)."""
    resolve_score_form(test_score, kind)  # refuse a bad form at build time
    if not 0.0 <= test_nms_iou <= 1.0:
        raise ValueError(f"model.test_nms_iou must lie in [0, 1], got {test_nms_iou}")
    model.kind = kind
    model.test_score = test_score
    model.test_nms_iou = float(test_nms_iou)
