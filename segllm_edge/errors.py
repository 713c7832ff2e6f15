"""The errors segllm-edge raises on bad input. Each names the problem in plain words.

Everything derives from :class:`SegLLMError`, so callers can catch one type; the
subclasses let them tell a bad checkpoint from a bad image or a bad reference.
"""
from __future__ import annotations


class SegLLMError(Exception):
    """Base class of every error raised for bad input or bad state."""


class CheckpointError(SegLLMError):
    """A checkpoint or export folder is missing, corrupt, incomplete or of the wrong shape."""


class ImageError(SegLLMError):
    """An image could not be read or is of an unsupported kind."""


class RoundReferenceError(SegLLMError):
    """A question refers to a round that does not exist or has no mask."""


class QuestionError(SegLLMError):
    """A question is not a usable string (for example it contains a reserved token such as ``<seg>``)."""


class ContextOverflowError(SegLLMError):
    """The conversation would exceed the model's context or the session's memory budget."""


class SessionError(SegLLMError):
    """A session is unknown, closed, or was lost (for example by a server restart)."""


class BackendError(SegLLMError):
    """A backend is unknown or cannot run here (for example a missing optional package)."""


class AccuracyGuardError(SegLLMError):
    """A reduced-precision export drifted too far from fp32 on its drift report (the export is written)."""


__all__ = [
    "SegLLMError",
    "CheckpointError",
    "ImageError",
    "RoundReferenceError",
    "QuestionError",
    "ContextOverflowError",
    "SessionError",
    "BackendError",
    "AccuracyGuardError",
]


class ConfigError(SegLLMError, ValueError):
    """An argument or option has an unusable type or value (for example ``max_kv_bytes="abc"``)."""


__all__.append("ConfigError")


class LimitError(SegLLMError, ValueError):
    """A request is over one of the limits of :mod:`segllm_edge.limits` (sizes, shapes, counts)."""


__all__.append("LimitError")


class SessionStateError(SessionError):
    """A saved conversation state is truncated, corrupt, of another format version, over a store's cap,
    or belongs to another model/export (:mod:`segllm_edge.runtime.session_state`)."""


__all__.append("SessionStateError")


class ServerBusyError(SessionError):
    """The server has no room for this round right now (its round queues are full, or it is shutting down):
    nothing was run and nothing changed; retry in a moment."""


__all__.append("ServerBusyError")
