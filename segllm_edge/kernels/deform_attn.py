"""Multi-scale deformable attention forward as one Triton kernel.

Same signature and semantics as the PyTorch reference
:func:`segllm_edge.modeling.hipie.deform_attn.ms_deform_attn` (``grid_sample`` bilinear,
``align_corners=False``, zero padding), fp32/fp16/bf16 inputs with fp32 accumulation.

Design: grid ``(cdiv(Lq, BLOCK_Q), N * M)``; one program owns BLOCK_Q queries of one (batch, head) pair
and keeps a ``[BLOCK_Q, BLOCK_D]`` fp32 accumulator in registers. Levels and points are runtime loops
(fully unrolling the 4x4x4 = 64 gathers made ptxas hoist them all and spill); per (level, point) each
query loads its (x, y) and weight (one query's L*P*2 fp32 locations for a head are exactly one 128-byte
line, reused from L1 across the 16 iterations), then gathers the four bilinear corners as D-contiguous
rows of ``value`` with 16-byte vector loads (a warp covers 4 fp32 / 8 fp16 query rows of D=32).
The whole ``value`` of a batch (21760 x 8 x 32: 22 MB fp32, 11 MB fp16) fits in the H100's 50 MB L2,
so the gathers are L2 hits; DRAM traffic is ~locations + weights + value + output once.
Consecutive programs are consecutive query blocks of the same head, whose samples land near each other.

This module imports triton at import time; import it through :mod:`segllm_edge.kernels`, which
only does so when triton is installed.
"""
from __future__ import annotations

from typing import Sequence

import torch
import triton
import triton.language as tl


@triton.jit
def _corner(v_base, start, W, yy, xx, ok, cw, d, dmask, row_stride, EVEN_D: tl.constexpr):
    """cw * value[start + yy*W + xx, :] for each query, zero where the corner lies outside the level."""
    s_idx = tl.where(ok, start + yy * W + xx, 0)  # int32: the wrapper checks S*M*D < 2**31
    if EVEN_D:  # a mask constant along D keeps the row loads vectorised
        msk = ok[:, None]
    else:
        msk = ok[:, None] & dmask[None, :]
    v = tl.load(v_base + (s_idx[:, None] * row_stride + d[None, :]), mask=msk, other=0.0)
    return cw[:, None] * v.to(tl.float32)


@triton.jit
def _ms_deform_attn_fwd(
    value_ptr, shapes_ptr, starts_ptr, loc_ptr, attw_ptr, out_ptr,
    S, Lq,
    M: tl.constexpr, D: tl.constexpr, L: tl.constexpr, P: tl.constexpr,
    BLOCK_Q: tl.constexpr, BLOCK_D: tl.constexpr,
):
    pid_q = tl.program_id(0)
    pid_nm = tl.program_id(1)
    n = pid_nm // M
    m = pid_nm % M

    q = pid_q * BLOCK_Q + tl.arange(0, BLOCK_Q)
    qmask = q < Lq
    d = tl.arange(0, BLOCK_D)
    dmask = d < D

    nq = n.to(tl.int64) * Lq + q                       # (n, q) row, int64: Lq*M*L*P*2 may pass 2**31 for big N
    w_row = (nq * M + m) * (L * P)                      # attention_weights (N, Lq, M, L, P)
    loc_row = w_row * 2                                 # sampling_locations (N, Lq, M, L, P, 2)
    v_base = value_ptr + n.to(tl.int64) * S * (M * D) + m * D   # value (N, S, M, D)

    acc = tl.zeros([BLOCK_Q, BLOCK_D], dtype=tl.float32)
    for lvl in range(L):  # runtime loops: full unrolling makes ptxas hoist 64 gathers and spill
        H = tl.load(shapes_ptr + 2 * lvl)
        W = tl.load(shapes_ptr + 2 * lvl + 1)
        start = tl.load(starts_ptr + lvl)
        Hf = H.to(tl.float32)
        Wf = W.to(tl.float32)
        for pt in range(P):
            k = lvl * P + pt
            x = tl.load(loc_ptr + loc_row + 2 * k, mask=qmask, other=0.0).to(tl.float32)
            y = tl.load(loc_ptr + loc_row + 2 * k + 1, mask=qmask, other=0.0).to(tl.float32)
            aw = tl.load(attw_ptr + w_row + k, mask=qmask, other=0.0).to(tl.float32)
            # the reference's arithmetic: grid = 2*loc - 1, then grid_sample's unnormalise
            gx = 2.0 * x - 1.0
            gy = 2.0 * y - 1.0
            ix = ((gx + 1.0) * Wf - 1.0) / 2.0
            iy = ((gy + 1.0) * Hf - 1.0) / 2.0
            # far-outside samples read only zeros either way; clamping keeps the int cast defined
            ix = tl.minimum(tl.maximum(ix, -2.0), Wf + 1.0)
            iy = tl.minimum(tl.maximum(iy, -2.0), Hf + 1.0)
            x0f = tl.floor(ix)
            y0f = tl.floor(iy)
            x0 = x0f.to(tl.int32)
            y0 = y0f.to(tl.int32)
            x1 = x0 + 1
            y1 = y0 + 1
            wx1 = ix - x0f
            wx0 = (x0f + 1.0) - ix
            wy1 = iy - y0f
            wy0 = (y0f + 1.0) - iy
            vx0 = (x0 >= 0) & (x0 < W)
            vx1 = (x1 >= 0) & (x1 < W)
            vy0 = (y0 >= 0) & (y0 < H) & qmask
            vy1 = (y1 >= 0) & (y1 < H) & qmask

            sample = _corner(v_base, start, W, y0, x0, vy0 & vx0, wy0 * wx0, d, dmask, M * D, BLOCK_D == D)   # nw
            sample += _corner(v_base, start, W, y0, x1, vy0 & vx1, wy0 * wx1, d, dmask, M * D, BLOCK_D == D)  # ne
            sample += _corner(v_base, start, W, y1, x0, vy1 & vx0, wy1 * wx0, d, dmask, M * D, BLOCK_D == D)  # sw
            sample += _corner(v_base, start, W, y1, x1, vy1 & vx1, wy1 * wx1, d, dmask, M * D, BLOCK_D == D)  # se
            acc += aw[:, None] * sample

    out_off = nq[:, None] * (M * D) + m * D + d[None, :]   # out (N, Lq, M*D)
    tl.store(out_ptr + out_off, acc.to(out_ptr.dtype.element_ty), mask=qmask[:, None] & dmask[None, :])


