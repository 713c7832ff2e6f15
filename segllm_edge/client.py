"""Talk to a SegLLM Triton server: ``segllm_edge.connect("localhost:8001").session(image).ask(question)``.

Uses tritonclient's gRPC client and the ``segllm`` model's sequence batcher: the first round
carries START (and the image), :meth:`RemoteSession.close` sends END.  Errors the server reports
as ``[ClassName] message`` come back as the matching :mod:`segllm_edge.errors` class; a request
for a conversation the server no longer knows (restart, idle timeout) raises
:class:`~segllm_edge.errors.SessionError` -- never a wrong mask.
"""
from __future__ import annotations

import io
import itertools
import json
import os
import random
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .errors import BackendError, ImageError, QuestionError, SegLLMError, SessionError
from .contracts.serving import OUTPUT_NAMES
from .serving.wire import ERROR_CLASSES, decode_mask_png, parse_bracketed
#: Triton's own words for a non-START request on a correlation id it does not know
_LOST = ("must specify the start flag", "inference request for unknown sequence", "sequence batcher")


@dataclass
class RemoteRoundResult:
    round: int
    question: str
    refs: tuple[int, ...]
    mask: np.ndarray            # (H, W) bool at the original image size
    box: np.ndarray             # (4,) float32 xyxy, original image
    model_box: np.ndarray       # (4,) float32 xyxy, 1024 frame
    score: float
    timings: dict = field(default_factory=dict)   # server per-stage ms + "client_round_trip"

    @property
    def empty(self) -> bool:
        return not bool(self.mask.any())


def _image_bytes(image) -> bytes:
    """Encoded bytes to send: a path's file content as is, or PNG for a PIL image / array."""
    if isinstance(image, (bytes, bytearray)):
        return bytes(image)
    if isinstance(image, (str, Path)):
        p = Path(image)
        if not p.is_file():
            raise ImageError(f"image file not found: {p}")
        return p.read_bytes()
    from PIL import Image

    if isinstance(image, np.ndarray):
        from .pipeline.images import load_image

        image = Image.fromarray(load_image(image))
    if isinstance(image, Image.Image):
        buf = io.BytesIO()
        image.convert("RGB").save(buf, format="PNG")
        return buf.getvalue()
    raise ImageError(f"cannot send an image of type {type(image).__name__}; give a path, bytes, PIL image or array")


def map_error(exc: Exception) -> Exception:
    """A tritonclient exception → the segllm error class it names (or SessionError for a lost sequence)."""
    msg = exc.message() if hasattr(exc, "message") and callable(exc.message) else str(exc)
    msg = msg or str(exc)
    parsed = parse_bracketed(msg)
    if parsed is not None:
        name, rest = parsed
        if name in ERROR_CLASSES:
            return ERROR_CLASSES[name](rest)
        if name == "InternalError":
            return BackendError(f"the server failed: {rest}")
    low = msg.lower()
    if any(k in low for k in _LOST):
        return SessionError(f"the server lost this conversation (it restarted or the conversation idled out): {msg}")
    if "unavailable" in low or "connect" in low or "failed to connect" in low:
        return SessionError(f"the server is unreachable and may have lost this conversation: {msg}")
    return BackendError(f"Triton request failed: {msg}")


