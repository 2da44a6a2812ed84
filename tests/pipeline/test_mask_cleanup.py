"""Issue 22's clean-up steps on hand-made masks, and the reasons recorded for empty images."""

from __future__ import annotations

import dataclasses

import torch

from pipeline.config import ProposalConfig
from pipeline.saliency.cleanup import (
    clean_kept,
    component_labels,
    duplicates,
    fill_holes,
    keep_peak_component,
    split_pieces,
)
from pipeline.saliency.empty_reasons import before_filters
from pipeline.saliency.propose import propose
from pipeline.shards.plan import compute_fingerprint, result_settings


def disc(h: int, w: int, cy: float, cx: float, r: float) -> torch.Tensor:
    yy, xx = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    return (yy - cy) ** 2 + (xx - cx) ** 2 <= r * r


def object_with_specks() -> tuple[torch.Tensor, torch.Tensor]:
    """A 6x6 object with a one-cell hole, its peak inside, and two one-cell specks far away."""
    mask = torch.zeros(12, 20, dtype=torch.bool)
    mask[2:8, 2:8] = True
    mask[4, 4] = False  # the hole
    mask[1, 18] = mask[10, 15] = True  # specks
    soft = mask.float() * 0.8
    soft[3, 3] = 1.0  # the seed's own cell: the map's peak
    return mask[None], soft[None]


def test_component_labels_finds_4_connected_pieces():
    m = torch.zeros(1, 5, 5, dtype=torch.bool)
    m[0, 0, 0] = m[0, 1, 1] = True  # corner contact only: two pieces
    m[0, 3:5, 3:5] = True
    labels = component_labels(m)[0]
    assert len(set(labels[m[0]].tolist())) == 3
    assert int(labels[3, 3]) == int(labels[4, 4])


def test_keep_peak_component_drops_specks_and_fill_holes_fills():
    mask, soft = object_with_specks()
    kept = keep_peak_component(mask, soft, piece_share=0.5)
    assert not kept[0, 1, 18] and not kept[0, 10, 15]  # specks dropped
    assert int(kept.sum()) == 35  # the object, hole still open
    filled = fill_holes(kept, hole_share=0.1)
    assert filled[0, 4, 4] and int(filled.sum()) == 36
    assert not fill_holes(kept, hole_share=0.01)[0, 4, 4]  # 1 cell > 1% of 35: kept open


def test_keep_peak_component_keeps_large_second_piece():
    mask = torch.zeros(1, 10, 20, dtype=torch.bool)
    mask[0, 1:5, 1:5] = True  # 16 cells, the peak
    mask[0, 1:5, 10:13] = True  # 12 cells: above half of the peak's piece
    soft = mask.float()
    soft[0, 2, 2] = 1.5
    assert int(keep_peak_component(mask, soft, 0.5).sum()) == 28
    assert int(keep_peak_component(mask, soft, 0.8).sum()) == 16


def test_clean_kept_scores_the_cleaned_mask():
    mask, soft = object_with_specks()
    cfg = ProposalConfig(keep_component=True, hole_share=0.1, score_threshold=0.5)
    maps, scores, parent = clean_kept(soft, torch.ones(1), 0.5, cfg)
    assert parent.tolist() == [0]
    cleaned = maps[0] >= 0.5
    assert cleaned[4, 4] and not cleaned[1, 18] and int(cleaned.sum()) == 36
    # maskness of the cleaned mask: 34 cells at 0.8, the peak at 1.0, the hole raised to 0.5
    assert abs(float(scores[0]) - (34 * 0.8 + 1.0 + 0.5) / 36) < 1e-6


def test_duplicates_removes_nested_copy_keeps_disjoint_objects():
    a = torch.zeros(16, 16, dtype=torch.bool)
    a[1:11, 1:11] = True
    nested = torch.zeros_like(a)
    nested[2:11, 1:11] = True  # inside a, IoU 0.9
    other = torch.zeros_like(a)
    other[12:16, 12:16] = True
    assert duplicates(torch.stack([a, nested, other]), 0.5).tolist() == [False, True, False]
    assert duplicates(torch.stack([a, nested, other]), 0.95).tolist() == [False, False, False]


