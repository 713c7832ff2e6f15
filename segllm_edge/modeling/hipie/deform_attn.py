"""Multi-scale deformable attention in plain PyTorch (``grid_sample``), no custom ops.

This is the reference the ONNX export (GridSample, opset >= 16) and the Triton
kernels in :mod:`segllm_edge.kernels` are checked against.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F


def ms_deform_attn(
    value: torch.Tensor,
    spatial_shapes: Sequence[tuple[int, int]],
    sampling_locations: torch.Tensor,
    attention_weights: torch.Tensor,
) -> torch.Tensor:
    """Sample every level bilinearly at the given locations and mix with the weights.

    Args:
        value: (N, S, M, D) per-head values of all levels, levels flattened row-major
            and concatenated in ``spatial_shapes`` order (S = sum of H*W).
        spatial_shapes: (H, W) of each level, as Python ints (static for export).
        sampling_locations: (N, Lq, M, L, P, 2) normalised (x, y) in [0, 1], pixel
            centres at (i + 0.5) / W (``align_corners=False``); outside samples read zeros.
        attention_weights: (N, Lq, M, L, P), already softmaxed over L*P.

    Returns:
        (N, Lq, M*D)
    """
    n, _, m, d = value.shape
    _, lq, _, n_levels, n_points, _ = sampling_locations.shape
    grids = 2.0 * sampling_locations - 1.0
    w_all = attention_weights.transpose(1, 2).reshape(n * m, lq, n_levels, n_points)
    out = None
    start = 0
    for lvl, (h, w) in enumerate(spatial_shapes):
        v = value[:, start:start + h * w]                        # N, HW, M, D
        start += h * w
        v = v.permute(0, 2, 3, 1).reshape(n * m, d, h, w)         # N*M, D, H, W
        g = grids[:, :, :, lvl].transpose(1, 2).reshape(n * m, lq, n_points, 2)
        s = F.grid_sample(v, g, mode="bilinear", padding_mode="zeros", align_corners=False)  # N*M, D, Lq, P
        # weighted sum over the points of this level, accumulated over levels (no (L*P)-wide stacked copy)
        contrib = torch.einsum("ndqp,nqp->nqd", s, w_all[:, :, lvl])                       # N*M, Lq, D
        out = contrib if out is None else out + contrib
    return out.view(n, m, lq, d).permute(0, 2, 1, 3).reshape(n, lq, m * d)