class SegLLMClient:
    """A connection to a server (gRPC ``host:port``); open one :meth:`session` per image."""

    def __init__(self, url: str = "localhost:8001", model: str = "segllm", timeout_s: float | None = None):
        import tritonclient.grpc as grpcclient

        self.url = url
        self.model = model
        self.timeout_s = timeout_s
        self._grpc = grpcclient
        self._client = grpcclient.InferenceServerClient(url)
        self._ids = itertools.count(random.SystemRandom().randrange(1, 2**40) << 16 | (os.getpid() & 0xFFFF))
        self._lock = threading.Lock()

    def is_ready(self) -> bool:
        try:
            return bool(self._client.is_server_ready() and self._client.is_model_ready(self.model))
        except Exception:
            return False

    def next_id(self) -> int:
        with self._lock:
            return next(self._ids) % (2**63 - 1) or 1

    def session(self, image) -> "RemoteSession":
        return RemoteSession(self, _image_bytes(image))

    def close(self) -> None:
        self._client.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    # -- transport ------------------------------------------------------------------------------
    def _infer(self, arrays: dict, sequence_id: int, start: bool, end: bool):
        from tritonclient.utils import InferenceServerException, np_to_triton_dtype

        g = self._grpc
        inputs = []
        for name, a in arrays.items():
            t = g.InferInput(name, list(a.shape), "BYTES" if a.dtype == np.object_ else np_to_triton_dtype(a.dtype))
            t.set_data_from_numpy(a)
            inputs.append(t)
        outs = [g.InferRequestedOutput(n) for n in OUTPUT_NAMES]
        try:
            return self._client.infer(self.model, inputs, outputs=outs, sequence_id=sequence_id,
                                      sequence_start=start, sequence_end=end, client_timeout=self.timeout_s)
        except InferenceServerException as exc:
            raise map_error(exc) from None


class RemoteSession:
    """One conversation on the server (a Triton sequence)."""

    def __init__(self, client: SegLLMClient, image: bytes, sequence_id: int | None = None, started: bool = False):
        self.client = client
        self.image = image
        self.sequence_id = sequence_id or client.next_id()
        self.started = started
        self.closed = False
        self.results: list[RemoteRoundResult] = []

    def ask(self, question: str, refs=None) -> RemoteRoundResult:
        if self.closed:
            raise SessionError("this session is closed")
        if not isinstance(question, str):
            raise QuestionError(f"a question must be a string, not {type(question).__name__}")
        arrays = {"question": np.array([[question.encode("utf-8")]], dtype=np.object_)}
        start = not self.started
        if start:
            arrays["image"] = np.array([[self.image]], dtype=np.object_)
        if refs:
            arrays["refs"] = np.asarray([list(refs)], dtype=np.int32)
        t0 = time.perf_counter()
        try:
            r = self.client._infer(arrays, self.sequence_id, start, False)
        except SegLLMError:
            if start:   # the server holds no conversation for this id: free Triton's sequence slot now
                self._send_end()
            raise
        rtt = (time.perf_counter() - t0) * 1e3
        self.started = True
        timings = json.loads(r.as_numpy("timings").reshape(-1)[0] or b"{}")
        timings["client_round_trip"] = rtt
        if "bls_total" in timings:
            timings["transport"] = max(0.0, rtt - timings["bls_total"])
        from .pipeline.tokenizer import split_refs

        text, inline = split_refs(question)
        merged = list(refs or []) + [x for x in inline if x not in (refs or [])]
        res = RemoteRoundResult(
            round=int(r.as_numpy("round").reshape(-1)[0]), question=text, refs=tuple(int(x) for x in merged),
            mask=decode_mask_png(r.as_numpy("mask").reshape(-1)[0]),
            box=r.as_numpy("box").reshape(-1).astype(np.float32), model_box=r.as_numpy("model_box").reshape(-1),
            score=float(r.as_numpy("score").reshape(-1)[0]), timings=timings)
        self.results.append(res)
        return res

    def _send_end(self) -> None:
        try:
            self.client._infer({"question": np.array([[b""]], dtype=np.object_)}, self.sequence_id, False, True)
        except SegLLMError:
            pass

    def close(self) -> None:
        """End the conversation on the server (frees its state and its sequence slot)."""
        if not self.closed and self.started:
            self._send_end()
        self.closed = True

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def connect(url: str = "localhost:8001", model: str = "segllm", timeout_s: float | None = None) -> SegLLMClient:
    """A client for a SegLLM Triton server's gRPC endpoint (``host:port``)."""
    return SegLLMClient(url, model=model, timeout_s=timeout_s)
