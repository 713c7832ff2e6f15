"""Optional Triton kernels, with dispatch to the PyTorch references.

Importing this package never imports triton (Jetson/ARM and minimal installs have none); the kernel
modules are loaded on first use. The dispatchers run the Triton kernel on CUDA tensors when
:func:`available` and fall back to the PyTorch references otherwise (CPU tensors always take the
reference, also under ``TRITON_INTERPRET=1``; call the ``*_triton`` functions directly to interpret).
"""
from __future__ import annotations

import functools
import importlib
import importlib.util
import os
from typing import Sequence

import torch

__all__ = ["available", "ms_deform_attn", "postprocess_mask"]

_BACKENDS = ("auto", "triton", "torch")


@functools.lru_cache(maxsize=1)
def _triton_importable() -> bool:
    if importlib.util.find_spec("triton") is None:
        return False
    try:
        importlib.import_module("triton")
        importlib.import_module("triton.language")
    except Exception:  # a broken or CPU-less triton build must not break the runtime
        return False
    return True


def _interpret() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def available() -> bool:
    """True when triton imports and there is something to run it on: a CUDA device or the interpreter."""
    if not _triton_importable():
        return False
    return _interpret() or torch.cuda.is_available()


def _use_triton(backend: str, t: torch.Tensor) -> bool:
    if backend not in _BACKENDS:
        raise ValueError(f"backend must be one of {_BACKENDS}, got {backend!r}")
    if backend == "torch":
        return False
    if backend == "triton":
        if not available():
            raise RuntimeError("backend='triton' but triton is not importable or there is no CUDA device "
                               "(set TRITON_INTERPRET=1 to run the kernels on the CPU interpreter)")
        return True
    return t.is_cuda and available()


def ms_deform_attn(
    value: torch.Tensor,
    spatial_shapes: Sequence[tuple[int, int]],
    sampling_locations: torch.Tensor,
    attention_weights: torch.Tensor,
    *,
    backend: str = "auto",
) -> torch.Tensor:
    """Multi-scale deformable attention, (N, Lq, M*D); see :mod:`segllm_edge.modeling.hipie.deform_attn`."""
    if _use_triton(backend, value):
        from .deform_attn import ms_deform_attn_triton

        return ms_deform_attn_triton(value, spatial_shapes, sampling_locations, attention_weights)
    from ..modeling.hipie.deform_attn import ms_deform_attn as ref

    return ref(value, spatial_shapes, sampling_locations, attention_weights)


def postprocess_mask(
    mask_logits_256: torch.Tensor,
    input_hw: tuple[int, int],
    orig_hw: tuple[int, int],
    *,
    backend: str = "auto",
) -> dict:
    """``model_mask`` / ``mask`` / ``mask_box``; see :mod:`segllm_edge.modeling.mask_postprocess`."""
    if _use_triton(backend, mask_logits_256):
        from .mask_postprocess import postprocess_mask_triton

        return postprocess_mask_triton(mask_logits_256, input_hw, orig_hw)
    from ..modeling.mask_postprocess import postprocess_mask as ref

    return ref(mask_logits_256, input_hw, orig_hw)
