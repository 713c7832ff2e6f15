"""The per-round metrics against hand-computed values (no model run)."""
from __future__ import annotations

import math

import numpy as np
import pytest

from segllm_edge.evaluation.metrics import aggregate, box_iou, mask_box, mask_counts, score_round


def _mask(shape, *rects):
    m = np.zeros(shape, bool)
    for y0, y1, x0, x1 in rects:
        m[y0:y1, x0:x1] = True
    return m


def test_mask_counts_box_and_box_iou_by_hand():
    gt = _mask((8, 8), (0, 4, 0, 4))           # 16 px
    pred = _mask((8, 8), (2, 6, 2, 6))         # 16 px, overlap 2x2
    assert mask_counts(pred, gt) == (4, 28)
    assert mask_box(gt) == (0, 0, 4, 4) and mask_box(np.zeros((3, 3))) is None
    assert box_iou((0, 0, 4, 4), (2, 2, 6, 6)) == pytest.approx(4 / 28)
    assert box_iou((0, 0, 2, 2), (2, 2, 4, 4)) == 0.0 and box_iou(None, (0, 0, 1, 1)) == 0.0
    with pytest.raises(ValueError, match="mask shapes differ"):
        mask_counts(np.zeros((2, 2)), np.zeros((3, 3)))


def test_per_round_giou_ciou_and_precision_by_hand():
    # two conversations on 512x256 images (counts scaled by (1024/512)^2 = 4), one on a 1024x1024 image
    small = (512, 256)
    s = [
        # conversation A: round 1 perfect (IoU 1), round 2 IoU 1/3
        score_round(1, _mask(small, (0, 10, 0, 10)), _mask(small, (0, 10, 0, 10))),
        score_round(2, _mask(small, (0, 10, 0, 20)), _mask(small, (0, 10, 10, 30))),
        # conversation B: round 1 IoU 0.5 (box IoU 0.5: not a hit, the threshold is strict)
        score_round(1, _mask((1024, 1024), (0, 10, 0, 20)), _mask((1024, 1024), (0, 10, 0, 10))),
    ]
    assert [x.iou for x in s] == [1.0, pytest.approx(1 / 3), 0.5]
    assert s[0].inter == 400 and s[0].union == 400 and s[2].inter == 100 and s[2].union == 200
    r1, r2 = aggregate(s)
    assert (r1.round, r1.n, r2.round, r2.n) == (1, 2, 2, 1)
    assert r1.giou == pytest.approx(0.75)                       # mean of 1 and 0.5
    assert r1.ciou == pytest.approx((400 + 100) / (400 + 200))  # summed counts, model-frame pixels
    assert r1.precision_at_05 == 0.5                            # A hits (box IoU 1), B does not (exactly 0.5)
    assert r2.giou == pytest.approx(1 / 3) and r2.ciou == pytest.approx(1 / 3) and r2.precision_at_05 == 0.0
    assert r1.to_dict() == {"round": 1, "n": 2, "gIoU": r1.giou, "cIoU": r1.ciou, "P@0.5": 0.5}


def test_empty_prediction_and_empty_ground_truth():
    empty = np.zeros((4, 4), bool)
    both = score_round(1, empty, empty)
    assert both.iou == 1.0 and both.union == 0 and both.box_iou == 0.0
    missed = score_round(1, empty, _mask((4, 4), (0, 2, 0, 2)))
    assert missed.iou == 0.0 and missed.box_iou == 0.0
    (r,) = aggregate([missed])
    assert r.ciou == 0.0 and r.giou == 0.0
    assert math.isnan(aggregate([both])[0].ciou)  # nothing to find anywhere: cIoU undefined
