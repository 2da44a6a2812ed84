"""Stage one's step 6 (docs/method.md): Matrix NMS over each image's ranked candidate masks,
then the top k.

Matrix NMS is SOLOv2's class-agnostic Gaussian kernel as its public code computes it:
``decay_j = min_i exp(-sigma * iou_ij^2) / exp(-sigma * comp_i^2)`` over higher-ranked ``i``,
with ``comp_i = max_{k<i} iou_ki``. Note the code *multiplies* by sigma (sigma = 2), while the
SOLOv2 paper writes ``exp(-iou^2 / sigma)``; the paper's sigma = 2 setting refers to the code's
form, which is used here. See pipeline/saliency/propose.py for the whole stage.
"""

from __future__ import annotations

import torch
from torch import Tensor


def mask_intersections(masks: Tensor) -> Tensor:
    """``(M, L)`` hard masks (bool or {0, 1} float) -> ``(M, M)`` float32 pixel-count overlaps.

    Exact either way. On a CPU the product runs on int8 masks with int32 sums (``torch._int_mm``,
    the VNNI dot-product path): 3x faster than the float32 matmul here
    (docs/benchmarks.md, stage one), and still integer-exact. Elsewhere, or where that
    private op is missing (older torch), it is one float32 matmul, exact below 2**24 cells.
    """
    if masks.device.type == "cpu" and hasattr(torch, "_int_mm"):
        q = masks.to(torch.int8)
        try:
            return torch._int_mm(q, q.T).float()
        except RuntimeError:  # a build without the CPU kernel: the float path below
            pass
    m = masks.float()
    return m @ m.T


def _decay_one(masks: Tensor, sigma: float) -> Tensor:
    """Matrix NMS decay (M,) of one image's (M, L) ranked candidates; in place on one (M, M)
    buffer pair, since at about 1,000 candidates the elementwise passes cost as much as the
    overlaps and fresh (M, M) temporaries add page faults."""
    iou = mask_intersections(masks)
    area = iou.diagonal().clone()  # |m_i & m_i| = |m_i|
    union = (area[:, None] + area[None, :]).sub_(iou).clamp_min_(1)
    iou.div_(union).triu_(diagonal=1)
    comp = iou.amax(dim=0)  # column max = max IoU with any higher-ranked candidate
    # Row i = 0 contributes exp(-sigma * iou_0j^2) <= 1, so decay <= 1 and the rows i >= j
    # (iou = 0, value exp(sigma * comp_i^2) >= 1) never decide the minimum.
    gap = torch.sub(comp.square()[:, None], iou.square_(), out=union)
    return torch.exp(sigma * gap.amin(dim=0))


def matrix_nms_decay(masks: Tensor, valid: Tensor, sigma: float) -> Tensor:
    """SOLOv2's class-agnostic Gaussian matrix NMS decay factors.

    ``masks`` (B, M, L) hard masks (bool or {0,1} float), each image's candidates sorted by score
    descending; ``valid`` (B, M) bool marks real candidates (padding must come last). Returns
    ``decay`` (B, M) in (0, 1] (1 on padding)::

        iou_ij  = |m_i & m_j| / |m_i | m_j|            for i < j (i ranked higher), else 0
        comp_i  = max_{k < i} iou_ki                   (how much i was itself suppressed)
        decay_j = min_i exp(-sigma * iou_ij^2) / exp(-sigma * comp_i^2)

    computed as ``exp(sigma * min_i (comp_i^2 - iou_ij^2))`` (same value, one exp per column).
    One image at a time over its own candidates: a batch pads every image to the most
    candidates, and the work grows with their square.
    """
    decay = torch.ones(valid.shape, dtype=torch.float32, device=masks.device)
    for i, count in enumerate(valid.sum(1).tolist()):
        if count:
            decay[i, :count] = _decay_one(masks[i, :count], sigma)
    return decay


def suppress(
    scores: Tensor,
    hard: Tensor,
    candidate: Tensor,
    sigma: float,
    top_k: int,
    score_floor: float | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """Step 6: sort candidates by maskness, decay by matrix NMS, keep the top ``top_k``.

    ``scores`` (B, N) maskness, ``hard`` (B, N, L) bool or {0, 1} float, ``candidate`` (B, N)
    bool. Returns
    ``index`` (B, k) into N, ``decayed`` (B, k) and ``kept`` (B, k) bool (False for padding when
    an image has fewer than k candidates), each row sorted by decayed score descending.

    ``score_floor`` (exact speed-up): a candidate's decay depends only on higher-ranked
    candidates and never raises its score, so candidates whose raw maskness is below the final
    score threshold can never be kept and are dropped before NMS, without changing any kept
    mask or score. ``None`` runs NMS over every candidate (the reference the tests compare to).
    """
    if score_floor is not None:
        candidate = candidate & (scores >= score_floor)
    key = scores.masked_fill(~candidate, float("-inf"))
    m = int(candidate.sum(1).max()) if candidate.numel() else 0
    if m == 0:  # nothing survived in any image
        empty = scores.new_zeros((scores.shape[0], 0))
        return empty.long(), empty, empty.bool()
    # Stable sorts: ties keep (scale, row, column) order, the same in a batch and alone.
    order = torch.sort(key, dim=1, descending=True, stable=True).indices[:, :m]  # (B, M)
    valid = candidate.gather(1, order)
    ranked = hard.gather(1, order[..., None].expand(-1, -1, hard.shape[-1]))
    decayed = scores.gather(1, order) * matrix_nms_decay(ranked, valid, sigma)
    decayed = decayed.masked_fill(~valid, float("-inf"))
    top = torch.sort(decayed, dim=1, descending=True, stable=True).indices[:, :top_k]
    return order.gather(1, top), decayed.gather(1, top), valid.gather(1, top)
