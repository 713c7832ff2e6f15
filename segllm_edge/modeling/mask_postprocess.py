"""From the selected query's 256x256 logits to the masks users get, and the crop the next round encodes.

This is the runtime's implementation on the CPU (and the reference the fused Triton kernel in
:mod:`segllm_edge.kernels` is checked against):

* ``model_mask``: bilinear x4 (align_corners=False) to the 1024x1024 frame, ``sigmoid > 0.5``
  (computed as ``logit > 0``, the same set), kept as the full padded frame like the research code;
* ``mask``: the frame cut to the resized image area ``[:h, :w]`` and resized to the original
  (H, W) with nearest-exact sampling (PIL-compatible);
* :func:`masked_crop`: the research code's crop for the next round's mask token.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

FRAME = 1024


def upsample_logits(mask_logits_256: torch.Tensor) -> torch.Tensor:
    """(256,256) → (1024,1024) bilinear, align_corners=False."""
    x = mask_logits_256.float()[None, None]
    return F.interpolate(x, size=(FRAME, FRAME), mode="bilinear", align_corners=False)[0, 0]


def nearest_exact_index(out_size: int, in_size: int) -> torch.Tensor:
    """Source index of each output pixel for nearest-exact resizing: floor((i + 0.5) * in / out)."""
    idx = ((torch.arange(out_size, dtype=torch.float64) + 0.5) * (in_size / out_size)).floor().long()
    return idx.clamp_(max=in_size - 1)


def mask_bbox(mask: torch.Tensor) -> torch.Tensor:
    """Tight xyxy box (x1, y1 exclusive) of the True pixels, or all -1 when empty."""
    rows = mask.any(dim=1).nonzero()
    if rows.numel() == 0:
        return torch.full((4,), -1, dtype=torch.long)
    cols = mask.any(dim=0).nonzero()
    return torch.stack([cols[0, 0], rows[0, 0], cols[-1, 0] + 1, rows[-1, 0] + 1])


def postprocess_mask(mask_logits_256: torch.Tensor, input_hw: tuple[int, int], orig_hw: tuple[int, int]) -> dict:
    """Selected logits → ``model_mask`` (1024² bool), ``mask`` (H×W bool), ``mask_box`` (tight box of ``mask``)."""
    model_mask = upsample_logits(mask_logits_256) > 0
    h, w = int(input_hw[0]), int(input_hw[1])
    H, W = int(orig_hw[0]), int(orig_hw[1])
    ys = nearest_exact_index(H, h)
    xs = nearest_exact_index(W, w)
    mask = model_mask[ys][:, xs]
    return {"model_mask": model_mask, "mask": mask, "mask_box": mask_bbox(mask)}


def box_to_original(box_xyxy_1024: torch.Tensor, input_hw: tuple[int, int], orig_hw: tuple[int, int]) -> torch.Tensor:
    """Scale a 1024-frame xyxy box per axis to the original image and clip it to the image."""
    h, w = input_hw
    H, W = orig_hw
    b = box_xyxy_1024.double().clone()
    b[0::2] = (b[0::2] * (W / w)).clamp(0, W)
    b[1::2] = (b[1::2] * (H / h)).clamp(0, H)
    return b.float()


def crop_box(box_xyxy_1024) -> tuple[int, int, int, int]:
    """The research code's integer crop box: truncate, clip to [0, 1024], at least 2 px (then clip again)."""
    x0, y0, x1, y1 = (min(max(int(float(v)), 0), FRAME) for v in box_xyxy_1024)  # int() truncates toward zero
    x1 = min(max(x1, x0 + 2), FRAME)
    y1 = min(max(y1, y0 + 2), FRAME)
    return x0, y0, x1, y1


def masked_crop(resized_padded: np.ndarray, model_mask: np.ndarray, box_xyxy_1024) -> tuple[np.ndarray, tuple, np.ndarray]:
    """The next round's mask-token input: the 1024-padded image zeroed outside the mask, cropped to the
    box, zero-padded to a square anchored top-left. Returns (square uint8, (x0,y0,x1,y1), [y0,x0,y1,x1]/1024)."""
    x0, y0, x1, y1 = crop_box(box_xyxy_1024)
    crop = resized_padded[y0:y1, x0:x1] * model_mask[y0:y1, x0:x1, None]
    side = max(x1 - x0, y1 - y0, 1)  # 0 only for a box starting at the frame edge, where the research code crashes
    square = np.zeros((side, side, resized_padded.shape[2]), dtype=np.uint8)
    square[: crop.shape[0], : crop.shape[1]] = crop
    bbox_vec = np.array([y0, x0, y1, x1], dtype=np.float32) / np.float32(FRAME)  # row first: released quirk
    return square, (x0, y0, x1, y1), bbox_vec
