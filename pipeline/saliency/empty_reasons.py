"""Why an image came out of stage one without a mask: the stage that removed its last candidate.

Stored in the shard's per-image ``error`` string for empty images (schema v1 already has the
column; unreadable images keep their read error there), so ``inspect`` can count empty images by
reason. A reason starts with the stage's name and a colon (``score:``, ``box_width:``, ...),
which is what the summary groups by; the rest says the numbers.

Matrix NMS never empties an image on its own: the best candidate is decayed by nothing
(its decay is 1), so every image with a candidate at the score threshold keeps at least one
mask up to the filters; the ``nms`` stage is kept for completeness of the accounting.
"""

from __future__ import annotations

from torch import Tensor

from pipeline.config import ProposalConfig


def before_filters(
    candidates: int, reach_score: int, kept: int, cleaned: int, best: float, cfg: ProposalConfig
) -> str:
    """The reason when nothing reached step 8's geometric filters ("" when something did).

    ``candidates``: seeds whose hard mask has ``min_cells`` cells; ``reach_score``: those whose
    maskness reaches ``score_threshold``; ``kept``: masks after Matrix NMS, top-k and the score
    filter; ``cleaned``: masks after the clean-up (= ``kept`` in the paper's form); ``best``:
    the highest maskness among the candidates.
    """
    if candidates == 0:
        return f"min_cells: no seed's mask has {cfg.min_cells} cells"
    if reach_score == 0:
        return (
            f"score: no mask's maskness reaches score_threshold {cfg.score_threshold:g} "
            f"(best {best:.3f})"
        )
    if kept == 0:
        return "nms: Matrix NMS decayed every mask below score_threshold"
    if cleaned == 0:
        return (
            f"cleanup: all {kept} masks scored below score_threshold "
            f"{cfg.score_threshold:g} once cleaned"
        )
    return ""


def after_filters(
    non_empty: Tensor, centre_ok: Tensor, width_ok: Tensor, cfg: ProposalConfig
) -> str:
    """The reason when step 8's filters removed every mask ((K,) bool: which masks pass each).

    Names the single filter that removed them all when there is one (``box_width``,
    ``center_y``, ``upsample`` for masks that vanished when upsampled), else ``filters`` with
    how many masks each filter failed."""
    k = int(non_empty.numel())
    if bool((non_empty & centre_ok & width_ok).any()):
        return ""
    if not bool(non_empty.any()):
        return f"upsample: all {k} masks vanished at the original size"
    if not bool(width_ok.any()):
        return f"box_width: all {k} boxes span at least max_box_width {cfg.max_box_width:g}"
    if not bool(centre_ok.any()):
        return f"center_y: all {k} masks are centred above min_center_y {cfg.min_center_y:g}"
    return (
        f"filters: of {k} masks, {k - int(non_empty.sum())} vanished when upsampled, "
        f"{k - int(centre_ok.sum())} failed center_y, {k - int(width_ok.sum())} failed box_width"
    )
