"""Saliency proposals: hand-made cases for each step, and the batched/pruned invariants."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from pipeline.config import ProposalConfig
from pipeline.saliency import propose as saliency
from pipeline.saliency.maps import (
    hard_masks,
    make_seeds,
    maskness,
    minmax_normalise,
    resize_valid_crops,
    valid_cell_mask,
)
from pipeline.saliency.nms import matrix_nms_decay, suppress
from pipeline.saliency.propose import (
    mask_boxes,
    mask_geometry,
    propose,
    shape_filter,
    upsample_masks,
)


def _cfg(**kw) -> ProposalConfig:
    return ProposalConfig(**kw)


def _two_region_features(obj_rows: slice, obj_cols: slice, h: int = 4, w: int = 4) -> torch.Tensor:
    """(1, 3, h, w): object cells carry e0, the rest e1 (cosine 1 within, 0 across)."""
    x = torch.zeros(1, 3, h, w)
    x[0, 1] = 1.0
    x[0, 1, obj_rows, obj_cols] = 0.0
    x[0, 0, obj_rows, obj_cols] = 1.0
    return x


# ---------------------------------------------------------------------------------------------
# Steps 2-5


def test_resize_valid_crops_matches_interpolate_and_ignores_padding():
    torch.manual_seed(0)
    sizes = [(9, 11), (7, 6)]
    x = torch.randn(2, 5, 9, 11)
    x[1, :, 7:, :] = 1e6  # garbage in image 1's padding must not leak in
    x[1, :, :, 6:] = -1e6
    for scale in (0.5, 0.25, 0.7):
        y, out_sizes = resize_valid_crops(x, sizes, scale)
        for i, (hv, wv) in enumerate(sizes):
            hs, ws = out_sizes[i]
            assert (hs, ws) == (max(1, math.floor(hv * scale)), max(1, math.floor(wv * scale)))
            ref = F.interpolate(
                x[i : i + 1, :, :hv, :wv], size=(hs, ws), mode="bilinear", align_corners=False
            )
            torch.testing.assert_close(y[i : i + 1, :, :hs, :ws], ref, atol=1e-5, rtol=1e-6)
            assert not y[i, :, hs:, :].any() and not y[i, :, :, ws:].any()


def test_make_seeds_counts_positions_and_norm():
    torch.manual_seed(0)
    x = torch.randn(2, 8, 6, 8)
    sizes = [(6, 8), (4, 5)]
    x = x * valid_cell_mask(sizes, 6, 8, x.device)[:, None]
    seeds, valid, pos = make_seeds(x, sizes, [1.0, 0.5])
    # padded grids: 6x8 at scale 1, 3x4 at scale 0.5
    assert seeds.shape == (2, 6 * 8 + 3 * 4, 8) and pos.shape == (60, 3)
    assert valid[0].sum() == 48 + 12 and valid[1].sum() == 20 + 2 * 2
    assert pos[0].tolist() == [0, 0, 0] and pos[48].tolist() == [1, 0, 0]
    assert pos[59].tolist() == [1, 2, 3]
    norms = seeds.norm(dim=-1)
    torch.testing.assert_close(norms[valid], torch.ones(int(valid.sum())))
    assert (norms[~valid] == 0).all()
    # a scale-1 seed is the normalised feature of its own cell
    r, c = 3, 4
    torch.testing.assert_close(seeds[1, r * 8 + c], F.normalize(x[1, :, r, c], dim=0))


def test_minmax_normalise_uses_valid_cells_only():
    maps = torch.tensor([[[0.2, 0.6, 1.0, 9.0], [0.5, 0.5, 0.5, -9.0]]])  # (1, 2, 4)
    valid = torch.tensor([[True, True, True, False]])
    soft = minmax_normalise(maps.clone(), valid)
    torch.testing.assert_close(soft[0, 0], torch.tensor([0.0, 0.5, 1.0, 0.0]))
    # a constant map (over valid cells) has no salient part: all zero
    torch.testing.assert_close(soft[0, 1], torch.zeros(4))


def test_hard_masks_and_maskness_by_hand():
    soft = torch.tensor([[[0.9, 0.5, 0.3, 1.0], [0.2, 0.1, 0.0, 0.0]]])
    hard, area = hard_masks(soft, 0.5, torch.ones(1, 4, dtype=torch.bool))
    assert hard.tolist() == [[[1, 1, 0, 1], [0, 0, 0, 0]]]
    assert area.tolist() == [[3, 0]]
    # an invalid cell is never in a hard mask
    hard_v, area_v = hard_masks(soft, 0.5, torch.tensor([[True, True, True, False]]))
    assert hard_v[0, 0].tolist() == [1, 1, 0, 0] and area_v.tolist() == [[2, 0]]
    torch.testing.assert_close(
        maskness(soft, hard, area), torch.tensor([[(0.9 + 0.5 + 1.0) / 3, 0.0]])
    )


# ---------------------------------------------------------------------------------------------
# Step 6


def _solo_reference(masks: np.ndarray, sigma: float) -> np.ndarray:
    """SOLOv2's formula written out with loops: decay_j = min_i f(iou_ij) / f(comp_i)."""
    n = len(masks)
    iou = np.zeros((n, n))
    for i in range(n):
        for j in range(i + 1, n):
            inter = np.logical_and(masks[i], masks[j]).sum()
            iou[i, j] = inter / np.logical_or(masks[i], masks[j]).sum()
    comp = iou.max(axis=0)
    return np.array(
        [
            min(
                math.exp(-sigma * iou[i, j] ** 2) / math.exp(-sigma * comp[i] ** 2)
                for i in range(n)
            )
            for j in range(n)
        ]
    )


