"""Fused mask post-process: 256² logits → 1024² frame mask + original-size mask + tight box, one launch.

Same outputs as :func:`segllm_edge.modeling.mask_postprocess.postprocess_mask`:

* programs ``[0, n_frame_tiles)`` each evaluate a ``BLOCK_Y x BLOCK_X`` tile of the 1024² frame:
  bilinear (``align_corners=False``, torch's source-index and weight formulas) from the logits, then
  ``> 0``, stored as bytes of a ``torch.bool`` tensor;
* programs ``[n_frame_tiles, ...)`` each evaluate a tile of the original (H, W) mask: every output pixel
  looks up its nearest-exact source pixel of the frame's ``[:h, :w]`` area (the host-built index tables of
  the reference, so both paths pick the same pixels) and evaluates the bilinear logit *there*, so the
  frame is never re-read; the tile's true pixels are min/max-reduced in registers and folded into the
  box with four atomics per tile.

The logits (256 KB) stay in L1/L2; the kernel writes 1 MB + H*W bytes: on an H100 it is launch-bound
(a few microseconds), versus ~5 torch kernels plus a host sync (``nonzero``) for the reference.
"""
from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from ..modeling.mask_postprocess import FRAME, _check_hw, nearest_exact_index

_BIG = 1 << 30


@triton.jit
def _bilinear_logit(logits_ptr, oy, ox, IN_H, IN_W, scale_h, scale_w):
    """torch upsample_bilinear2d (align_corners=False) at frame pixel (oy, ox), fp32."""
    sy = tl.maximum(scale_h * (oy.to(tl.float32) + 0.5) - 0.5, 0.0)
    sx = tl.maximum(scale_w * (ox.to(tl.float32) + 0.5) - 0.5, 0.0)
    y0 = sy.to(tl.int32)  # sy >= 0: truncation == floor
    x0 = sx.to(tl.int32)
    y1 = y0 + (y0 < IN_H - 1).to(tl.int32)
    x1 = x0 + (x0 < IN_W - 1).to(tl.int32)
    ly1 = sy - y0.to(tl.float32)
    lx1 = sx - x0.to(tl.float32)
    ly0 = 1.0 - ly1
    lx0 = 1.0 - lx1
    v00 = tl.load(logits_ptr + y0 * IN_W + x0).to(tl.float32)
    v01 = tl.load(logits_ptr + y0 * IN_W + x1).to(tl.float32)
    v10 = tl.load(logits_ptr + y1 * IN_W + x0).to(tl.float32)
    v11 = tl.load(logits_ptr + y1 * IN_W + x1).to(tl.float32)
    return ly0 * (lx0 * v00 + lx1 * v01) + ly1 * (lx0 * v10 + lx1 * v11)


