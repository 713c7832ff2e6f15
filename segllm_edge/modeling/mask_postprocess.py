"""From the selected query's 256x256 logits to the masks users get, and the crop the next round encodes.

The PyTorch reference (the runtime runs the numpy twin, :mod:`segllm_edge.pipeline.masks`, and the fused
Triton kernel in :mod:`segllm_edge.kernels` on CUDA tensors; both are checked against this):

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

from ..pipeline import masks as _np_masks
from ..pipeline.masks import FRAME, crop_box, masked_crop  # noqa: F401  (the crop has one implementation)


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
    return _np_masks.check_hw(input_hw, orig_hw)


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
    return torch.from_numpy(_np_masks.box_to_original(_np_masks._host(box_xyxy_1024), input_hw, orig_hw))