def test_split_makes_one_instance_per_separated_disc():
    two = disc(20, 40, 10, 9, 6) | disc(20, 40, 10, 30, 6)
    one = disc(20, 40, 10, 20, 7)
    pieces, parent = split_pieces(torch.stack([two, one]), split_share=0.5, min_cells=2)
    assert parent.tolist() == [0, 0, 1]
    assert (pieces[0] | pieces[1]).equal(two) and not (pieces[0] & pieces[1]).any()
    assert pieces[2].equal(one)
    # a disc and a speck: the speck is not object-sized, the mask stays whole
    speck = disc(20, 40, 10, 9, 6)
    speck[0, 39] = True
    pieces, parent = split_pieces(speck[None], split_share=0.5, min_cells=2)
    assert parent.tolist() == [0] and pieces[0].equal(speck)


# --------------------------------------------------------------------------------------------
# The whole stage on hand-made features: one compact object and one far speck of its texture


def object_and_speck_features() -> torch.Tensor:
    """(1, 4, 12, 20) features: a 5x5 object of texture ``a``, a far corner cell of nearly the
    same texture, and background ``b`` orthogonal to both."""
    x = torch.zeros(1, 4, 12, 20)
    x[0, 1] = 1.0  # background b
    x[0, :, 4:9, 0:5] = torch.tensor([1.0, 0.0, 0.0, 0.0])[:, None, None]
    x[0, :, 0, 19] = torch.tensor([1.0, 0.0, 0.1, 0.0])
    return x


def run_stage(cfg: ProposalConfig):
    x = object_and_speck_features()
    return propose(x, [(12, 20)], [(12 * 14, 20 * 14)], [(12 * 14, 20 * 14)], 14.0, cfg)[0]


def paper_cfg(**kw) -> ProposalConfig:
    base = dict(scales=[1.0], min_center_y=0.0, max_box_width=0.95, score_threshold=0.5)
    return ProposalConfig(**{**base, **kw})


def test_width_filter_sees_the_object_once_cleaned():
    paper = run_stage(paper_cfg())
    assert len(paper.masks) == 0  # the speck widens every object box to the whole image
    assert paper.empty_reason.startswith("box_width:")
    cleaned = run_stage(paper_cfg(keep_component=True))
    assert len(cleaned.masks) >= 1
    x0, y0, x1, y1 = cleaned.boxes[0].tolist()
    assert (x0, y0, x1, y1) == (0, 4 * 14, 5 * 14, 9 * 14) or x1 - x0 < 0.5 * 20 * 14


def test_empty_reason_all_below_score_threshold():
    # noise features and a low mask threshold: every map's mask is large and its mean low
    x = torch.randn(1, 8, 12, 20, generator=torch.Generator().manual_seed(0))
    cfg = paper_cfg(score_threshold=0.9, mask_threshold=0.05)
    p = propose(x, [(12, 20)], [(168, 280)], [(168, 280)], 14.0, cfg)[0]
    assert len(p.masks) == 0 and p.empty_reason.startswith("score:")


def test_duplicates_never_empty_an_image_nms_reason_only_when_nothing_kept():
    # every object seed has the same map: NMS decays the copies, the best one stays
    p = run_stage(paper_cfg(max_box_width=1.01))
    assert len(p.masks) >= 1 and p.empty_reason == ""
    cfg = ProposalConfig()
    assert before_filters(5, 3, 0, 0, 0.9, cfg).startswith("nms:")
    assert before_filters(0, 0, 0, 0, 0.0, cfg).startswith("min_cells:")
    assert before_filters(5, 3, 2, 0, 0.9, cfg).startswith("cleanup:")


def test_cleanup_settings_enter_the_fingerprint_only_when_on():
    paper = ProposalConfig()
    assert not paper.cleans()
    assert "dup_iou" not in result_settings(paper)
    on = dataclasses.replace(paper, dup_iou=0.5)
    assert result_settings(on)["dup_iou"] == 0.5
    assert compute_fingerprint("resnet50", "w", paper) != compute_fingerprint("resnet50", "w", on)