@triton.jit
def _mask_postprocess_kernel(
    logits_ptr, frame_ptr, orig_ptr, ys_ptr, xs_ptr, box_ptr,
    IN_H, IN_W, scale_h, scale_w, H, W,
    n_frame_tiles, orig_tiles_x,
    OUT: tl.constexpr, BLOCK_Y: tl.constexpr, BLOCK_X: tl.constexpr,
):
    pid = tl.program_id(0)
    ry = tl.arange(0, BLOCK_Y)
    rx = tl.arange(0, BLOCK_X)
    if pid < n_frame_tiles:
        frame_tiles_x: tl.constexpr = OUT // BLOCK_X
        oy = (pid // frame_tiles_x) * BLOCK_Y + ry
        ox = (pid % frame_tiles_x) * BLOCK_X + rx
        val = _bilinear_logit(logits_ptr, oy[:, None], ox[None, :], IN_H, IN_W, scale_h, scale_w)
        tl.store(frame_ptr + oy[:, None] * OUT + ox[None, :], (val > 0.0).to(tl.uint8))
    else:
        t = pid - n_frame_tiles
        oy = (t // orig_tiles_x) * BLOCK_Y + ry
        ox = (t % orig_tiles_x) * BLOCK_X + rx
        my = oy < H
        mx = ox < W
        sy = tl.load(ys_ptr + oy, mask=my, other=0)
        sx = tl.load(xs_ptr + ox, mask=mx, other=0)
        val = _bilinear_logit(logits_ptr, sy[:, None], sx[None, :], IN_H, IN_W, scale_h, scale_w)
        valid = my[:, None] & mx[None, :]
        on = (val > 0.0) & valid
        tl.store(orig_ptr + oy[:, None].to(tl.int64) * W + ox[None, :], on.to(tl.uint8), mask=valid)
        # tight box of this tile's true pixels (x1, y1 exclusive), folded in with atomics
        col_any = tl.max(on.to(tl.int32), axis=0)  # [BLOCK_X]
        row_any = tl.max(on.to(tl.int32), axis=1)  # [BLOCK_Y]
        x_min = tl.min(tl.where(col_any > 0, ox, 1 << 30), axis=0)
        y_min = tl.min(tl.where(row_any > 0, oy, 1 << 30), axis=0)
        x_end = tl.max(tl.where(col_any > 0, ox + 1, -1), axis=0)
        y_end = tl.max(tl.where(row_any > 0, oy + 1, -1), axis=0)
        if x_end >= 0:
            tl.atomic_min(box_ptr + 0, x_min)
            tl.atomic_min(box_ptr + 1, y_min)
            tl.atomic_max(box_ptr + 2, x_end)
            tl.atomic_max(box_ptr + 3, y_end)


@functools.lru_cache(maxsize=64)
def _index_table(out_size: int, in_size: int, device: str) -> torch.Tensor:
    return nearest_exact_index(out_size, in_size).to(torch.int32).to(device)


def _fp32_ratio(num: int, den: int) -> float:
    # torch computes the bilinear scale as float(in) / out in fp32; pass exactly that value
    return float(torch.tensor(num, dtype=torch.float32) / torch.tensor(den, dtype=torch.float32))


def postprocess_mask_triton(
    mask_logits_256: torch.Tensor,
    input_hw: tuple[int, int],
    orig_hw: tuple[int, int],
    *,
    block_y: int = 16,
    block_x: int = 128,
    num_warps: int = 4,
) -> dict:
    """The fused kernel; returns the reference's dict (bool masks, int64 box) on the logits' device."""
    h, w, H, W = _check_hw(input_hw, orig_hw)
    if mask_logits_256.dim() != 2:
        raise ValueError(f"expected (h, w) logits, got {tuple(mask_logits_256.shape)}")
    if FRAME % block_x or FRAME % block_y:
        raise ValueError("block sizes must divide the 1024 frame")
    logits = mask_logits_256.contiguous()
    if not logits.is_floating_point():
        logits = logits.float()
    in_h, in_w = logits.shape
    dev = logits.device
    frame = torch.empty((FRAME, FRAME), dtype=torch.uint8, device=dev)
    orig = torch.empty((H, W), dtype=torch.uint8, device=dev)
    box = torch.tensor([_BIG, _BIG, -1, -1], dtype=torch.int32, device=dev)
    ys = _index_table(H, h, str(dev))
    xs = _index_table(W, w, str(dev))
    n_frame_tiles = (FRAME // block_y) * (FRAME // block_x)
    orig_tiles_x = triton.cdiv(W, block_x)
    n_orig_tiles = triton.cdiv(H, block_y) * orig_tiles_x
    _mask_postprocess_kernel[(n_frame_tiles + n_orig_tiles,)](
        logits, frame, orig, ys, xs, box,
        in_h, in_w, _fp32_ratio(in_h, FRAME), _fp32_ratio(in_w, FRAME), H, W,
        n_frame_tiles, orig_tiles_x,
        OUT=FRAME, BLOCK_Y=block_y, BLOCK_X=block_x, num_warps=num_warps,
    )
    box = torch.where(box[2] < 0, torch.full_like(box, -1), box).long()  # empty → all -1, no host sync
    return {"model_mask": frame.view(torch.bool), "mask": orig.view(torch.bool), "mask_box": box}
