"""Talk to a SegLLM Triton server: ``segllm_edge.connect("localhost:8001").session(image).ask(question)``.

Uses tritonclient's gRPC client. The first round carries ``start`` and the image; its response
carries the conversation's token, an unguessable secret the server draws, which every later
request carries (nothing else identifies a conversation); :meth:`RemoteSession.close` sends
``end``.  Errors the server reports as ``[ClassName] message`` come back as the matching
:mod:`segllm_edge.errors` class; a request for a conversation the server no longer knows
(restart, idle timeout) raises :class:`~segllm_edge.errors.SessionError` -- never a wrong mask.
A :class:`RemoteSession` may be shared between threads (its rounds run one at a time).
Every request has a deadline (``timeout_s``, default :data:`DEFAULT_TIMEOUT_S`).
While no server answers (a restart; ``serve --state-dir/--redis-url`` keeps the conversations) a request
is retried with bounded exponential backoff (``retry``, default about a minute: :mod:`.retry`);
errors a retry cannot fix are raised at once.
"""
from __future__ import annotations

import io
import json
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from . import limits
from .errors import BackendError, ImageError, SegLLMError, SessionError
from .contracts.serving import (ALWAYS_OUTPUTS, IN_CONVERSATION, IN_END, IN_IMAGE, IN_QUESTION, IN_REFS, IN_START,
                                IN_ROUND, IN_WANT_MASK_LOGITS, OUT_BOX, OUT_CONTEXT_TOKENS, OUT_CONVERSATION, OUT_MASK,
                                OUT_MASK_LOGITS, OUT_MEMORY, OUT_MODEL_BOX, OUT_MODEL_MASK, OUT_NEW_TOKENS,
                                OUT_QUERY_INDEX, OUT_ROUND, OUT_SCORE, OUT_TIMINGS, SERVING_TIMINGS, TIMINGS_CALLS,
                                TIMINGS_IN_PROCESS)
from .serving.wire import decode_mask_png, error_class, parse_bracketed, status_and_message

#: seconds a request may take before the client gives up (a HIPIE round on a CPU is seconds)
DEFAULT_TIMEOUT_S = 300.0
#: Triton's words for a lost sequence (servers from before conversation tokens)
_LOST = ("must specify the start flag", "inference request for unknown sequence", "sequence batcher")


@dataclass
class RemoteRoundResult:
    """A round answered by the server: the fields of :class:`~segllm_edge.runtime.results.RoundResult` (same
    names, types and values as a local round of the same conversation; ``mask_logits`` only when asked for,
    ``trace`` always None) plus ``serving``, the transport and BLS times."""

    round: int
    question: str
    refs: tuple[int, ...]
    mask: np.ndarray            # (H, W) bool at the original image size
    box: np.ndarray             # (4,) float32 xyxy, original image
    model_mask: np.ndarray      # (1024, 1024) bool in the model's padded frame
    model_box: np.ndarray       # (4,) float32 xyxy, 1024 frame
    mask_logits: np.ndarray | None   # (256, 256) float32, with ask(..., mask_logits=True); else None
    score: float
    query_index: int            # foreground query (0..99) that won
    timings: dict = field(default_factory=dict)   # the server's ms per stage: the local stage names
    new_tokens: int = 0         # tokens prefilled this round
    context_tokens: int = 0     # conversation length after this round
    memory: dict = field(default_factory=dict)    # bytes the server holds for the conversation (kv_cache, ...)
    trace: dict | None = None   # never sent over the wire
    serving: dict = field(default_factory=dict)   # ms: client_round_trip, transport, bls_total, ..., calls

    @property
    def empty(self) -> bool:
        return not bool(self.model_mask.any())

    def overlay(self, image, color=None, alpha: float | None = None) -> np.ndarray:
        """As :meth:`RoundResult.overlay <segllm_edge.runtime.results.RoundResult.overlay>`."""
        from .drawing import FILL_ALPHA, draw_overlay, mark_of

        return draw_overlay(image, [mark_of(self)], color=color, alpha=FILL_ALPHA if alpha is None else alpha)


