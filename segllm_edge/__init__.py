"""segllm-edge: fast, faithful SegLLM inference (PyTorch reference, ONNX/onnxruntime, TensorRT, Triton)."""
from .api import SegLLM, load
from .errors import (BackendError, CheckpointError, ContextOverflowError, ImageError, QuestionError,
                     RoundReferenceError, SegLLMError, SessionError)

__version__ = "0.1.0"

__all__ = ["load", "SegLLM", "SegLLMError", "CheckpointError", "ImageError", "QuestionError",
           "RoundReferenceError", "ContextOverflowError", "SessionError", "BackendError", "__version__"]
