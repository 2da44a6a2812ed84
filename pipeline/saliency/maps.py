"""Stage one's steps 2-5 (docs/method.md) as batched tensor functions: seeds from the valid crop
at every scale, cosine similarity maps, per-seed min-max normalisation, hard masks and maskness.
Every step reads valid cells and valid seeds only, so a padded batch gives the same maps as one
image at a time (see pipeline/saliency/propose.py for the whole stage)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor


def valid_cell_mask(valid_sizes: list[tuple[int, int]], h: int, w: int, device) -> Tensor:
    """``(B, h, w)`` bool: True on image i's cells (the top-left ``valid_sizes[i]``)."""
    sizes = torch.tensor(valid_sizes, dtype=torch.long, device=device).view(-1, 2)
    rows = torch.arange(h, device=device)[None, :, None] < sizes[:, 0, None, None]
    cols = torch.arange(w, device=device)[None, None, :] < sizes[:, 1, None, None]
    return rows & cols


def _resized_grid_size(n: int, scale: float) -> int:
    # floor like F.interpolate(scale_factor=...); the epsilon guards 0.29 * 100 = 28.999...
    return max(1, math.floor(n * scale + 1e-6))


def _linear_weights(n_in: int, n_out: int, device) -> Tensor:
    """(n_out, n_in) matrix of PyTorch's 1-D linear resampling (``align_corners=False``).

    Made by resampling the identity, so it is PyTorch's own sampling; bilinear resizing is
    separable, ``resize(X) = W_h @ X @ W_w^T``.
    """
    eye = torch.eye(n_in, device=device)[None]  # (1, n_in channels, n_in samples)
    return F.interpolate(eye, size=n_out, mode="linear", align_corners=False)[0].T


def resize_valid_crops(
    x: Tensor, valid_sizes: list[tuple[int, int]], scale: float
) -> tuple[Tensor, list[tuple[int, int]]]:
    """Bilinearly resize each image's valid crop of ``x`` by ``scale``.

    ``x`` (B, C, h, w). Image ``i``'s crop ``valid_sizes[i]`` becomes
    ``(floor(hv * scale), floor(wv * scale))`` (at least 1), sampled as
    ``F.interpolate(crop, size=..., mode="bilinear", align_corners=False)`` does (the crop mapped
    onto the whole smaller grid) but as two small matrix products, which is several times
    faster on a CPU for these many-channel, few-cell maps. Images with the same valid size are
    resized together (usually the whole batch); outputs are zero-padded to the largest size.
    Returns ``(y (B, C, hs, ws), sizes)``.
    """
    b, c = x.shape[:2]
    sizes = [
        (_resized_grid_size(hv, scale), _resized_grid_size(wv, scale)) for hv, wv in valid_sizes
    ]

    def resize(crop: Tensor, size_in: tuple[int, int], size_out: tuple[int, int]) -> Tensor:
        w_h = _linear_weights(size_in[0], size_out[0], x.device)
        w_w = _linear_weights(size_in[1], size_out[1], x.device)
        return w_h @ (crop @ w_w.T)  # (G, C, hs, ws)

    if len(set(valid_sizes)) == 1:  # the usual case: one product, no padding
        (hv, wv) = valid_sizes[0]
        return resize(x[:, :, :hv, :wv], (hv, wv), sizes[0]), sizes
    y = x.new_zeros((b, c, max(s[0] for s in sizes), max(s[1] for s in sizes)))
    for size in sorted(set(valid_sizes)):  # ragged crops: one product per distinct valid size
        idx = [i for i, v in enumerate(valid_sizes) if v == size]
        (oh, ow), (hv, wv) = sizes[idx[0]], size
        crop = x.index_select(0, torch.tensor(idx, device=x.device))[:, :, :hv, :wv]
        out = resize(crop, size, (oh, ow))
        for j, i in enumerate(idx):
            y[i, :, :oh, :ow] = out[j]
    return y, sizes


