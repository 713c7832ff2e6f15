"""Export-time variants of HIPIE modules: the same maths as the reference, in a form that runs faster on CPU runtimes.

The PyTorch reference (:mod:`segllm_edge.modeling.hipie`) is never changed; while a graph is being traced,
:func:`fast_hipie` swaps the class of the reference's modules for a subclass whose ``forward`` computes the same
function with other ops (and restores them afterwards). What changes, per deformable-attention call:

* the per-level ``einsum("ndqp,nqp->nqd")`` (exported as ONNX ``Einsum``, slow on onnxruntime's CPU provider)
  becomes ``Mul`` + ``ReduceSum`` over the points, accumulated over levels in ``(N*M, D, Lq)`` layout;
* points-major sampling: ``GridSample`` samples a ``(P, Lq)`` grid, so its output is ``(N*M, D, P, Lq)`` and the
  multiply by the attention weights and the sum over the points run on contiguous rows of all ``Lq`` queries
  (the ``(Lq, P)`` order summed 4-element rows: ~1.6x slower for the sampling part under OpenVINO, which is
  about half of the graph);
* the value, the grids and the weights are transposed once for all levels (not once per level), the output once.

``fast-v3`` (the exporter's default, :mod:`.hipie_fast_v3`) adds decoder sampling from memory rows, folded
location arithmetic, a per-level channel-major value, clamped FullyConnected outputs and an x2 mask upsampling
without Interpolate. Results differ from the reference only by float summation order (tests/test_hipie_fast.py).
"""
from __future__ import annotations

import contextlib
import threading
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..modeling.hipie import mask_head
from ..modeling.hipie.transformer import EncoderLayer, MSDeformAttn
from .hipie_fast_v3 import FastEncoderLayerV3, FastMSDeformAttnV3, aligned_bilinear_x2

#: graphs exported with the variants
FAST_GRAPHS = ("mask_decoder",)
#: the rewrites of each variant, recorded in the manifest (``extra.graphs.mask_decoder.variant``); exports of an
#: older variant stay loadable (the runtime only runs the ONNX file)
HIPIE_GRAPH_VARIANTS = {
    "fast-v2": ("fast-v2: deformable attention Mul+ReduceSum (no Einsum), points-major sampling, "
                "one value/grid/weight transpose per call"),
    "fast-v3": ("fast-v3: fast-v2 + decoder gathers the bilinear corners as memory rows and projects after (no "
                "per-layer value_proj of the memory), encoder location arithmetic folded into the offsets layer "
                "and per-level channel-major value, clamped FC outputs (oneDNN brgemm), x2 mask upsampling "
                "without Interpolate"),
}
#: the variant the exporter writes (its description is what the manifest records)
DEFAULT_VARIANT = "fast-v3"
# the x2 upsampling is a module-level function of the reference (not a module whose class can be swapped): the
# patch is process-wide for the block, so blocks that patch it run one at a time
_FUNCTION_PATCH_LOCK = threading.RLock()


def ms_deform_attn_fast(value: torch.Tensor, spatial_shapes: Sequence[tuple[int, int]],
                        sampling_locations: torch.Tensor, attention_weights: torch.Tensor) -> torch.Tensor:
    """Same contract as :func:`segllm_edge.modeling.hipie.deform_attn.ms_deform_attn`."""
    n, s_total, m, d = value.shape
    _, lq, _, n_levels, n_points, _ = sampling_locations.shape
    grids = 2.0 * sampling_locations - 1.0
    # points-major: (N*M, L, P, Lq[, 2]); the weights broadcast over the D channels of the samples
    g_all = grids.permute(0, 2, 3, 4, 1, 5).reshape(n * m, n_levels, n_points, lq, 2)
    w_all = attention_weights.permute(0, 2, 3, 4, 1).reshape(n * m, 1, n_levels, n_points, lq)
    v_all = value.permute(0, 2, 3, 1).reshape(n * m, d, s_total)          # one transpose for every level
    out = None
    start = 0
    for lvl, (h, w) in enumerate(spatial_shapes):
        v = v_all[:, :, start:start + h * w].reshape(n * m, d, h, w)
        start += h * w
        s = F.grid_sample(v, g_all[:, lvl], mode="bilinear", padding_mode="zeros", align_corners=False)  # N*M,D,P,Lq
        contrib = (s * w_all[:, :, lvl]).sum(2)                                                         # N*M,D,Lq
        out = contrib if out is None else out + contrib
    return out.view(n, m * d, lq).transpose(1, 2)                                                      # N,Lq,M*D


class FastMSDeformAttn(MSDeformAttn):
    """:class:`MSDeformAttn` with :func:`ms_deform_attn_fast` (same parameters, same outputs up to rounding)."""

    core = staticmethod(ms_deform_attn_fast)


def _variants(name: str) -> tuple[dict[type, type], dict]:
    """The class swaps and the ``mask_head`` function patches of variant ``name``."""
    table = {"fast-v2": ({MSDeformAttn: FastMSDeformAttn}, {}),
             "fast-v3": ({MSDeformAttn: FastMSDeformAttnV3, EncoderLayer: FastEncoderLayerV3},
                         {"aligned_bilinear": aligned_bilinear_x2})}
    if name not in table:
        raise ValueError(f"unknown HIPIE graph variant {name!r}; choose one of {', '.join(HIPIE_GRAPH_VARIANTS)}")
    return table[name]


@contextlib.contextmanager
def fast_hipie(module: nn.Module, variant: str = DEFAULT_VARIANT):
    """Within the block, the reference modules under ``module`` run the export ``variant``
    (a key of :data:`HIPIE_GRAPH_VARIANTS`)."""
    classes, functions = _variants(variant)
    swapped = []
    with _FUNCTION_PATCH_LOCK if functions else contextlib.nullcontext():
        saved = {name: getattr(mask_head, name) for name in functions}
        try:
            for name, fn in functions.items():
                setattr(mask_head, name, fn)
            for sub in module.modules():
                cls = classes.get(type(sub))
                if cls is not None:
                    swapped.append((sub, type(sub)))
                    sub.__class__ = cls
            yield module
        finally:
            for name, fn in saved.items():
                setattr(mask_head, name, fn)
            for sub, cls in swapped:
                sub.__class__ = cls
