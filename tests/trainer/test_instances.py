"""Mask NMS of decoded detections (``trainer.inference.instances.mask_nms``)."""

from __future__ import annotations

import numpy as np
from pycocotools import mask as mask_util

from trainer.inference.instances import mask_nms


def test_mask_nms_compares_each_detection_with_every_kept_one_of_its_class():
    masks = np.zeros((4, 20, 20), np.uint8)
    masks[0, 0:10, 0:10] = 1  # best
    masks[1, 10:20, 10:20] = 1  # disjoint from it: kept
    masks[2, 0:10, 0:9] = 1  # IoU 0.9 with the best: dropped (compared with two kept masks)
    masks[3, 0:10, 0:10] = 1  # the best's mask in another class: kept
    rles = mask_util.encode(np.asfortranarray(masks.transpose(1, 2, 0)))
    scores = np.array([0.9, 0.8, 0.7, 0.6], np.float32)
    labels = np.array([0, 0, 0, 1])
    assert mask_nms(rles, scores, labels, 0.5).tolist() == [0, 1, 3]
    assert mask_nms(rles, scores, labels, 0.95).tolist() == [0, 1, 2, 3]