def round_result(get, text: str, refs: tuple[int, ...], rtt_ms: float = 0.0,
                 want_logits: bool = False) -> RemoteRoundResult:
    """A response → :class:`RemoteRoundResult`; ``get(name)`` gives a response tensor (``InferResult.as_numpy``,
    or ``dict.get`` on what the BLS model returns)."""
    def one(name):
        return get(name).reshape(-1)[0]

    timings = json.loads(one(OUT_TIMINGS) or b"{}")
    serving = {k: timings.pop(k) for k in (*SERVING_TIMINGS, TIMINGS_CALLS, TIMINGS_IN_PROCESS) if k in timings}
    serving["client_round_trip"] = rtt_ms
    if "bls_total" in serving:
        serving["transport"] = max(0.0, rtt_ms - serving["bls_total"])
    logits = get(OUT_MASK_LOGITS) if want_logits else None
    return RemoteRoundResult(
        round=int(one(OUT_ROUND)), question=text, refs=refs, mask=decode_mask_png(one(OUT_MASK)),
        box=get(OUT_BOX).reshape(-1).astype(np.float32),
        model_mask=decode_mask_png(one(OUT_MODEL_MASK)),
        model_box=get(OUT_MODEL_BOX).reshape(-1).astype(np.float32),
        mask_logits=None if logits is None else np.asarray(logits, dtype=np.float32),
        score=float(one(OUT_SCORE)), query_index=int(one(OUT_QUERY_INDEX)), timings=timings,
        new_tokens=int(one(OUT_NEW_TOKENS)), context_tokens=int(one(OUT_CONTEXT_TOKENS)),
        memory={k: int(v) for k, v in json.loads(one(OUT_MEMORY) or b"{}").items()}, serving=serving)


def _image_bytes(image) -> bytes:
    """Encoded bytes to send: a path's file content as is, or PNG for a PIL image / array."""
    if isinstance(image, (bytes, bytearray)):
        return bytes(image)
    if isinstance(image, (str, Path)):
        p = Path(image)
        if isinstance(image, str) and "://" in image:
            raise ImageError(f"{image!r} is a URL; segllm-edge reads local files only: download the image first")
        if not p.is_file():
            raise ImageError(f"image file not found: {p}")
        limits.check_image_bytes(p.stat().st_size, f"image file {p}")
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
    if parsed is not None:                   # the server answered: its status code says what happened
        name, rest = parsed
        cls = error_class(status_and_message(exc)[0], name)
        if cls is BackendError or (cls is None and name == "InternalError"):
            return BackendError(f"the server failed: {rest}")
        if cls is not None:
            return cls(rest)
    low = msg.lower()
    if any(k in low for k in _LOST):
        return SessionError(f"the server lost this conversation (it restarted or the conversation idled out): {msg}")
    if "deadline exceeded" in low:
        return BackendError(f"the server did not answer within the client's timeout: {msg}")
    if "unauthenticated" in low or "restricted" in low or "unauthorized" in low or "permission" in low:
        return SessionError(f"the server refused the request (missing or wrong API key?): {msg}")
    if "unavailable" in low or "connect" in low or "failed to connect" in low:
        return SessionError(f"the server is unreachable and may have lost this conversation: {msg}")
    return BackendError(f"Triton request failed: {msg}")


class SegLLMClient:
    """A connection to a server (gRPC ``host:port``); open one :meth:`session` per image.

    ``timeout_s``: deadline of every request (None: :data:`DEFAULT_TIMEOUT_S`). ``api_key``: sent as the
    ``segllm-api-key`` header (``segllm-edge serve --api-key``). ``ssl``/``root_certificates``: TLS
    (``serve --tls-cert/--tls-key``)."""

    def __init__(self, url: str = "localhost:8001", model: str = "segllm", timeout_s: float | None = None,
                 api_key: str | None = None, ssl: bool = False, root_certificates: str | None = None, retry=None):
        import tritonclient.grpc as grpcclient

        from .retry import policy
        from .serving.security import grpc_headers

        self.retry = policy(retry)
        self._tls = dict(ssl=ssl, root_certificates=root_certificates)

        self.url = url
        self.model = model
        self.timeout_s = DEFAULT_TIMEOUT_S if timeout_s is None else float(timeout_s)
        self.headers = grpc_headers(api_key)
        self._grpc = grpcclient
        self._client = grpcclient.InferenceServerClient(url, ssl=ssl, root_certificates=root_certificates)
        self._channel_lock = threading.Lock()

    def is_ready(self) -> bool:
        try:
            return bool(self._client.is_server_ready(headers=self.headers, client_timeout=self.timeout_s)
                        and self._client.is_model_ready(self.model, headers=self.headers,
                                                        client_timeout=self.timeout_s))
        except Exception:
            return False

    def session(self, image) -> "RemoteSession":
        return RemoteSession(self, _image_bytes(image))

    def close(self) -> None:
        self._client.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    # -- transport ------------------------------------------------------------------------------
    def _infer(self, arrays: dict, outputs=ALWAYS_OUTPUTS, retry: bool = True, unsent_only: bool = False):
        from tritonclient.utils import InferenceServerException, np_to_triton_dtype

        g = self._grpc
        inputs = []
        for name, a in arrays.items():
            t = g.InferInput(name, list(a.shape), "BYTES" if a.dtype == np.object_ else np_to_triton_dtype(a.dtype))
            t.set_data_from_numpy(a)
            inputs.append(t)
        outs = [g.InferRequestedOutput(n) for n in outputs]
        from .retry import retryable

        delays = self.retry.delays() if retry else iter(())
        while True:
            channel = self._client
            try:
                return channel.infer(self.model, inputs, outputs=outs, headers=self.headers,
                                     client_timeout=self.timeout_s)
            except InferenceServerException as exc:
                delay = next(delays, None) if retryable(exc, unsent_only) else None
                if delay is None:
                    raise map_error(exc) from None
            time.sleep(delay)
            self._reconnect(channel)

    def _reconnect(self, failed) -> None:
        """A fresh channel in place of ``failed`` (gRPC's own reconnect backoff would wait longer), once for all
        the threads that saw it fail. ``failed`` is not closed here: other sessions' calls may still be on it
        (a close would cancel them); it closes when the last of them lets go of it."""
        with self._channel_lock:
            if self._client is failed:
                self._client = self._grpc.InferenceServerClient(self.url, **self._tls)


