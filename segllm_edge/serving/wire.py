"""What travels between the ``segllm`` model and its clients: mask encoding and error names.

numpy + PIL only, so the client (:mod:`segllm_edge.client`) does not import torch.
"""
from __future__ import annotations

import io

import numpy as np

from ..errors import (BackendError, ConfigError, ContextOverflowError, ImageError, LimitError, QuestionError,
                      RoundReferenceError, SegLLMError, ServerBusyError, SessionError, SessionStateError)

#: error class name shown in brackets (``[RoundReferenceError] …``) → the class
ERROR_CLASSES = {
    "ImageError": ImageError, "QuestionError": QuestionError, "RoundReferenceError": RoundReferenceError,
    "ContextOverflowError": ContextOverflowError, "SessionError": SessionError, "BackendError": BackendError,
    "SegLLMError": SegLLMError, "LimitError": LimitError, "ConfigError": ConfigError,
    "SessionStateError": SessionStateError, "ServerBusyError": ServerBusyError,
}


def error_name(exc: BaseException) -> str:
    """The bracketed name of ``exc``: its segllm error class, ``SessionError`` for sequence errors,
    ``InternalError`` for anything else."""
    if type(exc).__name__ == "SequenceError":
        return "SessionError"
    for name, cls in ERROR_CLASSES.items():
        if type(exc) is cls:
            return name
    if isinstance(exc, SegLLMError):
        return type(exc).__name__
    return "InternalError"


def bracketed(exc: BaseException) -> str:
    """``[RoundReferenceError] round 3 refers to round 5…`` -- the message every failed request carries."""
    return f"[{error_name(exc)}] {exc}"


def parse_bracketed(message: str) -> tuple[str, str] | None:
    """``"... [Name] rest"`` → ``("Name", "rest")`` (Triton may prefix its own words), else None."""
    i = message.find("[")
    if i < 0 or "] " not in message[i:]:
        return None
    name, _, rest = message[i + 1:].partition("] ")
    return (name, rest) if name.isidentifier() else None


def encode_mask_png(mask: np.ndarray) -> bytes:
    """A bool mask → 1-bit PNG bytes (lossless, ~1 KB for a 640x480 blob)."""
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(np.asarray(mask, dtype=bool)).save(buf, format="PNG")
    return buf.getvalue()


def decode_mask_png(data: bytes) -> np.ndarray:
    from PIL import Image

    with Image.open(io.BytesIO(data)) as img:
        return np.asarray(img.convert("1"), dtype=bool)
