"""Inference-time selection of one instance per ``<seg>`` (outside the exported graph).

Reproduces ``HIPIE_IMG.inference`` (task "detection", OTA, score_thres 0, IoU branch on) followed by SegLLM's
choice in ``HIPIESementator.segment_mask``:
  1. drop the 10 background queries;
  2. class score per query: class 1 ("reference") = mean of token logits 0-3, class 2 ("target") = mean of 4-7;
  3. prob = sqrt(sigmoid(class score) * sigmoid(iou logit))                      (100, 2)
  4. torchvision ``batched_nms`` (IoU 0.7) on normalised xyxy boxes, score = max class prob, group = argmax class
     (the coordinate-offset variant torchvision uses for < 4000 boxes, reproduced here);
  5. top-k over the flattened (kept x 2) probs, k = min(100, 2 * kept); boxes scaled to the 1024 frame;
  6. scores of class-1 instances set to -1, the argmax is the answer (if none is class 2, argmax picks index 0).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

NUM_BG = 10
IMAGE_SIZE = 1024
NMS_IOU = 0.7
MAX_INST = 100
MASK_THRESHOLD = 0.5


def box_cxcywh_to_xyxy(b: torch.Tensor) -> torch.Tensor:
    cx, cy, w, h = b.unbind(-1)
    return torch.stack([cx - 0.5 * w, cy - 0.5 * h, cx + 0.5 * w, cy + 0.5 * h], dim=-1)


def nms(boxes: torch.Tensor, scores: torch.Tensor, iou_threshold: float) -> torch.Tensor:
    """torchvision CPU ``nms``: greedy in stable descending score order, suppress IoU > threshold."""
    boxes = boxes.float()
    x1, y1, x2, y2 = boxes.unbind(-1)
    areas = (x2 - x1) * (y2 - y1)
    order = torch.sort(scores, dim=0, descending=True, stable=True)[1]
    suppressed = torch.zeros(boxes.shape[0], dtype=torch.bool)
    keep = []
    for i in order.tolist():
        if suppressed[i]:
            continue
        keep.append(i)
        xx1 = torch.maximum(x1[i], x1)
        yy1 = torch.maximum(y1[i], y1)
        xx2 = torch.minimum(x2[i], x2)
        yy2 = torch.minimum(y2[i], y2)
        inter = (xx2 - xx1).clamp(min=0) * (yy2 - yy1).clamp(min=0)
        ovr = inter / (areas[i] + areas - inter)
        suppressed |= ovr > iou_threshold
    return torch.tensor(keep, dtype=torch.long)


def batched_nms(boxes: torch.Tensor, scores: torch.Tensor, idxs: torch.Tensor, iou_threshold: float) -> torch.Tensor:
    """torchvision ``batched_nms`` (coordinate trick): shift each group by idx * (max coordinate + 1)."""
    if boxes.numel() == 0:
        return torch.empty((0,), dtype=torch.long)
    max_coordinate = boxes.max()
    offsets = idxs.to(boxes) * (max_coordinate + torch.tensor(1).to(boxes))
    return nms(boxes + offsets[:, None], scores, iou_threshold)


def class_scores(logits_fg: torch.Tensor) -> torch.Tensor:
    """(Q, 8) token logits -> (Q, 2) class logits (mean of tokens 0-3, mean of 4-7)."""
    return torch.stack([logits_fg[:, 0:4].mean(-1), logits_fg[:, 4:8].mean(-1)], dim=-1)


def select_instance(outputs: dict, index: int = -1) -> dict:
    """Selection for one ``<seg>`` row of ``HipieMaskDecoder.decode`` outputs.

    Returns query_index (fg index 0..99), score, box_xyxy (4,) in 1024 px (may exceed the frame),
    mask_logits (256, 256), and intermediates: nms_boxes_xyxy (100,4 normalised), nms_scores, nms_labels,
    nms_keep, inst_scores (top-k, before the class-1 scores are set to -1), inst_pred_classes (0/1),
    inst_pred_boxes (k,4 px), inst_fg_query_ids, selected_instance_index.
    """
    with torch.no_grad():
        logits = outputs["pred_logits"][index].float()[NUM_BG:]
        boxes = outputs["pred_boxes"][index].float()[NUM_BG:]
        ious = outputs["pred_boxious"][index].float()[NUM_BG:]
        masks = outputs["pred_masks"][index]
        masks = masks.reshape(masks.shape[0], masks.shape[-2], masks.shape[-1])[NUM_BG:]

        prob = torch.sqrt(class_scores(logits).sigmoid() * ious.sigmoid())                 # Q,2
        nms_scores, nms_labels = torch.max(prob, 1)
        boxes_xyxy = box_cxcywh_to_xyxy(boxes)
        keep = batched_nms(boxes_xyxy, nms_scores, nms_labels, NMS_IOU)
        prob_k = prob[keep]
        k = min(MAX_INST, prob_k.numel())
        top_vals, top_idx = torch.topk(prob_k.reshape(-1), k, dim=0)
        ncls = prob.shape[1]
        top_rows = torch.div(top_idx, ncls, rounding_mode="floor")
        labels = top_idx % ncls
        fg_ids = keep[top_rows]
        inst_boxes = box_cxcywh_to_xyxy(boxes[fg_ids]) * float(IMAGE_SIZE)
        scores = top_vals.clone()
        scores[labels == 0] = -1
        best = int(scores.argmax().item())
        q = int(fg_ids[best].item())
        return {
            "query_index": q,
            "score": float(top_vals[best].item()),
            "label": int(labels[best].item()),
            "box_xyxy": inst_boxes[best].clone(),
            "mask_logits": masks[q].clone(),
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


def mask_from_logits(mask_logits_256: torch.Tensor) -> torch.Tensor:
    """(256,256) logits -> (1024,1024) bool: bilinear x4 (align_corners False), sigmoid > 0.5, full padded frame."""
    x = mask_logits_256.float().reshape(1, 1, *mask_logits_256.shape[-2:])
    x = F.interpolate(x, size=(x.shape[-2] * 4, x.shape[-1] * 4), mode="bilinear", align_corners=False)
    return (x.sigmoid() > MASK_THRESHOLD)[0, 0]
