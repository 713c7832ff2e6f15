"""``fast-v3`` export-time variants of the HIPIE deformable attention (same maths as the reference, other ops).

On top of ``fast-v2`` (:func:`.hipie_fast.ms_deform_attn_fast`: no Einsum, points-major sampling):

* **decoder: bilinear corners as memory rows, project afterwards.** The reference projects the whole encoder
  memory (21,760 tokens x 256 -> 256) in each of the 6 decoder layers, then samples 110 queries x 8 heads x 16
  points of it. Sampling and the weighted sum are linear in the value, so the variant computes each sample's 4
  corner indices and weights (zero padding, the attention weight folded in), gathers those rows of the
  token-major memory, sums them and applies each head's 32 rows of ``value_proj`` (its bias times the summed
  in-bounds weight): ~43 MFLOP per layer and conditioning (gather-sum 880 x 64 x 256, projection 8 x 110 x
  256 x 32 multiply-adds) instead of 2.85 GFLOP, and no 22 MB transpose per layer; the gathered rows are one
  ~58 MB tensor per layer and conditioning (880 x 64 rows of 1 KB).
* **encoder: location arithmetic folded.** The sampling offsets' ``/ normaliser`` and the grid's ``2x - 1`` go
  into the offsets' weights (per output column) and one same-shape ``2 ref - 1`` add before the points-major
  permutation (instead of a 6-d broadcast over 5.6 M elements).
* **encoder: value per level in channel-major.** ``value_proj`` is computed per level as ``W @ x_l^T`` from a
  row block of the input, giving the ``(N*M, D, H, W)`` map GridSample reads with no transpose and no strided
  split.
* :func:`fc` (a clamp to the float32 range after a linear layer) puts OpenVINO's FullyConnected on oneDNN, and
  :func:`aligned_bilinear_x2` replaces the mask head's Interpolate (swapped in by ``fast_hipie``).

Measurements: docs/cpu.md ("The ``fast-v3`` graph"). Results differ from the reference only by float summation order (tests/test_hipie_fast.py).
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F

from ..modeling.hipie import mask_head
from ..modeling.hipie.transformer import EncoderLayer, MSDeformAttn

_F32_MAX = float(torch.finfo(torch.float32).max)


def fc(linear: torch.nn.Linear, x: torch.Tensor) -> torch.Tensor:
    """``linear(x)`` followed by a clamp to the float32 range: the identity on finite values, but a post-op that
    OpenVINO's CPU plugin fuses into the FullyConnected, which then runs on oneDNN's brgemm instead of MLAS
    (MLAS takes only post-op-free layers): the 256 -> 2048 -> 256 feed-forward 1.16x, a 256 -> 256 projection
    1.10x faster on this 2-core CPU (OpenVINO 2026.4's kernel choice: a later OpenVINO may not keep it),
    bit-identical outputs. Exact for finite values; an infinity becomes +-FLT_MAX."""
    return torch.clamp(linear(x), -_F32_MAX, _F32_MAX)


def _level_starts(spatial_shapes: Sequence[tuple[int, int]]) -> list[int]:
    starts, start = [], 0
    for h, w in spatial_shapes:
        starts.append(start)
        start += h * w
    return starts


class FastMSDeformAttnV3(MSDeformAttn):
    """:class:`MSDeformAttn` computing the same function (encoder: 2-d reference points and a token tensor;
    decoder: box reference points and the token-major memory)."""

    def forward(self, query, reference_points, value_in, spatial_shapes, offset_normalizer=None):
        if reference_points.shape[-1] == 2:
            return self._forward_tokens(query, reference_points, value_in, spatial_shapes, offset_normalizer)
        return self._forward_rows(query, reference_points, value_in, spatial_shapes)

    def _forward_tokens(self, query, reference_points, value_in, spatial_shapes, offset_normalizer):
        n, lq, _ = query.shape
        m, lv, p = self.n_heads, self.n_levels, self.n_points
        d = self.d_model // m
        # grid = 2 * (ref + off / normaliser) - 1 = off * (2 / normaliser) + (2 ref - 1): the scale goes into the
        # offsets' weights (columns ordered M, L, P, xy), the (Lq, 2) shift is added before the permutation
        col = (2.0 / offset_normalizer)[None, :, None, :].expand(m, lv, p, 2).reshape(-1)
        shift = (2.0 * reference_points - 1.0)[:, :, None, :, None, :].expand(-1, lq, m, lv, p, 2)
        off = (torch.clamp(F.linear(query, self.sampling_offsets.weight * col[:, None],
                                    self.sampling_offsets.bias * col), -_F32_MAX, _F32_MAX)
               + shift.reshape(-1, lq, m * lv * p * 2))                                      # same-shape add
        g = off.view(n, lq, m, lv, p, 2).permute(0, 2, 3, 4, 1, 5).reshape(n * m, lv, p, lq, 2)   # points-major
        w = F.softmax(self.attention_weights(query).view(n, lq, m, lv * p), -1)
        w = w.view(n, lq, m, lv, p).permute(0, 2, 3, 4, 1).reshape(n * m, 1, lv, p, lq)
        wv, bv = self.value_proj.weight, self.value_proj.bias[:, None]
        out, start = None, 0
        for lvl, (h, wd) in enumerate(spatial_shapes):
            x = value_in[:, start:start + h * wd]                                            # N, HW, C
            start += h * wd
            v = (torch.matmul(wv, x.transpose(1, 2)) + bv).reshape(n * m, d, h, wd)          # N*M, D, H, W
            s = F.grid_sample(v, g[:, lvl], mode="bilinear", padding_mode="zeros", align_corners=False)  # N*M,D,P,Lq
            contrib = (s * w[:, :, lvl]).sum(2)                                              # N*M, D, Lq
            out = contrib if out is None else out + contrib
        return fc(self.output_proj, out.view(n, m * d, lq).transpose(1, 2))

    def _forward_rows(self, query, reference_points, memory, spatial_shapes):
        """Decoder: bilinear corners gathered as rows of the token-major memory, then projected per head."""
        n, lq, _ = query.shape
        m, lv, p = self.n_heads, self.n_levels, self.n_points
        d = self.d_model // m
        s_total, c = memory.shape[1], memory.shape[2]
        offsets = self.sampling_offsets(query).view(n, lq, m, lv, p, 2)
        weights = F.softmax(self.attention_weights(query).view(n, lq, m, lv * p), -1).view(n, lq, m, lv, p)
        loc = (reference_points[:, :, None, :, None, :2]
               + offsets / p * reference_points[:, :, None, :, None, 2:] * 0.5)
        loc = loc.reshape(n * lq * m, lv, p, 2)       # rank <= 6: OpenVINO 2026.4 gave wrong values for the rank-7 corner broadcast
        size = torch.tensor([[w, h] for h, w in spatial_shapes], dtype=loc.dtype)           # L, 2 (x, y)
        starts = torch.tensor(_level_starts(spatial_shapes), dtype=torch.int64)            # L
        px = loc * size[:, None, :] - 0.5                                                   # align_corners=False
        p0 = torch.floor(px)
        frac = px - p0
        corner = torch.tensor([[0.0, 0.0], [1.0, 0.0], [0.0, 1.0], [1.0, 1.0]], dtype=loc.dtype)  # 4, 2
        pc = p0[..., None, :] + corner                                                      # N*Lq*M, L, P, 4, 2
        sz = size[:, None, None, :]
        inside = ((pc >= 0) & (pc < sz)).all(-1)                                            # zero padding
        wc = torch.where(corner > 0, frac[..., None, :], 1.0 - frac[..., None, :]).prod(-1)
        wc = wc * inside.to(wc.dtype) * weights.reshape(n * lq * m, lv, p, 1)              # N*Lq*M, L, P, 4
        pcl = torch.minimum(torch.clamp(pc, min=0.0), sz - 1.0).to(torch.int64)
        idx = starts[:, None, None] + pcl[..., 1] * size[:, None, None, 0].to(torch.int64) + pcl[..., 0]
        idx = idx.view(n, lq * m * lv * p * 4) + (torch.arange(n, dtype=torch.int64) * s_total)[:, None]
        k = lv * p * 4
        # index_select exports as Gather (axis 0), which OpenVINO's CPU plugin runs in a jit kernel; the
        # advanced index `memory[idx]` exported as GatherND ran on its reference kernel (up to 65 ms a call)
        rows = torch.index_select(memory.reshape(-1, c), 0, idx.reshape(-1)).view(n * lq * m, k, c)
        a = torch.matmul(wc.reshape(n * lq * m, 1, k), rows).view(n * lq, m, c)            # N*Lq, M, C
        out = torch.bmm(a.transpose(0, 1), self.value_proj.weight.view(m, d, -1).transpose(1, 2))  # M, N*Lq, D
        out = out.transpose(0, 1) + wc.reshape(n * lq, m, k).sum(-1, keepdim=True) * self.value_proj.bias.view(m, d)
        return fc(self.output_proj, out.reshape(n, lq, m * d))


class FastEncoderLayerV3(EncoderLayer):
    """:class:`EncoderLayer` with the second feed-forward layer through :func:`fc`."""

    def forward(self, src, pos, reference_points, spatial_shapes, offset_normalizer):
        src = self.norm1(src + self.self_attn(src + pos, reference_points, src, spatial_shapes, offset_normalizer))
        return self.norm2(src + fc(self.linear2, F.relu(self.linear1(src), inplace=True)))


def aligned_bilinear_x2(x: torch.Tensor, factor: int) -> torch.Tensor:
    """:func:`segllm_edge.modeling.hipie.mask_head.aligned_bilinear` for ``factor == 2`` without Interpolate.

    There (replicate pad, ``align_corners=True`` from h+1 to 2h+1, shift by one, crop) the scale is exactly 1/2,
    so along each axis output ``2i+1`` is input ``i`` and output ``2i`` is the mean of inputs ``i-1`` and ``i``
    (input ``0`` for ``i = 0``): two interleaves of a shifted mean, ~8x fewer bytes moved than the
    Pad + Interpolate + Pad + Slice of the reference on the 110 query maps."""
    if factor != 2:
        return _aligned_bilinear_reference(x, factor)
    for axis in (-1, -2):
        prev = torch.cat([x.narrow(axis, 0, 1), x.narrow(axis, 0, x.shape[axis] - 1)], axis)
        both = torch.stack([(prev + x) * 0.5, x], axis)          # ..., n, 2[, w]: even then odd output
        shape = list(x.shape)
        shape[axis] *= 2
        x = both.reshape(shape)
    return x


_aligned_bilinear_reference = mask_head.aligned_bilinear