def make_seeds(
    features: Tensor, valid_sizes: list[tuple[int, int]], scales: list[float]
) -> tuple[Tensor, Tensor, Tensor]:
    """Step 2: seeds from every valid cell of X and of X resized by each scale.

    ``features`` (B, C, h, w), padding cells zeroed (padded seeds then come out zero). Returns
    ``seeds`` (B, N, C) L2-normalised (zero for padded seeds), ``seed_valid`` (B, N) bool and
    ``seed_pos`` (N, 3) int64 (scale index, row, column), shared by the batch; N is the sum over
    scales of the padded grid sizes, in (scale, row, column) order.
    """
    b, c, h, w = features.shape
    dev = features.device
    grids, valids, positions = [], [], []
    for k, scale in enumerate(scales):
        if scale == 1.0:  # the map itself: no resampling needed (and none of its rounding)
            grid, sizes = features, list(valid_sizes)
        else:
            grid, sizes = resize_valid_crops(features, valid_sizes, scale)
        gh, gw = grid.shape[-2:]
        grids.append(grid.flatten(2))  # (B, C, gh * gw): channels-first avoids transposed copies
        valids.append(valid_cell_mask(sizes, gh, gw, dev).flatten(1))
        rr, cc = torch.meshgrid(
            torch.arange(gh, device=dev), torch.arange(gw, device=dev), indexing="ij"
        )
        positions.append(torch.stack([torch.full_like(rr, k), rr, cc], -1).view(-1, 3))
    seeds = F.normalize(torch.cat(grids, 2), dim=1).transpose(1, 2)  # (B, N, C) view
    return seeds, torch.cat(valids, 1), torch.cat(positions, 0)


def similarity_maps(features: Tensor, seeds: Tensor) -> Tensor:
    """Step 3: cosine similarity of every seed with every cell, one batched matmul.

    ``features`` (B, C, h, w) raw (normalised per location here), ``seeds`` (B, N, C)
    L2-normalised. Returns ``Y`` (B, N, h * w).
    """
    x_hat = F.normalize(features.flatten(2), dim=1)  # (B, C, L)
    return torch.bmm(seeds, x_hat)


def minmax_normalise(maps: Tensor, cell_valid: Tensor, inplace: bool = False) -> Tensor:
    """Step 4: rescale each map to [0, 1] using its min and max over the image's valid cells.

    ``maps`` (B, N, L), ``cell_valid`` (B, L) bool. Invalid cells are 0 in the output; a constant
    map becomes all zeros (it has no salient part). ``inplace`` overwrites ``maps`` (saves a
    full-size temporary when the caller owns them).
    """
    out = maps if inplace else maps.clone()
    if bool(cell_valid.all()):  # no padding in this batch: one pass for both extremes
        lo, hi = torch.aminmax(maps, dim=-1, keepdim=True)
        return out.sub_(lo).div_((hi - lo).clamp_min_(1e-12))
    invalid = ~cell_valid[:, None, :]
    lo = maps.masked_fill(invalid, float("inf")).amin(-1, keepdim=True)
    hi = maps.masked_fill(invalid, float("-inf")).amax(-1, keepdim=True)
    return out.sub_(lo).div_((hi - lo).clamp_min_(1e-12)).masked_fill_(invalid, 0.0)


def hard_masks(soft: Tensor, threshold: float, cell_valid: Tensor) -> tuple[Tensor, Tensor]:
    """Step 4: ``hard = soft >= threshold`` on valid cells.

    Returns ``hard`` (B, N, L) float32 in {0, 1} (float, not bool: written straight by the
    comparison, summed and multiplied by BLAS/vectorised kernels, far faster on a CPU than bool
    reductions) and ``area`` (B, N) float32 cell counts (exact below 2**24).
    """
    hard = torch.ge(soft, threshold, out=torch.empty_like(soft))
    if not bool(cell_valid.all()):
        hard.mul_(cell_valid[:, None, :])
    return hard, hard.sum(-1)


def maskness(soft: Tensor, hard: Tensor, area: Tensor) -> Tensor:
    """Step 5: mean soft value inside the hard mask, (B, N); 0 where the mask is empty.

    ``soft`` (B, N, L), ``hard`` (B, N, L) {0, 1} float, ``area`` (B, N). The masked sum is a
    batched dot product (no full-size temporary).
    """
    b, n, cells = soft.shape
    inside = torch.bmm(soft.reshape(b * n, 1, cells), hard.reshape(b * n, cells, 1))
    return inside.view(b, n) / area.clamp_min(1)