def test_matrix_nms_decay_by_hand():
    cells = [range(0, 4), range(2, 6), range(3, 8)]  # 1-D masks on 10 cells, ranked 0 > 1 > 2
    masks = torch.zeros(1, 4, 10)
    for k, r in enumerate(cells):
        masks[0, k, list(r)] = 1
    masks[0, 3] = 1  # a padded slot: its garbage must be ignored
    valid = torch.tensor([[True, True, True, False]])
    decay = matrix_nms_decay(masks, valid, sigma=2.0)
    # iou01 = 2/6, iou02 = 1/8, iou12 = 3/6; comp = (0, 1/3, 1/2)
    expect = [
        1.0,
        math.exp(-2 * (1 / 3) ** 2),
        min(math.exp(-2 / 64), math.exp(-2 * 0.25) / math.exp(-2 / 9)),
    ]
    torch.testing.assert_close(decay[0, :3], torch.tensor(expect), atol=1e-6, rtol=1e-6)
    assert decay[0, 2] == pytest.approx(math.exp(-2 * 0.25 + 2 / 9), abs=1e-6)


def test_matrix_nms_decay_matches_loop_reference():
    gen = torch.Generator().manual_seed(1)
    masks = torch.rand(2, 12, 30, generator=gen) > 0.6
    valid = torch.ones(2, 12, dtype=torch.bool)
    decay = matrix_nms_decay(masks, valid, sigma=2.0)
    for b in range(2):
        ref = _solo_reference(masks[b].numpy(), 2.0)
        np.testing.assert_allclose(decay[b].numpy(), ref, rtol=1e-5, atol=1e-6)
    assert (decay <= 1).all() and decay[:, 0].eq(1).all()


def test_suppress_pruning_equals_unpruned():
    gen = torch.Generator().manual_seed(2)
    b, n, cells = 3, 60, 40
    hard = torch.rand(b, n, cells, generator=gen) > 0.5
    scores = torch.rand(b, n, generator=gen)
    candidate = torch.rand(b, n, generator=gen) > 0.2
    floor, top_k = 0.6, 8
    full = suppress(scores, hard, candidate, 2.0, top_k, None)
    pruned = suppress(scores, hard, candidate, 2.0, top_k, floor)
    for i in range(b):
        keep_f = full[2][i] & (full[1][i] >= floor)
        keep_p = pruned[2][i] & (pruned[1][i] >= floor)
        assert keep_f.sum() > 0  # the case is not vacuous
        assert torch.equal(full[0][i][keep_f], pruned[0][i][keep_p])
        assert torch.equal(full[1][i][keep_f], pruned[1][i][keep_p])  # bit-exact


