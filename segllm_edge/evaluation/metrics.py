"""Per-round segmentation metrics with the SegLLM research code's definitions (``LLaVATrainer.evaluate``):

* **mIoU** (gIoU): the mean over a round's masks of each mask's IoU with its ground truth;
* **oIoU** (cIoU): the round's summed intersections over its summed unions. The research code counts
  pixels in the 1024×1024 model frame (the image resized so its longer side is 1024, then padded), so every
  image weighs the same whatever its size; here masks are compared at the original size and each image's
  counts are scaled by (1024 / longer side)², which is the same weighting;
* **P@0.5**: the fraction of a round's predictions whose **box** IoU with the ground-truth box is above 0.5
  (strictly, as there).

A mask pair that is empty on both sides has IoU 1 (nothing to find, nothing found); its counts add 0 to cIoU.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

MODEL_FRAME = 1024


def mask_counts(pred: np.ndarray, gt: np.ndarray) -> tuple[int, int]:
    """(intersection, union) pixel counts of two boolean masks of the same shape."""
    pred, gt = np.asarray(pred, bool), np.asarray(gt, bool)
    if pred.shape != gt.shape:
        raise ValueError(f"mask shapes differ: prediction {pred.shape}, ground truth {gt.shape}")
    return int(np.logical_and(pred, gt).sum()), int(np.logical_or(pred, gt).sum())


def mask_box(mask: np.ndarray) -> tuple[float, float, float, float] | None:
    """xyxy box around a boolean mask (pixel edges: a single pixel at (x, y) is [x, y, x+1, y+1]); None if empty."""
    ys, xs = np.nonzero(np.asarray(mask, bool))
    if len(xs) == 0:
        return None
    return float(xs.min()), float(ys.min()), float(xs.max() + 1), float(ys.max() + 1)


def box_iou(a, b) -> float:
    """IoU of two xyxy boxes; 0 when either is missing or degenerate."""
    if a is None or b is None:
        return 0.0
    ax0, ay0, ax1, ay1 = map(float, a)
    bx0, by0, bx1, by1 = map(float, b)
    iw, ih = max(0.0, min(ax1, bx1) - max(ax0, bx0)), max(0.0, min(ay1, by1) - max(ay0, by0))
    inter = iw * ih
    union = (ax1 - ax0) * (ay1 - ay0) + (bx1 - bx0) * (by1 - by0) - inter
    return inter / union if union > 0 else 0.0


@dataclass(frozen=True)
class RoundScore:
    """One predicted round against its ground truth."""
    round: int            # 1-based round of its conversation
    iou: float            # mask IoU
    inter: float          # intersection, in model-frame pixels
    union: float          # union, in model-frame pixels
    box_iou: float

    def to_dict(self) -> dict:
        return {"round": self.round, "iou": self.iou, "inter": self.inter, "union": self.union, "box_iou": self.box_iou}


def score_round(round_index: int, pred_mask, gt_mask, pred_box=None, gt_box=None) -> RoundScore:
    """Score one round at the original image size; boxes default to the boxes around the masks."""
    inter, union = mask_counts(pred_mask, gt_mask)
    scale = (MODEL_FRAME / max(np.asarray(gt_mask).shape[:2])) ** 2
    iou = 1.0 if union == 0 else inter / union
    pb = mask_box(pred_mask) if pred_box is None else pred_box
    gb = mask_box(gt_mask) if gt_box is None else gt_box
    return RoundScore(round_index, iou, inter * scale, union * scale, box_iou(pb, gb))


@dataclass
class RoundMetrics:
    round: int
    n: int = 0
    iou_sum: float = 0.0
    inter: float = 0.0
    union: float = 0.0
    hits: int = 0
    scores: list = field(default_factory=list, repr=False)

    @property
    def giou(self) -> float:
        return self.iou_sum / self.n if self.n else float("nan")

    @property
    def ciou(self) -> float:
        return self.inter / self.union if self.union else float("nan")

    @property
    def precision_at_05(self) -> float:
        return self.hits / self.n if self.n else float("nan")

    def to_dict(self) -> dict:
        return {"round": self.round, "n": self.n, "gIoU": self.giou, "cIoU": self.ciou, "P@0.5": self.precision_at_05}


def aggregate(scores) -> list[RoundMetrics]:
    """Per-round metrics, rounds in order (round r gathers the r-th round of every conversation)."""
    by_round: dict[int, RoundMetrics] = {}
    for s in scores:
        m = by_round.setdefault(s.round, RoundMetrics(s.round))
        m.n += 1
        m.iou_sum += s.iou
        m.inter += s.inter
        m.union += s.union
        m.hits += int(s.box_iou > 0.5)
    return [by_round[r] for r in sorted(by_round)]
