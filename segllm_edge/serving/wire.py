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


#: the Triton error code (``pb_utils.TritonError.<code>``) a refusal carries, most specific class first; Triton
#: turns it into the transport's status (:data:`STATUS_OF_CODE`), so clients and proxies see what happened
#: without reading the message -- and retry only what "unavailable" says may pass (a busy server)
ERROR_CODES = (
    (ServerBusyError, "UNAVAILABLE"),       # nothing ran: retry in a moment
    (SessionStateError, "INTERNAL"),         # the state store failed or holds something unreadable
    (SessionError, "NOT_FOUND"),             # no such conversation (never started, ended, idled out, restarted)
    (ImageError, "INVALID_ARG"), (QuestionError, "INVALID_ARG"), (RoundReferenceError, "INVALID_ARG"),
    (ContextOverflowError, "INVALID_ARG"), (LimitError, "INVALID_ARG"),
)
#: code → (gRPC status as tritonclient reports it, HTTP status), as Triton 2.51 maps them (measured)
STATUS_OF_CODE = {"INVALID_ARG": ("StatusCode.INVALID_ARGUMENT", "400"), "NOT_FOUND": ("StatusCode.NOT_FOUND", "404"),
                  "UNAVAILABLE": ("StatusCode.UNAVAILABLE", "503"), "INTERNAL": ("StatusCode.INTERNAL", "500")}
#: what a client raises for a code when the message names no class of that code
CLASS_OF_CODE = {"INVALID_ARG": SegLLMError, "NOT_FOUND": SessionError, "UNAVAILABLE": ServerBusyError,
                 "INTERNAL": BackendError}


def status_and_message(exc: BaseException) -> tuple:
    """``(status, message)`` of a client exception: tritonclient's are methods, others may be attributes or
    missing (None)."""
    return tuple(v() if callable(v) else v for v in (getattr(exc, a, None) for a in ("status", "message")))


def error_code(exc_or_class) -> str:
    """The Triton error code of an exception (or class): :data:`ERROR_CODES`, else ``"INTERNAL"``."""
    cls = exc_or_class if isinstance(exc_or_class, type) else type(exc_or_class)
    if cls.__name__ == "SequenceError":
        return "NOT_FOUND"
    for klass, code in ERROR_CODES:
        if issubclass(cls, klass):
            return code
    return "INTERNAL"


def code_of_status(status) -> str | None:
    """A tritonclient status (``"StatusCode.NOT_FOUND"`` over gRPC, ``"404"`` over HTTP) → the Triton code."""
    s = str(status)
    for code, statuses in STATUS_OF_CODE.items():
        if s in statuses:
            return code
    return None


def error_class(status, name: str | None) -> type | None:
    """The class a client raises for an answered error: by its status code, refined by the class the message names
    when that class has this code; None when the status is none of the codes (then by name alone)."""
    code = code_of_status(status)
    named = ERROR_CLASSES.get(name or "")
    if code is None:
        return named
    if named is not None and error_code(named) == code:
        return named
    return CLASS_OF_CODE[code]


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