# ---------------------------------------------------------------------------------------------
# Steps 7-8


def test_upsample_masks_equals_interpolate_on_exact_grid():
    torch.manual_seed(0)
    soft = torch.rand(3, 5, 7)
    out = upsample_masks(soft, (40, 56), (40, 56), 8.0, 0.5)
    ref = F.interpolate(soft[None], size=(40, 56), mode="bilinear", align_corners=False)[0]
    assert out.shape == (3, 40, 56)
    agree = out == (ref >= 0.5)
    assert agree.float().mean() > 0.999  # only exact-threshold float ties may differ


def test_mask_boxes_and_shape_filter_by_hand():
    masks = torch.zeros(4, 10, 20, dtype=torch.bool)
    masks[0, 4:8, 3:9] = True  # centre y 6/10, width 6/20: kept
    masks[1, 0:2, 5:7] = True  # centre y 1/10 = 0.1: too high
    masks[2, 5:9, 0:19] = True  # width 19/20 = 0.95: not strictly narrower
    # masks[3] empty: dropped
    boxes = mask_boxes(masks)
    assert boxes[0].tolist() == [3.0, 4.0, 9.0, 8.0]
    assert boxes[2].tolist() == [0.0, 5.0, 19.0, 9.0]
    boxes, area, cy = mask_geometry(masks)
    assert area.tolist() == [24.0, 4.0, 76.0, 0.0]
    assert cy.tolist() == [6.0, 1.0, 7.0, 0.0]
    keep = shape_filter(boxes, area, cy, (10, 20), min_center_y=0.2, max_box_width=0.95)
    assert keep.tolist() == [True, False, False, False]
    # boundary: centre exactly at 0.2 of the height is not "below" it
    edge = torch.zeros(1, 10, 20, dtype=torch.bool)
    edge[0, 1:3, :4] = True  # pixel centres 1.5, 2.5 -> cy = 2.0 = 0.2 * 10
    assert not shape_filter(*mask_geometry(edge), (10, 20), 0.2, 0.95).item()
    assert shape_filter(*mask_geometry(edge), (10, 20), 0.19, 0.95).item()


def test_propose_two_regions_by_hand():
    """Object cells (rows 2-3, cols 1-2) vs background on a 4x4 grid, one scale."""
    x = _two_region_features(slice(2, 4), slice(1, 3))
    cfg = _cfg(scales=[1.0], top_k=20, score_threshold=0.5, min_center_y=0.2, max_box_width=0.95)
    (p,) = propose(x, [(4, 4)], [(32, 32)], [(64, 48)], 8.0, cfg)
    # The background mask (seed (0,0,0), ranked first) spans the full width: filtered out.
    # Every duplicate is decayed to exp(-2) < 0.5. One object mask remains, score 1.
    assert p.masks.shape == (1, 64, 48) and p.masks.dtype == torch.bool
    assert p.scores.tolist() == [1.0]
    assert p.seed_pos.tolist() == [[0, 2, 1]]  # first object cell in (row, column) order
    torch.testing.assert_close(p.seeds[0], torch.tensor([1.0, 0.0, 0.0]))
    # cells rows 2-3, cols 1-2 = resized px [16,32) x [8,24) -> original rows [32,64),
    # columns x with (x + 0.5) * 32/48 in [8, 24) -> x in 12..35
    assert p.boxes.tolist() == [[12.0, 32.0, 36.0, 64.0]]
    m = p.masks[0]
    assert m[32:, 12:36].sum() == m.sum()  # nothing outside the box
    assert m[40:, 12:36].all()  # full away from the top corners, which bilinear rounds off
    assert not m[32, 12] and m[32, 23]


