"""The inference rule of query-based models: class vs maskness scores, and the NMS switch."""

import numpy as np
import pytest
import torch

from tests.trainer.test_model import FakeViT
from trainer.config import ModelConfig
from trainer.inference.instances import select
from trainer.model.factory import build_model
from trainer.model.scoring import detection_scores, mask_scores, resolve_score_form


def _stage():
    logits = torch.logit(torch.tensor([[[0.9], [0.6]]]))  # 2 kernels, 1 class
    masks = torch.full((1, 2, 2, 2), -20.0)
    masks[0, 0, 0, 0] = torch.logit(torch.tensor(0.55))  # a vague one-cell blob
    masks[0, 1, :, :] = torch.logit(torch.tensor(0.95))  # a confident whole mask
    return {"logits": logits, "masks": masks}


def test_mask_score_is_mean_probability_inside_the_binary_mask():
    torch.testing.assert_close(mask_scores(_stage()["masks"]), torch.tensor([[0.55, 0.95]]))
    empty = torch.full((1, 1, 3, 3), -5.0)
    assert float(mask_scores(empty)) == 0.0


def test_knet_scores_by_class_unless_maskness_is_asked():
    stage = _stage()
    cfg = ModelConfig(num_kernels=2, channels=16, num_heads=2, ffn_dim=32)
    knet = build_model(cfg, FakeViT(), 1)
    torch.testing.assert_close(detection_scores(knet, stage)[0, :, 0], torch.tensor([0.9, 0.6]))
    knet.test_score = "maskness"
    scored = detection_scores(knet, stage)[0, :, 0]
    torch.testing.assert_close(scored, torch.tensor([0.9 * 0.55, 0.6 * 0.95]))
    assert scored[1] > scored[0]  # the confident mask now ranks first


def test_score_form_is_checked_and_resolved_per_kind():
    assert resolve_score_form("auto", "knet") == "class"
    assert resolve_score_form("auto", "mask2former") == "maskness"
    with pytest.raises(ValueError, match="test_score"):
        resolve_score_form("area", "knet")


def test_mask_nms_drops_only_the_lower_scored_duplicates():
    masks = np.zeros((5, 8, 8), np.uint8)
    masks[0, :4, :4] = 1
    masks[1, :4, :3] = 1  # IoU 0.75 with mask 0, scored lower: a duplicate
    masks[2, 4:, 4:] = 1  # disjoint
    masks[3, 4:, 5:] = 1  # IoU 0.75 with mask 2 (compared with two kept masks)
    masks[4, :4, :3] = 1  # the same pixels as mask 1, but another class: kept
    scores = np.array([0.9, 0.8, 0.7, 0.65, 0.6], np.float32)
    labels = np.array([0, 0, 0, 0, 1], np.int64)
    _, kept_scores, kept_labels, _ = select(masks, scores, labels, nms_iou=0.5)
    np.testing.assert_allclose(kept_scores, [0.9, 0.7, 0.6])
    np.testing.assert_array_equal(kept_labels, [0, 0, 1])
    _, no_nms, _, _ = select(masks, scores, labels, nms_iou=0.0)
    assert len(no_nms) == 5


def test_query_only_keys_never_make_mask_rcnn_runs_differ():
    from trainer.config_compat import comparable

    def tree(kind, score):
        return {"model": {"kind": kind, "test_score": score, "roi_samples": 128}, "maskrcnn": {}}

    assert comparable(tree("maskrcnn", "auto")) == comparable(tree("maskrcnn", "maskness"))
    assert comparable(tree("knet", "auto")) != comparable(tree("knet", "maskness"))
    assert comparable(tree("mask2former", "auto")) != comparable(tree("mask2former", "class"))
    assert "roi_samples" not in comparable(tree("knet", "auto"))["model"]
