"""The input limits of segllm-edge: one definition, enforced by the API and the server alike.

Every limit is checked *before* the expensive work it protects (decoding, resizing,
tokenizing, running a graph), and a violation raises the package's own error class
(:class:`~segllm_edge.errors.ImageError`, :class:`~segllm_edge.errors.QuestionError`,
:class:`~segllm_edge.errors.RoundReferenceError`, :class:`~segllm_edge.errors.ConfigError`)
with a message naming the limit. Plain Python only (no numpy/PIL/torch), so the client,
the Triton models and the runtime import the same numbers.

=====================  ==============  ====================================================
limit                  value           why
=====================  ==============  ====================================================
image pixels           50 000 000      a 50 MP phone photo; read from the header, pre-decode
image aspect ratio     20 : 1          CLIP resizes the short side to 224 (1x60000 would
                                       allocate ~15 GB), HIPIE the long side to 1024 (1x3000
                                       would round the short side to 0 px)
encoded image bytes    64 MiB          checked before the bytes are read / decoded
question bytes         8 192 (UTF-8)   checked before tokenizing (a token covers >= 1 byte,
                                       so this also bounds the tokenizer's work)
question tokens        1 024           checked right after tokenizing the bounded text
references per round   16              each costs a CLIP pass over a crop
=====================  ==============  ====================================================
"""
from __future__ import annotations

from .errors import ConfigError, ImageError, QuestionError, RoundReferenceError

MAX_IMAGE_PIXELS = 50_000_000
MAX_ASPECT_RATIO = 20.0
MAX_IMAGE_BYTES = 64 * 2**20
MAX_QUESTION_BYTES = 8192
MAX_QUESTION_TOKENS = 1024
MAX_REFS = 16


def check_image_size(width: int, height: int, where: str = "image") -> None:
    """Pixels and aspect ratio of an image, from its header (nothing decoded yet)."""
    if width < 1 or height < 1:
        raise ImageError(f"{where} is empty ({width}x{height} pixels)")
    if width * height > MAX_IMAGE_PIXELS:
        raise ImageError(f"{where} of {width}x{height} = {width * height} pixels is over the limit of "
                         f"{MAX_IMAGE_PIXELS} pixels; downscale it first")
    ratio = max(width, height) / min(width, height)
    if ratio > MAX_ASPECT_RATIO:
        raise ImageError(f"{where} of {width}x{height} pixels has an aspect ratio of {ratio:.0f}:1, over the limit "
                         f"of {MAX_ASPECT_RATIO:.0f}:1; crop it first")


def check_image_bytes(n: int, where: str = "image") -> None:
    if n > MAX_IMAGE_BYTES:
        raise ImageError(f"{where} is {n} bytes, over the limit of {MAX_IMAGE_BYTES} bytes of encoded image")


def check_question(question) -> str:
    """A question's type, emptiness and size in bytes (before tokenizing). Returns it."""
    if not isinstance(question, str):
        raise QuestionError(f"a question must be a string, not {type(question).__name__}")
    n = len(question.encode("utf-8", "surrogatepass"))
    if n > MAX_QUESTION_BYTES:
        raise QuestionError(f"the question is {n} bytes, over the limit of {MAX_QUESTION_BYTES} bytes")
    if not question.strip():
        raise QuestionError("the question is empty")
    return question


def check_question_tokens(n: int) -> None:
    if n > MAX_QUESTION_TOKENS:
        raise QuestionError(f"the question is {n} tokens, over the limit of {MAX_QUESTION_TOKENS} tokens")


def check_refs(refs) -> list:
    """``refs=`` of ``ask()``: None or a list/tuple of round numbers (at most :data:`MAX_REFS`)."""
    if refs is None:
        return []
    if isinstance(refs, (str, bytes)) or not hasattr(refs, "__iter__"):
        raise RoundReferenceError(f"refs must be a list of round numbers such as [1, 2], not {refs!r}")
    refs = list(refs)
    if len(refs) > MAX_REFS:
        raise RoundReferenceError(f"{len(refs)} references in one round, over the limit of {MAX_REFS}")
    return refs


def check_byte_budget(name: str, value) -> int | None:
    """A memory budget argument (``max_kv_bytes=`` ...): None or a positive integer number of bytes."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        try:
            import numpy as np

            if isinstance(value, np.integer) and value > 0:
                return int(value)
        except ImportError:  # pragma: no cover
            pass
        raise ConfigError(f"{name} must be a positive number of bytes (an int), not {value!r}")
    return value


def graph_axis_limits(max_context: int) -> dict[str, int]:
    """Bounds of the manifest's symbolic axes for requests to the per-graph models (what the round loop
    can send: one image, one <seg> per round, up to :data:`MAX_REFS` crops, the model's context)."""
    return {"batch": 1, "masks": MAX_REFS, "n": 1, "seq": max_context, "past": max_context,
            "total": max_context}