def _launch_config(lq: int, dtype: torch.dtype) -> tuple[int, int]:
    """(BLOCK_Q, num_warps). With D=32 a warp covers 4 (fp32, 16-byte loads of 4 channels) or 8 (16-bit,
    8 channels) queries; these picks keep ptxas at <= ~70 registers with no spills for sm_90 (checked
    offline with ptxas -v: fp32 32x32/4 warps 70 regs, fp16 64x32/4 warps 64 regs, 16x32/2 warps 56 regs).
    The 110-query decoder gets small blocks so that its 7 x N*M programs spread over more SMs."""
    if lq < 256:
        return 16, 2
    if dtype == torch.float32:
        return 32, 4
    return 64, 4


def ms_deform_attn_triton(
    value: torch.Tensor,
    spatial_shapes: Sequence[tuple[int, int]],
    sampling_locations: torch.Tensor,
    attention_weights: torch.Tensor,
    *,
    block_q: int | None = None,
    num_warps: int | None = None,
) -> torch.Tensor:
    """Triton forward of multi-scale deformable attention; arguments and result as the reference.

    Returns (N, Lq, M*D) in ``value.dtype`` (fp32 accumulation inside).
    """
    if value.dim() != 4 or sampling_locations.dim() != 6 or attention_weights.dim() != 5:
        raise ValueError("expected value (N,S,M,D), sampling_locations (N,Lq,M,L,P,2), attention_weights (N,Lq,M,L,P)")
    n, s, m, d = value.shape
    n2, lq, m2, n_levels, n_points, two = sampling_locations.shape
    shapes = [(int(h), int(w)) for h, w in spatial_shapes]
    if (n2, m2, two) != (n, m, 2) or len(shapes) != n_levels:
        raise ValueError(f"inconsistent shapes: value {tuple(value.shape)}, locations {tuple(sampling_locations.shape)}, "
                         f"{len(shapes)} spatial shapes")
    if tuple(attention_weights.shape) != (n, lq, m, n_levels, n_points):
        raise ValueError(f"attention_weights {tuple(attention_weights.shape)} != {(n, lq, m, n_levels, n_points)}")
    if sum(h * w for h, w in shapes) != s:
        raise ValueError(f"sum of H*W over {shapes} != S={s}")
    if s * m * d >= 2**31:
        raise ValueError("one batch of value must have < 2**31 elements (int32 gather offsets)")

    dev = value.device
    value = value.contiguous()
    loc = sampling_locations.contiguous()
    attw = attention_weights.contiguous()
    shapes_t = torch.tensor(shapes, dtype=torch.int32).reshape(-1)
    starts, acc = [], 0
    for h, w in shapes:
        starts.append(acc)
        acc += h * w
    starts_t = torch.tensor(starts, dtype=torch.int32)
    shapes_t, starts_t = shapes_t.to(dev, non_blocking=True), starts_t.to(dev, non_blocking=True)

    out = torch.empty((n, lq, m * d), dtype=value.dtype, device=dev)
    if out.numel() == 0:
        return out
    bq, nw = _launch_config(lq, value.dtype)
    bq, nw = block_q or bq, num_warps or nw
    grid = (triton.cdiv(lq, bq), n * m)
    _ms_deform_attn_fwd[grid](
        value, shapes_t, starts_t, loc, attw, out, s, lq,
        M=m, D=d, L=n_levels, P=n_points,
        BLOCK_Q=bq, BLOCK_D=triton.next_power_of_2(d), num_warps=nw,
    )
    return out
