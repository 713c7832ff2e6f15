"""Instance selection for one ``<seg>`` in numpy: the runtime's implementation of
:mod:`segllm_edge.modeling.hipie.selection` (the PyTorch reference, whose docstring gives the algorithm:
drop the background queries, class probs, torchvision-style batched NMS 0.7, top-k, target class).
Tests check the two agree on the golden outputs."""
from __future__ import annotations

import numpy as np

NUM_BG = 10
IMAGE_SIZE = 1024
NMS_IOU = 0.7
MAX_INST = 100


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return (1.0 / (1.0 + np.exp(-x.astype(np.float64)))).astype(np.float32)


def box_cxcywh_to_xyxy(b: np.ndarray) -> np.ndarray:
    cx, cy, w, h = np.moveaxis(b, -1, 0)
    return np.stack([cx - 0.5 * w, cy - 0.5 * h, cx + 0.5 * w, cy + 0.5 * h], axis=-1)


def nms(boxes: np.ndarray, scores: np.ndarray, iou_threshold: float) -> np.ndarray:
    """torchvision CPU ``nms``: greedy in stable descending score order, suppress IoU > threshold."""
    boxes = boxes.astype(np.float32)
    x1, y1, x2, y2 = boxes.T
    areas = (x2 - x1) * (y2 - y1)
    order = np.argsort(-scores, kind="stable")
    suppressed = np.zeros(boxes.shape[0], dtype=bool)
    keep = []
    for i in order.tolist():
        if suppressed[i]:
            continue
        keep.append(i)
        inter = (np.maximum(np.minimum(x2[i], x2) - np.maximum(x1[i], x1), 0)
                 * np.maximum(np.minimum(y2[i], y2) - np.maximum(y1[i], y1), 0))
        suppressed |= inter / (areas[i] + areas - inter) > iou_threshold
    return np.array(keep, dtype=np.int64)


def batched_nms(boxes: np.ndarray, scores: np.ndarray, idxs: np.ndarray, iou_threshold: float) -> np.ndarray:
    """torchvision ``batched_nms`` (coordinate trick): shift each group by idx * (max coordinate + 1)."""
    if boxes.size == 0:
        return np.empty((0,), dtype=np.int64)
    offsets = idxs.astype(boxes.dtype) * (boxes.max() + boxes.dtype.type(1))
    return nms(boxes + offsets[:, None], scores, iou_threshold)


def select_instance(outputs: dict, index: int = -1) -> dict:
    """Selection for one ``<seg>`` row of the mask decoder's outputs (numpy arrays).

    Returns query_index (fg index 0..99), score, label, box_xyxy (4,) in 1024 px (may exceed the frame) and,
    when ``outputs`` has ``pred_masks``, mask_logits (256, 256), plus the intermediates the PyTorch reference returns.
    """
    logits = np.asarray(outputs["pred_logits"][index], dtype=np.float32)[NUM_BG:]
    boxes = np.asarray(outputs["pred_boxes"][index], dtype=np.float32)[NUM_BG:]
    ious = np.asarray(outputs["pred_boxious"][index], dtype=np.float32)[NUM_BG:]

    cls = np.stack([logits[:, 0:4].mean(-1), logits[:, 4:8].mean(-1)], axis=-1)
    prob = np.sqrt(_sigmoid(cls) * _sigmoid(ious))                                     # Q,2
    nms_labels = prob.argmax(1)
    nms_scores = prob.max(1)
    boxes_xyxy = box_cxcywh_to_xyxy(boxes)
    keep = batched_nms(boxes_xyxy, nms_scores, nms_labels, NMS_IOU)
    flat = prob[keep].reshape(-1)
    k = min(MAX_INST, flat.size)
    top_idx = np.argsort(-flat, kind="stable")[:k]
    top_vals = flat[top_idx]
    ncls = prob.shape[1]
    labels = top_idx % ncls
    fg_ids = keep[top_idx // ncls]
    inst_boxes = box_cxcywh_to_xyxy(boxes[fg_ids]) * np.float32(IMAGE_SIZE)
    scores = np.where(labels == 0, np.float32(-1), top_vals)
    best = int(scores.argmax())
    q = int(fg_ids[best])
    out = {
        "query_index": q,
        "score": float(top_vals[best]),
        "label": int(labels[best]),
        "box_xyxy": inst_boxes[best].copy(),
        "nms_boxes_xyxy": boxes_xyxy,
        "nms_scores": nms_scores,
        "nms_labels": nms_labels,
        "nms_keep": keep,
        "inst_scores": top_vals,
        "inst_pred_classes": labels,
        "inst_pred_boxes": inst_boxes,
        "inst_fg_query_ids": fg_ids,
        "selected_instance_index": best,
    }
    if "pred_masks" in outputs:  # the caller may fetch only the selected query's mask (see mask_row)
        out["mask_logits"] = mask_row(outputs["pred_masks"], index, q)
    return out


def mask_row(pred_masks, index: int, query_index: int) -> np.ndarray:
    """The (256, 256) logits of foreground query ``query_index`` of ``<seg>`` row ``index`` of ``pred_masks``
    ((n, 110, 256, 256) or (n, 110, 1, 256, 256)); a device tensor is indexed before it is copied to the host.
    A copy that owns its 256 KB: a view would keep the whole ``pred_masks`` (~29 MB per ``<seg>``) alive for as
    long as the round result is kept (every round of a conversation; it was the server's PSS creep)."""
    m = pred_masks[index][NUM_BG + query_index]
    if hasattr(m, "detach"):
        m = m.detach().float().cpu().numpy()
    m = np.array(m, dtype=np.float32, copy=True)
    return m.reshape(m.shape[-2], m.shape[-1])
