"""Precision names: of an ONNX export (``segllm-edge export --precision``), of TensorRT engines
(``segllm-edge build-engines --precision``), and the dtypes ``load(dtype=...)`` takes."""
from __future__ import annotations

EXPORT_PRECISIONS = ("fp32", "fp16", "bf16", "int8", "int4")
ENGINE_PRECISIONS = ("fp16", "bf16", "fp8", "int8")

#: ``load(dtype=...)`` names → the dtype name (torch's, and numpy's for float32/float16)
DTYPES = {"fp32": "float32", "float32": "float32", "fp16": "float16", "float16": "float16",
          "bf16": "bfloat16", "bfloat16": "bfloat16"}
AUTO = "auto"


def dtype_name(dtype) -> str | None:
    """``None``/``"auto"`` → None (the backend's choice), a name from :data:`DTYPES` or a torch dtype → its
    canonical name; anything else raises BackendError."""
    from ..errors import BackendError

    if dtype is None or (isinstance(dtype, str) and dtype.lower() == AUTO):
        return None
    if isinstance(dtype, str) and dtype.lower() in DTYPES:
        return DTYPES[dtype.lower()]
    name = str(dtype).replace("torch.", "")  # a torch.dtype, read without importing torch
    if type(dtype).__name__ == "dtype" and name in DTYPES.values():
        return name
    raise BackendError(f"unknown dtype {dtype!r}; use 'auto' or one of {', '.join(sorted(DTYPES))}")


def numpy_dtype(name: str):
    """A manifest dtype name as a numpy dtype; ``bfloat16`` through ml_dtypes (numpy has none), BackendError
    when ml_dtypes is not installed."""
    import numpy as np

    if name != "bfloat16":
        return np.dtype(name)
    try:
        import ml_dtypes
    except ImportError:
        from ..errors import BackendError

        raise BackendError("this export keeps bfloat16 tensors: install ml_dtypes (pip install ml-dtypes) to run it") \
            from None
    return np.dtype(ml_dtypes.bfloat16)