def test_propose_score_and_centre_filters():
    x = _two_region_features(slice(2, 4), slice(1, 3))
    # duplicates decay to exp(-2) = 0.135: kept at threshold 0.1, not at 0.2
    low = _cfg(scales=[1.0], top_k=50, score_threshold=0.1, max_box_width=1.01)
    high = _cfg(scales=[1.0], top_k=50, score_threshold=0.2, max_box_width=1.01)
    (p_low,) = propose(x, [(4, 4)], [(32, 32)], [(32, 32)], 8.0, low)
    (p_high,) = propose(x, [(4, 4)], [(32, 32)], [(32, 32)], 8.0, high)
    assert len(p_high.scores) == 2 and p_high.scores.tolist() == [1.0, 1.0]
    assert len(p_low.scores) == 16  # all 16 seeds: 2 distinct masks + 14 decayed duplicates
    torch.testing.assert_close(p_low.scores[2:], torch.full((14,), math.exp(-2.0)))
    # top_k caps the count after NMS
    (p_k,) = propose(
        x,
        [(4, 4)],
        [(32, 32)],
        [(32, 32)],
        8.0,
        _cfg(scales=[1.0], top_k=5, score_threshold=0.1, max_box_width=1.01),
    )
    assert len(p_k.scores) == 5
    # an object in the top quarter (centre at 0.25 of the height) passes 0.2 but not 0.3
    top = _two_region_features(slice(0, 2), slice(1, 3))
    for min_cy, expect in ((0.2, 1), (0.3, 0)):
        cfg = _cfg(scales=[1.0], score_threshold=0.5, min_center_y=min_cy)
        (p,) = propose(top, [(4, 4)], [(32, 32)], [(32, 32)], 8.0, cfg)
        assert len(p.scores) == expect


def test_min_cells_drops_single_cell_masks():
    # orthogonal features: every seed's hard mask is its own cell
    x = torch.eye(16).view(16, 4, 4)[None]
    (p1,) = propose(
        x,
        [(4, 4)],
        [(16, 16)],
        [(16, 16)],
        4.0,
        _cfg(scales=[1.0], min_cells=1, score_threshold=0.5, min_center_y=0.0),
    )
    assert len(p1.scores) == 16 and (p1.scores == 1).all()
    # each mask is its own cell's 4x4 pixel block (interior corners rounded off by bilinear)
    r, c = p1.seed_pos[:, 1], p1.seed_pos[:, 2]
    assert torch.equal(p1.boxes, torch.stack([c * 4, r * 4, c * 4 + 4, r * 4 + 4], 1).float())
    (p2,) = propose(
        x,
        [(4, 4)],
        [(16, 16)],
        [(16, 16)],
        4.0,
        _cfg(scales=[1.0], min_cells=2, score_threshold=0.5, min_center_y=0.0),
    )
    assert len(p2.scores) == 0


def test_empty_result_shapes():
    torch.manual_seed(0)
    x = torch.randn(2, 6, 5, 5)
    cases = [
        (_cfg(score_threshold=1.01), True),
        (_cfg(score_threshold=1.01), False),
        (_cfg(min_cells=1000), True),
    ]
    for cfg, prune in cases:  # pruned away / filtered after NMS / no candidate at all
        out = propose(
            x, [(5, 5), (3, 4)], [(70, 70), (42, 56)], [(100, 90), (30, 40)], 14.0, cfg, prune=prune
        )
        for p, (h, w) in zip(out, [(100, 90), (30, 40)], strict=True):
            assert p.masks.shape == (0, h, w) and p.masks.dtype == torch.bool
            assert p.boxes.shape == (0, 4) and p.boxes.dtype == torch.float32
            assert p.scores.shape == (0,) and p.scores.dtype == torch.float32
            assert p.seeds.shape == (0, 6) and p.seeds.dtype == torch.float32
            assert p.seed_pos.shape == (0, 3) and p.seed_pos.dtype == torch.int64


def _assert_same(a, b):
    assert torch.equal(a.seed_pos, b.seed_pos)
    assert torch.equal(a.masks, b.masks)
    assert torch.equal(a.boxes, b.boxes)
    torch.testing.assert_close(a.scores, b.scores, atol=1e-6, rtol=0)
    torch.testing.assert_close(a.seeds, b.seeds, atol=1e-6, rtol=0)