def _bytes1(b: bytes) -> np.ndarray:
    return np.array([b], dtype=np.object_)


class RemoteSession:
    """One conversation on the server. Thread-safe: concurrent ``ask``s run one after the other."""

    def __init__(self, client: SegLLMClient, image: bytes, conversation: str | None = None):
        self.client = client
        self.image = image
        self.conversation = conversation      # the server's token, after the first round
        self.closed = False
        self.results: list[RemoteRoundResult] = []
        self._next_round = 1 if conversation is None else None   # unknown for a conversation opened elsewhere
        self._lock = threading.RLock()

    @property
    def started(self) -> bool:
        return self.conversation is not None

    def ask(self, question: str, refs=None, mask_logits: bool = False) -> RemoteRoundResult:
        """One round. ``mask_logits=True`` also brings the round's (256, 256) logits (256 KiB more)."""
        limits.check_question(question)               # the server checks again; fail here without a request
        refs = limits.check_refs(refs)
        from .pipeline.tokenizer import split_refs

        text, inline = split_refs(question)
        arrays = {IN_QUESTION: _bytes1(question.encode("utf-8"))}
        if refs:
            arrays[IN_REFS] = np.asarray([int(r) for r in refs], dtype=np.int32)
        outputs = ALWAYS_OUTPUTS
        if mask_logits:
            arrays[IN_WANT_MASK_LOGITS] = np.array([True])
            outputs = (*ALWAYS_OUTPUTS, OUT_MASK_LOGITS)
        with self._lock:
            if self.closed:
                raise SessionError("this session is closed")
            if self.conversation is None:
                arrays[IN_START] = np.array([True])
                arrays[IN_IMAGE] = _bytes1(self.image)
            else:
                arrays[IN_CONVERSATION] = _bytes1(self.conversation.encode())
                if self._next_round is not None:   # a retried round is answered again, never run twice
                    arrays[IN_ROUND] = np.array([self._next_round], dtype=np.int32)
            t0 = time.perf_counter()
            # a start is retried only when it never left: one that reached a server may have opened a conversation
            r = self.client._infer(arrays, outputs, unsent_only=self.conversation is None)
            rtt = (time.perf_counter() - t0) * 1e3
            if self.conversation is None:
                self.conversation = r.as_numpy(OUT_CONVERSATION).reshape(-1)[0].decode()
            merged = list(refs) + [x for x in inline if x not in refs]
            res = round_result(r.as_numpy, text, tuple(int(x) for x in merged), rtt, mask_logits)
            self.results.append(res)
            if self._next_round is not None:
                self._next_round = res.round + 1
            return res

    def close(self) -> None:
        """End the conversation on the server (frees its state at once)."""
        with self._lock:
            if not self.closed and self.conversation is not None:
                try:
                    self.client._infer({IN_END: np.array([True]), IN_CONVERSATION: _bytes1(self.conversation.encode())},
                                       retry=False)    # a close does not wait for a server to come back
                except SegLLMError:
                    pass
            self.closed = True

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def connect(url: str = "localhost:8001", model: str = "segllm", timeout_s: float | None = None,
            api_key: str | None = None, ssl: bool = False, root_certificates: str | None = None,
            retry=None) -> SegLLMClient:
    """A client for a SegLLM Triton server's gRPC endpoint (``host:port``); see :class:`SegLLMClient`.
    ``retry``: how long to retry while no server answers -- seconds, a
    :class:`~segllm_edge.retry.RetryPolicy`, or False (default: about a minute)."""
    return SegLLMClient(url, model=model, timeout_s=timeout_s, api_key=api_key, ssl=ssl,
                        root_certificates=root_certificates, retry=retry)
