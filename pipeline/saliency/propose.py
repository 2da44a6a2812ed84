"""Saliency mask proposals (docs/method.md stage one, steps 2-8) as batched tensor functions.

Input is a padded batch of backbone features ``X`` (B, C, h, w): image ``i`` only covers the
top-left ``valid_sizes[i]`` cells, the rest is padding whose features are garbage. Every step
below uses valid cells and valid seeds only, so a batch gives the same proposals as running the
images one at a time. Everything stays on the features' device. Seeds, maps, maskness and NMS
are batched tensors (no loop over seeds or masks); Python loops remain only over the images for
the ragged last step (upsampling to each original size), over the distinct valid sizes when a
batch mixes them (seed resizing), and over chunks of masks bounding memory on huge images.

Steps, with ``N`` seeds per image (all scales, padded) and ``L = h * w`` cells:

2. seeds: every cell of the valid crop of X and of that crop bilinearly resized by each scale
   (``make_seeds``), L2-normalised;
3. similarity maps ``Y = S . X_hat`` (cosine similarity, one batched matmul; ``similarity_maps``);
4. per-seed min-max normalisation over the valid cells (``minmax_normalise``); hard mask =
   soft >= threshold; seeds whose hard mask has fewer than ``min_cells`` cells are dropped;
5. maskness = mean soft value inside the hard mask (``maskness``);
6. sort, matrix NMS (``nms.matrix_nms_decay``), top-k (``nms.suppress``);
7. upsample the kept soft maps to the original image size and threshold (``upsample_masks``);
8. boxes (``mask_geometry``); filters: decayed maskness, vertical centre, box width
   (``shape_filter``).

Matrix NMS (SOLOv2's, as its public code computes it) and the top k are step 6, in
pipeline/saliency/nms.py.

Choices where docs/method.md leaves room: a scale-``s`` seed grid has ``floor(n * s)`` (at least 1)
cells per axis and samples the valid crop like ``F.interpolate(size=...)`` (crop mapped onto the
whole grid); seeds are resized from the raw features, then L2-normalised. Soft maps are
upsampled in one bilinear step from the cell grid straight to the original image (no
intermediate resized-size raster). The vertical-centre filter uses the mask's pixel centroid.

Speed (the work is memory-bound on a CPU): hard masks are {0,1} float32 so areas, maskness and
IoUs are sums/matrix products; candidates whose raw maskness is below ``score_threshold`` are
dropped before matrix NMS, which is exact (see ``nms.suppress``); only masks that survive the
score filter are upsampled.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from pipeline.config import ProposalConfig
from pipeline.saliency.cleanup import clean_kept
from pipeline.saliency.empty_reasons import after_filters, before_filters
from pipeline.saliency.maps import (
    hard_masks,
    make_seeds,
    maskness,
    minmax_normalise,
    similarity_maps,
    valid_cell_mask,
)
from pipeline.saliency.nms import suppress

# Upsampled masks are produced in chunks of at most this many float32 pixels (bounds the memory
# a very large original image needs: 2**25 floats = 128 MiB per intermediate).
_UPSAMPLE_CHUNK_PIXELS = 2**25


@dataclass
class Proposals:
    """One image's kept masks, sorted by score descending; tensors on the features' device."""

    masks: Tensor  # (K, H, W) bool at the ORIGINAL image size
    boxes: Tensor  # (K, 4) float32 x0, y0, x1, y1 in original pixels (x1, y1 exclusive)
    scores: Tensor  # (K,) float32 decayed maskness
    seeds: Tensor  # (K, C) float32 L2-normalised seed embeddings S_l
    seed_pos: Tensor  # (K, 3) int64 scale index, row, column on that scale's grid
    empty_reason: str = ""  # for K = 0: the stage that removed the last candidate (empty_reasons)


# --------------------------------------------------------------------------------------------
# Steps 7-8


def _upsample_weights(n_cells: int, n_resized: int, n_orig: int, stride: float, device) -> Tensor:
    """(n_orig, n_cells) 1-D linear weights taking cells to original pixels.

    Original pixel ``p`` sits at cell coordinate ``(p + 0.5) * n_resized / (n_orig * stride)
    - 0.5``: PyTorch's ``align_corners=False`` linear resampling with scale factor
    ``n_orig * stride / n_resized`` (kept, not recomputed), clamped at the borders. The factor is
    nudged up by ulps if rounding would leave fewer than ``n_orig`` output pixels.
    """
    factor = n_orig * stride / n_resized
    while math.floor(n_cells * factor) < n_orig:
        factor = math.nextafter(factor, math.inf)
    eye = torch.eye(n_cells, device=device)[None]
    w = F.interpolate(
        eye, scale_factor=factor, mode="linear", align_corners=False, recompute_scale_factor=False
    )[0]
    return w.T[:n_orig]  # the cells also cover the batch padding beyond the image: cropped


def upsample_masks(
    soft: Tensor,
    resized_size: tuple[int, int],
    orig_size: tuple[int, int],
    stride: float,
    threshold: float,
) -> Tensor:
    """Step 7: soft maps on the valid cell grid -> hard masks at the original image size.

    ``soft`` (K, hv, wv). Cell (r, c) covers ``stride`` pixels of the resized (padded) input,
    its centre at ``((c + 0.5) * stride, (r + 0.5) * stride)``; an original pixel ``(x, y)``
    sits at ``(x + 0.5) * Wr / W`` in the resized image. Each original pixel takes the bilinear
    value at its cell coordinate (one resampling straight to the original size, as
    ``F.interpolate(..., scale_factor=W * stride / Wr, align_corners=False)`` would sample it,
    computed as two matrix products ``W_h @ soft @ W_w^T``) and is kept where it is
    >= ``threshold``. Returns (K, H, W) bool.
    """
    k, hv, wv = soft.shape
    (hr, wr), (h0, w0) = resized_size, orig_size
    w_h = _upsample_weights(hv, hr, h0, stride, soft.device)  # (H, hv)
    w_w = _upsample_weights(wv, wr, w0, stride, soft.device)  # (W, wv)
    out = torch.empty((k, h0, w0), dtype=torch.bool, device=soft.device)
    chunk = max(1, _UPSAMPLE_CHUNK_PIXELS // max(1, h0 * w0))
    for s in range(0, k, chunk):  # chunks only bound memory for very large originals
        full = w_h @ (soft[s : s + chunk] @ w_w.T)  # (k', H, W)
        torch.ge(full, threshold, out=out[s : s + chunk])
    return out


def mask_geometry(masks: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Boxes, areas and vertical centres of (K, H, W) bool masks.

    Returns ``boxes`` (K, 4) float32 x0, y0, x1, y1 (exclusive; meaningless for an empty
    mask), ``area`` (K,) float32 and ``cy`` (K,) float32, the mean y of the mask's pixel
    centres (``y + 0.5``) in pixels (0 for an empty mask). Row and column counts are matrix
    products on a float copy (bool reductions are slow on a CPU), chunked like the upsampling.
    """
    k, h, w = masks.shape
    dev = masks.device
    row_counts = torch.empty((k, h), device=dev)
    col_counts = torch.empty((k, w), device=dev)
    chunk = max(1, _UPSAMPLE_CHUNK_PIXELS // max(1, h * w))
    for s in range(0, k, chunk):
        m = masks[s : s + chunk].float()
        row_counts[s : s + chunk] = m @ torch.ones(w, device=dev)
        col_counts[s : s + chunk] = (torch.ones(1, h, device=dev) @ m)[:, 0]
    rows = (row_counts > 0).to(torch.uint8)
    cols = (col_counts > 0).to(torch.uint8)
    # argmax returns the first maximum: the first row / column holding the mask
    y0, y1 = rows.argmax(1), h - rows.flip(1).argmax(1)
    x0, x1 = cols.argmax(1), w - cols.flip(1).argmax(1)
    area = row_counts.sum(1)
    ys = torch.arange(h, device=dev, dtype=torch.float32) + 0.5
    cy = (row_counts * ys).sum(1) / area.clamp_min(1)
    return torch.stack([x0, y0, x1, y1], 1).float(), area, cy


def mask_boxes(masks: Tensor) -> Tensor:
    """Tight boxes (K, 4) float32 x0, y0, x1, y1 (exclusive) of non-empty (K, H, W) masks."""
    return mask_geometry(masks)[0]


def shape_checks(
    boxes: Tensor,
    area: Tensor,
    cy: Tensor,
    size: tuple[int, int],
    min_center_y: float,
    max_box_width: float,
) -> tuple[Tensor, Tensor, Tensor]:
    """Step 8's geometric filters one by one (inputs from :func:`mask_geometry`), each (K,) bool.

    Returns ``non_empty`` (the mask kept pixels at the original size), ``centre_ok`` (its
    vertical centre lies strictly below ``min_center_y`` of the image height from the top,
    ``cy / H > min_center_y``; y grows downwards, so this drops masks centred in the top band,
    e.g. sky) and ``width_ok`` (its box is strictly narrower than ``max_box_width`` of the image
    width, ``(x1 - x0) / W < max_box_width``). ``size`` is the image's (H, W).
    """
    h, w = size
    width = boxes[:, 2] - boxes[:, 0]
    return area > 0, cy / h > min_center_y, width / w < max_box_width


def shape_filter(boxes, area, cy, size, min_center_y, max_box_width) -> Tensor:
    """Step 8's geometric filters combined (arguments as :func:`shape_checks`) -> (K,) bool."""
    non_empty, centre_ok, width_ok = shape_checks(
        boxes, area, cy, size, min_center_y, max_box_width
    )
    return non_empty & centre_ok & width_ok


# --------------------------------------------------------------------------------------------
# The whole stage


@torch.no_grad()
def propose(
    features: Tensor,
    valid_sizes: list[tuple[int, int]],
    resized_sizes: list[tuple[int, int]],
    orig_sizes: list[tuple[int, int]],
    stride: float,
    cfg: ProposalConfig,
    *,
    prune: bool = True,
) -> list[Proposals]:
    """docs/method.md steps 2-8 for a padded batch; one :class:`Proposals` per image, in order.

    ``features`` (B, C, h, w) from ``Backbone.saliency_features`` of a bottom/right padded batch;
    ``valid_sizes[i]`` = (rows, cols) of cells covering image i (``ceil(resized / stride)``);
    ``resized_sizes[i]`` = its size fed to the backbone before padding; ``orig_sizes[i]`` = its
    decoded size (masks and boxes are returned at that size). ``prune=False`` skips the exact
    below-threshold pruning before NMS (same result, slower; for tests).
    """
    b, c, h, w = features.shape
    if not (len(valid_sizes) == len(resized_sizes) == len(orig_sizes) == b):
        raise ValueError("one valid, resized and original size per image is needed")
    if any(hv > h or wv > w or hv < 1 or wv < 1 for hv, wv in valid_sizes):
        raise ValueError(f"valid sizes {valid_sizes} do not fit a {h}x{w} feature map")
    dev = features.device
    cell_valid = valid_cell_mask(valid_sizes, h, w, dev)  # (B, h, w)
    # Zero the padding so no garbage (or NaN) reaches seeds, norms or sums.
    x = features.float()
    if not bool(cell_valid.all()):
        x = x * cell_valid[:, None]
    cell_valid = cell_valid.flatten(1)  # (B, L)

    seeds, seed_valid, seed_pos = make_seeds(x, valid_sizes, list(cfg.scales))
    soft = minmax_normalise(similarity_maps(x, seeds), cell_valid, inplace=True)  # (B, N, L)
    hard, area = hard_masks(soft, cfg.mask_threshold, cell_valid)
    score = maskness(soft, hard, area)
    candidate = seed_valid & (area >= cfg.min_cells)
    index, decayed, kept = suppress(
        score, hard, candidate, cfg.nms_sigma, cfg.top_k, cfg.score_threshold if prune else None
    )
    kept &= decayed >= cfg.score_threshold  # step 8's score filter, before any upsampling
    # For the empty-image reasons: how far each image's candidates got.
    reach_score = (candidate & (score >= cfg.score_threshold)).sum(1).tolist()
    best = score.masked_fill(~candidate, 0.0).amax(1).tolist()

    out = []
    for i in range(b):
        idx = index[i][kept[i]]
        scores_i = decayed[i][kept[i]]
        hv, wv = valid_sizes[i]
        maps = soft[i].index_select(0, idx).view(-1, h, w)[:, :hv, :wv]
        if cfg.cleans():  # issue 22's clean-up; the paper's form skips it
            decay = scores_i / score[i].index_select(0, idx).clamp_min(1e-12)
            maps, scores_i, parent = clean_kept(maps, decay, cfg.mask_threshold, cfg)
            idx = idx.index_select(0, parent)
        reason = before_filters(
            int(candidate[i].sum()), reach_score[i], int(kept[i].sum()), len(idx), best[i], cfg
        )
        masks = upsample_masks(maps, resized_sizes[i], orig_sizes[i], stride, cfg.mask_threshold)
        boxes, area_px, cy = mask_geometry(masks)
        checks = shape_checks(
            boxes, area_px, cy, orig_sizes[i], cfg.min_center_y, cfg.max_box_width
        )
        good = checks[0] & checks[1] & checks[2]  # shape_filter, parts kept for the reason
        out.append(
            Proposals(
                masks=masks[good],
                boxes=boxes[good],
                scores=scores_i[good],
                seeds=seeds[i].index_select(0, idx)[good],
                seed_pos=seed_pos.index_select(0, idx)[good],
                empty_reason=reason or after_filters(*checks, cfg),
            )
        )
    return out