def _random_batch():
    gen = torch.Generator().manual_seed(3)
    valid = [(10, 7), (6, 10)]
    resized = [(140, 98), (80, 140)]
    orig = [(200, 140), (60, 105)]
    x = torch.randn(2, 16, 10, 10, generator=gen)
    # smooth the features so the maps have object-like blobs (more candidates, more overlap)
    # all-positive cosines, like ReLU features: padding (zero after masking) would change the
    # per-map minimum if it were not excluded
    x = F.avg_pool2d(x, 3, 1, 1, count_include_pad=False) + 0.5
    x[0, :, :, 7:] = 50.0  # padding garbage
    x[1, :, 6:, :] = -50.0
    return x, valid, resized, orig


def test_batched_equals_per_image():
    x, valid, resized, orig = _random_batch()
    cfg = _cfg(score_threshold=0.5, min_center_y=0.0, max_box_width=1.01)
    batched = propose(x, valid, resized, orig, 14.0, cfg)
    assert sum(len(p.scores) for p in batched) >= 4  # not a vacuous comparison
    for i in range(2):
        hv, wv = valid[i]
        (alone,) = propose(
            x[i : i + 1, :, :hv, :wv].clone(), [valid[i]], [resized[i]], [orig[i]], 14.0, cfg
        )
        _assert_same(batched[i], alone)


def test_pruned_propose_equals_unpruned(monkeypatch):
    x, valid, resized, orig = _random_batch()
    cfg = _cfg(score_threshold=0.7, top_k=6, min_center_y=0.0, max_box_width=1.01)
    counts = []
    real = saliency.suppress

    def counting(scores, hard, candidate, sigma, top_k, score_floor=None):
        if score_floor is not None:
            counts.append((int(candidate.sum()), int((candidate & (scores >= score_floor)).sum())))
        return real(scores, hard, candidate, sigma, top_k, score_floor)

    monkeypatch.setattr(saliency, "suppress", counting)
    fast = propose(x, valid, resized, orig, 14.0, cfg, prune=True)
    slow = propose(x, valid, resized, orig, 14.0, cfg, prune=False)
    before, after = counts[0]
    assert after < before / 2  # pruning removed most candidates here ...
    assert sum(len(p.scores) for p in fast) >= 3  # ... and masks were still kept
    for a, b in zip(fast, slow, strict=True):
        _assert_same(a, b)
        assert torch.equal(a.scores, b.scores)


def test_outputs_original_size_and_boxes_match_masks():
    x, valid, resized, orig = _random_batch()
    out = propose(x, valid, resized, orig, 14.0, _cfg(score_threshold=0.5))
    for p, (h, w) in zip(out, orig, strict=True):
        assert p.masks.shape[1:] == (h, w)
        assert (p.scores[:-1] >= p.scores[1:]).all()
        assert (p.scores >= 0.5).all()
        for m, box in zip(p.masks.numpy(), p.boxes.tolist(), strict=True):
            ys, xs = np.nonzero(m)
            assert box == [xs.min(), ys.min(), xs.max() + 1, ys.max() + 1]
            assert (xs.max() + 1 - xs.min()) / w < 0.95 and (ys + 0.5).mean() / h > 0.2


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_cuda_matches_cpu():
    x, valid, resized, orig = _random_batch()
    cfg = _cfg(score_threshold=0.5, min_center_y=0.0, max_box_width=1.01)
    cpu = propose(x, valid, resized, orig, 14.0, cfg)
    gpu = propose(x.cuda(), valid, resized, orig, 14.0, cfg)
    for a, b in zip(cpu, gpu, strict=True):
        assert b.masks.device.type == "cuda"
        b = type(b)(*(t.cpu() for t in (b.masks, b.boxes, b.scores, b.seeds, b.seed_pos)))
        assert torch.equal(a.seed_pos, b.seed_pos)
        assert (a.masks != b.masks).float().mean() < 1e-3
        torch.testing.assert_close(a.scores, b.scores, atol=1e-5, rtol=0)
