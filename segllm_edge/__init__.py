"""segllm-edge: fast, faithful SegLLM inference (PyTorch reference, ONNX/onnxruntime, TensorRT, Triton).

Imports are lazy so that light processes (Triton python-backend workers, the client) don't pay for torch.
"""
from .errors import (BackendError, CheckpointError, ConfigError, ContextOverflowError, ImageError, LimitError,
                     QuestionError, RoundReferenceError, SegLLMError, SessionError)

__version__ = "0.1.0"

__all__ = ["load", "connect", "drift_probe", "SegLLM", "SegLLMError", "CheckpointError", "ImageError", "QuestionError",
           "RoundReferenceError", "ContextOverflowError", "SessionError", "BackendError", "ConfigError", "LimitError",
           "__version__"]


def __getattr__(name):
    if name in ("load", "SegLLM", "drift_probe"):
        from . import api

        return getattr(api, name)
    if name == "connect":
        from .client import connect

        return connect
    raise AttributeError(f"module 'segllm_edge' has no attribute {name!r}")
