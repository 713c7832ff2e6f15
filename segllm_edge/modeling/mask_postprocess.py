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
    """Source index of each output pixel for nearest-exact resizing, ~floor((i + 0.5) * in / out).

    Taken from torch's own ``F.interpolate(mode="nearest-exact")`` (CPU) on an index ramp, so it is
    bit-identical to it, including the rare exact ties where torch's float32 arithmetic picks the other
    neighbour than exact or float64 maths would (indices < 2**24 are exact in float32). The Triton kernel
    reads these same tables, so CPU and GPU paths agree pixel for pixel.
    """
    out_size, in_size = int(out_size), int(in_size)
    if out_size < 1 or in_size < 1:
        raise ValueError(f"sizes must be >= 1, got out={out_size}, in={in_size}")
    ramp = torch.arange(in_size, dtype=torch.float32).view(1, 1, in_size)
    idx = F.interpolate(ramp, size=out_size, mode="nearest-exact")[0, 0]
    return idx.long()


def mask_bbox(mask: torch.Tensor) -> torch.Tensor:
    """Tight xyxy box (x1, y1 exclusive) of the True pixels, or all -1 when empty."""
    rows = mask.any(dim=1).nonzero()
    if rows.numel() == 0:
        return torch.full((4,), -1, dtype=torch.long)
    cols = mask.any(dim=0).nonzero()
    return torch.stack([cols[0, 0], rows[0, 0], cols[-1, 0] + 1, rows[-1, 0] + 1])


def _check_hw(input_hw, orig_hw) -> tuple[int, int, int, int]:
    h, w = int(input_hw[0]), int(input_hw[1])
    H, W = int(orig_hw[0]), int(orig_hw[1])
    if not (1 <= h <= FRAME and 1 <= w <= FRAME):
        raise ValueError(f"input_hw must lie in [1, {FRAME}], got {(h, w)}")
    if H < 1 or W < 1:
        raise ValueError(f"orig_hw must be positive, got {(H, W)}")
    return h, w, H, W


def postprocess_mask(mask_logits_256: torch.Tensor, input_hw: tuple[int, int], orig_hw: tuple[int, int]) -> dict:
    """Selected logits → ``model_mask`` (1024² bool), ``mask`` (H×W bool), ``mask_box`` (tight box of ``mask``).

    ``input_hw`` is the (h, w) of the image after the longest-side resize (before the zero padding),
    ``orig_hw`` the original (H, W). ``mask_box`` is int64 xyxy with x1, y1 exclusive, all -1 if empty.
    """
    h, w, H, W = _check_hw(input_hw, orig_hw)
    model_mask = upsample_logits(mask_logits_256) > 0  # == sigmoid(.) > 0.5 up to fp32 rounding of sigmoid
    ys = nearest_exact_index(H, h).to(model_mask.device)
    xs = nearest_exact_index(W, w).to(model_mask.device)
    mask = model_mask[ys][:, xs]  # rows/cols of the [:h, :w] area, so the crop is implicit
    return {"model_mask": model_mask, "mask": mask, "mask_box": mask_bbox(mask)}


def box_to_original(box_xyxy_1024, input_hw: tuple[int, int], orig_hw: tuple[int, int]) -> torch.Tensor:
    """Scale a 1024-frame xyxy box per axis (x by W/w, y by H/h) to the original image and clip it to the image."""
    h, w, H, W = _check_hw(input_hw, orig_hw)
    b = torch.as_tensor(box_xyxy_1024).detach().to("cpu", torch.float64).clone().reshape(4)
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
    box, zero-padded to a square anchored top-left. Returns (square uint8, (x0,y0,x1,y1), [y0,x0,y1,x1]/1024).

    ``resized_padded`` is the (1024, 1024, C) uint8 HWC frame, ``model_mask`` the (1024, 1024) bool frame mask.
    """
    img = np.asarray(resized_padded)
    mm = model_mask.detach().cpu().numpy() if isinstance(model_mask, torch.Tensor) else np.asarray(model_mask)
    if img.ndim != 3 or img.shape[:2] != (FRAME, FRAME) or mm.shape != (FRAME, FRAME):
        raise ValueError(f"expected a ({FRAME},{FRAME},C) image and a ({FRAME},{FRAME}) mask, got {img.shape}, {mm.shape}")
    if isinstance(box_xyxy_1024, torch.Tensor):
        box_xyxy_1024 = box_xyxy_1024.detach().cpu().reshape(-1).tolist()
    x0, y0, x1, y1 = crop_box(box_xyxy_1024)
    # cv2.bitwise_and(img, img, mask=mask) keeps masked pixels as-is and zeroes the rest
    crop = np.where(mm[y0:y1, x0:x1, None].astype(bool), img[y0:y1, x0:x1], 0).astype(np.uint8)
    side = max(x1 - x0, y1 - y0, 1)  # 0 only for a box starting at the frame edge, where the research code crashes
    square = np.zeros((side, side, img.shape[2]), dtype=np.uint8)
    square[: crop.shape[0], : crop.shape[1]] = crop
    bbox_vec = np.array([y0, x0, y1, x1], dtype=np.float32) / np.float32(FRAME)  # row first: released quirk
    return square, (x0, y0, x1, y1), bbox_vec
