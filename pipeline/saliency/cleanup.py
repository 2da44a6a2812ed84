"""Optional clean-up of stage one's kept masks on the cell grid (issue 22; off in the paper's form).

The paper's mask is every cell whose min-max normalised similarity reaches the threshold. On real
photographs that set is often scattered: the seed's object plus far specks of similar texture,
so the box around it spans the image and the width filter drops a good object, and nested
near-copies of one object survive Matrix NMS. The steps here work on one image's kept masks
(at most ``top_k``, after Matrix NMS) on the backbone's cell grid, batched over the masks:

- :func:`component_labels`: 4-connected components of every mask at once (label propagation);
- :func:`keep_peak_component`: keep the component holding the map's peak (for a full-scale seed,
  its own cell) and every other piece of at least ``piece_share`` of that component's area;
- :func:`split_pieces`: a mask with two or more object-sized pieces (each at least
  ``split_share`` of its largest piece and ``min_cells`` cells) becomes one instance per piece;
- :func:`fill_holes`: fill enclosed background pieces of at most ``hole_share`` of the mask;
- :func:`duplicates`: Fast NMS on mask IoU (a mask is dropped when a higher-scored mask
  overlaps it above ``dup_iou``), for the nested copies Matrix NMS only decays.

Components use 4-connectivity because two cells that touch only at a corner upsample to two
separate pixel regions (the bilinear value between them falls below the threshold).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from pipeline.config import ProposalConfig


def _grow(x: Tensor) -> Tensor:
    """Max of every cell and its 4 neighbours, (M, h, w) float."""
    p = F.pad(x, (1, 1, 1, 1))
    out = torch.maximum(x, p[:, :-2, 1:-1])
    out = torch.maximum(out, p[:, 2:, 1:-1])
    out = torch.maximum(out, p[:, 1:-1, :-2])
    return torch.maximum(out, p[:, 1:-1, 2:])


def component_labels(masks: Tensor) -> Tensor:
    """4-connected component labels of (M, h, w) bool masks -> (M, h, w) int64.

    0 is background; a component's label is one plus the largest flat index of its cells (unique
    within a mask). Labels spread to neighbours until nothing changes, so the number of rounds is
    the longest path inside a component (a few dozen on a cell grid).
    """
    m, h, w = masks.shape
    inside = masks.float()
    index = torch.arange(1, h * w + 1, device=masks.device, dtype=torch.float32).view(1, h, w)
    labels = index * inside  # exact: cell counts stay far below 2**24
    while True:
        grown = _grow(labels) * inside
        if torch.equal(grown, labels):
            return labels.long()
        labels = grown


def component_areas(labels: Tensor) -> Tensor:
    """Cell count of every label, (M, h * w + 1) float32 (column 0 counts the background)."""
    m, h, w = labels.shape
    flat = labels.view(m, -1)
    areas = torch.zeros((m, h * w + 1), device=labels.device)
    return areas.scatter_add_(1, flat, torch.ones_like(flat, dtype=torch.float32))


def keep_peak_component(masks: Tensor, soft: Tensor, piece_share: float) -> Tensor:
    """(M, h, w) bool: the component under each soft map's peak, plus pieces of at least
    ``piece_share`` of that component's area (``piece_share`` > 1 keeps the peak's alone)."""
    m = masks.shape[0]
    labels = component_labels(masks)
    areas = component_areas(labels)
    peak = (soft * masks).view(m, -1).argmax(1)  # the peak of the map is inside its hard mask
    peak_label = labels.view(m, -1).gather(1, peak[:, None])  # (M, 1)
    peak_area = areas.gather(1, peak_label)
    keep = areas >= piece_share * peak_area
    keep.scatter_(1, peak_label, True)
    keep[:, 0] = False
    return keep.gather(1, labels.view(m, -1)).view_as(masks)


def split_pieces(masks: Tensor, split_share: float, min_cells: int) -> tuple[Tensor, Tensor]:
    """Split masks made of several object-sized pieces into one mask per piece.

    A piece counts when it has at least ``min_cells`` cells and ``split_share`` of its mask's
    largest piece. A mask with two or more such pieces is replaced by them (its specks dropped);
    any other mask stays whole. Returns ``pieces`` (P, h, w) bool and ``parent`` (P,) int64, the
    index of the mask each piece came from, in mask order.
    """
    labels = component_labels(masks)
    areas = component_areas(labels)
    areas[:, 0] = 0
    big = (areas >= split_share * areas.amax(1, keepdim=True)) & (areas >= max(1, min_cells))
    split = big.sum(1) >= 2
    whole = (~split).nonzero().flatten()
    mask_id, label = (big & split[:, None]).nonzero(as_tuple=True)
    parents = torch.cat([whole, mask_id])
    pieces = torch.cat([masks[whole], labels[mask_id] == label[:, None, None]])
    order = torch.sort(parents, stable=True).indices  # pieces stay beside their mask's rank
    return pieces[order], parents[order]


def fill_holes(masks: Tensor, hole_share: float) -> Tensor:
    """(M, h, w) bool: masks with enclosed background pieces of at most ``hole_share`` of the
    mask's area filled (background not 4-connected to the grid's border is enclosed)."""
    m = masks.shape[0]
    outside = (~masks).float()
    reach = torch.zeros_like(outside)
    reach[:, 0, :], reach[:, -1, :], reach[:, :, 0], reach[:, :, -1] = (
        outside[:, 0, :],
        outside[:, -1, :],
        outside[:, :, 0],
        outside[:, :, -1],
    )
    while True:  # flood the background from the border
        grown = _grow(reach) * outside
        if torch.equal(grown, reach):
            break
        reach = grown
    holes = (outside > 0) & (reach == 0)
    labels = component_labels(holes)
    areas = component_areas(labels)
    mask_area = masks.view(m, -1).sum(1, keepdim=True).float()
    small = areas <= hole_share * mask_area
    small[:, 0] = False
    return masks | small.gather(1, labels.view(m, -1)).view_as(masks)


def mask_iou(masks: Tensor) -> Tensor:
    """(M, M) IoU of (M, h, w) bool masks (one matrix product)."""
    f = masks.flatten(1).float()
    inter = f @ f.T
    area = f.sum(1)
    return inter / (area[:, None] + area[None, :] - inter).clamp_min(1)


def duplicates(masks: Tensor, dup_iou: float) -> Tensor:
    """(M,) bool: masks (sorted by score, best first) that a higher-ranked mask overlaps with IoU
    above ``dup_iou`` (Fast NMS: one matrix, no sequential pass; a dropped mask still drops
    the masks it overlaps, which errs towards fewer copies)."""
    iou = mask_iou(masks).triu_(diagonal=1)
    return (iou > dup_iou).any(0)


def clean_kept(
    soft: Tensor, decay: Tensor, threshold: float, cfg: ProposalConfig
) -> tuple[Tensor, Tensor, Tensor]:
    """Clean one image's kept masks and score them again.

    ``soft`` (K, h, w) the kept min-max normalised maps on the image's valid cells, best first;
    ``decay`` (K,) their Matrix NMS decay factors; ``threshold`` the hard-mask threshold.
    Returns ``maps`` (P, h, w) soft maps whose thresholded upsampling is the cleaned mask (cells
    of dropped pieces zeroed, filled holes raised to the threshold), ``scores`` (P,) the
    cleaned mask's maskness times its decay, and ``parent`` (P,) the kept mask each came from;
    sorted by score, duplicates dropped, below ``score_threshold`` dropped, at most ``top_k``.
    """
    hard = soft >= threshold
    if cfg.split_share > 0:
        masks, parent = split_pieces(hard, cfg.split_share, cfg.min_cells)
    else:
        masks, parent = hard, torch.arange(len(hard), device=soft.device)
    maps = soft.index_select(0, parent)
    if cfg.keep_component and len(masks):
        masks = keep_peak_component(masks, maps, cfg.piece_share)
    maps = maps.masked_fill(hard.index_select(0, parent) & ~masks, 0.0)  # dropped pieces
    if cfg.hole_share > 0 and len(masks):
        filled = fill_holes(masks, cfg.hole_share)
        maps = torch.where(filled & ~masks, maps.clamp_min(threshold), maps)
        masks = filled
    area = masks.flatten(1).sum(1)
    inside = (maps * masks).flatten(1).sum(1)
    scores = inside / area.clamp_min(1) * decay.index_select(0, parent)
    scores = scores.masked_fill(area < max(1, cfg.min_cells), 0.0)
    order = torch.sort(scores, descending=True, stable=True).indices
    keep = scores[order] >= cfg.score_threshold
    if cfg.dup_iou < 1 and len(order):
        keep &= ~duplicates(masks[order], cfg.dup_iou)
    order = order[keep][: cfg.top_k]
    return maps[order], scores[order], parent[order]
