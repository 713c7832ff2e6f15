"""The package's front door: ``segllm_edge.load(path)`` → a model that opens sessions."""
from __future__ import annotations

from pathlib import Path

import torch

from .errors import BackendError, CheckpointError

BACKENDS = ("torch", "onnxruntime")

_DTYPES = {"fp32": torch.float32, "float32": torch.float32, "fp16": torch.float16, "float16": torch.float16,
           "bf16": torch.bfloat16, "bfloat16": torch.bfloat16}


def _dtype(dtype) -> torch.dtype:
    if dtype is None:
        return torch.float32
    if isinstance(dtype, torch.dtype):
        return dtype
    if isinstance(dtype, str) and dtype.lower() in _DTYPES:
        return _DTYPES[dtype.lower()]
    raise BackendError(f"unknown dtype {dtype!r}; use one of {', '.join(sorted(_DTYPES))}")


class SegLLM:
    """A loaded model on one backend. Open one :meth:`session` per image/conversation."""

    def __init__(self, backend):
        self.backend = backend

    @property
    def info(self):
        return self.backend.info

    def session(self, image, reuse: bool = True, trace: bool = False, max_kv_bytes: int | None = None):
        """Start a conversation over ``image`` (a path, PIL image or HxWx3 uint8 array)."""
        from .runtime.session import Session

        return Session(self.backend, image, reuse=reuse, trace=trace, max_kv_bytes=max_kv_bytes)

    def __repr__(self) -> str:
        i = self.info
        return (f"SegLLM(backend={self.backend.name}, hidden={i.hidden_size}, layers={i.num_layers}, "
                f"clip={i.clip_hidden}, dtype={i.dtype})")


def load(path: str | Path, backend: str = "torch", dtype=None, device: str = "cpu",
         use_stored_gammas: bool = False, **kwargs) -> SegLLM:
    """Load a SegLLM checkpoint folder (``backend="torch"``) or an export folder (``backend="onnxruntime"``).

    ``use_stored_gammas``: use the fusion block's stored ``gamma_v/gamma_l`` instead of the 1/6 the
    released research loader actually runs with (see the model notes in the README).
    """
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"no such checkpoint or export folder: {path}")
    if backend == "torch":
        from .modeling.loader import load_checkpoint
        from .runtime.backend import TorchBackend

        loaded = load_checkpoint(path, dtype=_dtype(dtype), use_stored_gammas=use_stored_gammas, **kwargs)
        return SegLLM(TorchBackend(loaded, device=device))
    if backend == "onnxruntime":
        try:
            from .runtime.ort_backend import OrtBackend
        except ImportError as exc:
            raise BackendError(f"the onnxruntime backend is not available here: {exc}") from None
        return SegLLM(OrtBackend.from_export(path, **kwargs))
    raise BackendError(f"unknown backend {backend!r}; choose one of {', '.join(BACKENDS)}")
