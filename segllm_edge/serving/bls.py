"""The ``segllm`` BLS model: the multi-round loop inside Triton, one Session per conversation.

Layers, each testable without Triton:

* :class:`TritonBlsBackend` implements the runtime's Backend protocol by *calling models*:
  ``call(model_name, inputs: dict[str, np.ndarray], output_names) -> dict[str, np.ndarray]``.
  Inside Triton ``call`` is :func:`pb_utils_caller` (``pb_utils.InferenceRequest(...).exec()``);
  in unit tests it is :class:`InProcessCaller`, which runs the same model classes in-process.
  Token embeddings are a table lookup done in the BLS process (the manifest's ``embed_tokens``
  array, memory-mapped). The ``llm`` and both CLIP graphs (:data:`~segllm_edge.contracts.serving.BLS_GRAPHS`)
  run in the BLS process itself (:class:`~segllm_edge.serving.bls_graphs.BlsGraphs`): each
  conversation's KV cache never crosses a process boundary, and CLIP is held once; the other
  graphs are models called through ``call``.
* :class:`BlsSession` is :class:`~segllm_edge.runtime.session.Session` on the encoded image bytes, with the
  Session's own stages (so a remote round reports the local stage names). The ``encode_image`` ensemble
  stays in the repository for clients that want image features alone.
* :class:`ConversationService` holds the conversations: keyed by an unguessable token drawn at
  START (no Triton sequence batcher: capacity is the store's alone), expired after an idle
  timeout, capped at ``max_conversations``; ``handle(inputs, ctx)`` turns one request into one
  round (or a close), after checking every limit of :mod:`segllm_edge.limits`.
* :class:`SegLLMBlsModel` is the python-backend entry point (``segllm_entrypoint``).
"""
from __future__ import annotations

import json
import secrets
import threading
import time
from pathlib import Path
from typing import Callable, Mapping, Sequence

import numpy as np

from ..contracts.export_folder import open_export
from ..contracts.manifest import KV_INPLACE, kv_names
from ..contracts.precisions import numpy_dtype
from ..contracts.serving import (BLS_GRAPHS, PARAM_THREADS, TIMINGS_IN_PROCESS, IN_CONVERSATION, IN_END, IN_IMAGE, IN_QUESTION, IN_REFS, IN_START,
                                 IN_WANT_MASK_LOGITS, OUT_BOX, OUT_CONTEXT_TOKENS, OUT_CONVERSATION, OUT_MASK,
                                 OUT_MASK_LOGITS, OUT_MEMORY, OUT_MODEL_BOX, OUT_MODEL_MASK, OUT_NEW_TOKENS,
                                 OUT_QUERY_INDEX, OUT_ROUND, OUT_SCORE, OUT_TIMINGS, PARAM_CLIP_SIZE, PARAM_EXPORT_DIR,
                                 PARAM_IDLE_TIMEOUT, PARAM_MAX_CONVERSATIONS, PARAM_MAX_SESSION_BYTES, PARAM_REDIS_URL,
                                 PARAM_STATE_DIR, PARAM_STATE_MAX_BYTES, PARAM_STATE_MAX_TOTAL_BYTES, PREPROCESS_MODEL,
                                 TIMINGS_CALLS)
from ..errors import BackendError, ImageError, QuestionError, RoundReferenceError, ServerBusyError, SessionError
from ..pipeline.tokenizer import SegLLMTokenizer
from ..runtime.arena import llm_run_options
from ..runtime.device_kv_cache import concat_kv_cache
from ..runtime.session import Session
from ..runtime.transaction import snapshot
from .durable import DurableConversations, replay, round_number
from .models import decode_image_bytes, resolve_model_path
from .pystub import PythonModel, RequestContext
from .wire import ERROR_CLASSES, bracketed, encode_mask_png, parse_bracketed


Caller = Callable[[str, Mapping[str, np.ndarray], Sequence[str]], dict]

# --------------------------------------------------------------------------------------------
# the Backend over model calls
# --------------------------------------------------------------------------------------------
class TritonBlsBackend:
    """Backend protocol on top of per-graph models reached through ``call``, with the graphs of
    :data:`~segllm_edge.contracts.serving.BLS_GRAPHS` run in this process (``local``: a
    :class:`~segllm_edge.serving.bls_graphs.BlsGraphs`, opened from the export unless given).

    Tensor names come from the export's manifest (never listed here); only the model names
    (= manifest graph names) are fixed.
    """

    name = "triton-bls"

    def __init__(self, export_dir: str | Path, call: Caller, local=None, threads: int | None = None):
        export = open_export(export_dir)
        if local is None:
            from .bls_graphs import BlsGraphs

            local = BlsGraphs(export, threads)
        self.local = local
        self.folder = export.folder
        self.manifest = export.manifest
        self.info = export.info
        self.tokenizer = SegLLMTokenizer.from_folder(export.tokenizer_dir)
        self.embed = export.embed_table()
        self.call = call
        self._past, self._present = kv_names(self.info.num_layers)
        g = self.manifest.graphs
        self._io = {n: ([t.name for t in s.inputs], [t.name for t in s.outputs], {t.name: numpy_dtype(t.dtype) for t in s.inputs})
                    for n, s in g.items()}
        self._timers = threading.local()       # per round: rounds of different conversations run at once

    # -- per-round timers (thread-local: each round runs on one worker thread) -------------------
    @property
    def call_ms(self) -> dict[str, float]:
        """ms this thread's round spent waiting on model calls, by model."""
        return self._timer("call")

    @property
    def local_ms(self) -> dict[str, float]:
        """ms this thread's round spent running BLS_GRAPHS here (BLS overhead = the rest), by graph."""
        return self._timer("local")

    def _timer(self, kind: str) -> dict[str, float]:
        d = getattr(self._timers, kind, None)
        if d is None:
            d = {}
            setattr(self._timers, kind, d)
        return d

    def reset_timers(self) -> None:
        self._timers.call, self._timers.local = {}, {}

    def _add_ms(self, kind: str, graph: str, t0: float) -> None:
        d = self._timer(kind)
        d[graph] = d.get(graph, 0.0) + (time.perf_counter() - t0) * 1e3

    # -- helpers -------------------------------------------------------------------------------
    def _run(self, graph: str, feeds: dict[str, np.ndarray], run_options=None) -> list[np.ndarray]:
        ins, outs, dts = self._io[graph]
        feeds = {k: np.ascontiguousarray(v, dtype=dts[k]) for k, v in feeds.items()}
        t0 = time.perf_counter()
        if graph in self.local:
            got = self.local.run(graph, feeds, outs, run_options)
            self._add_ms("local", graph, t0)
            return got
        got = self.call(graph, feeds, outs)
        self._add_ms("call", graph, t0)
        return [got[o] for o in outs]

    # -- Backend protocol ----------------------------------------------------------------------
    def embed_tokens(self, ids: np.ndarray) -> np.ndarray:
        return np.asarray(self.embed[np.asarray(ids, dtype=np.int64)], dtype=np.float32)

    def encode_image(self, pixels):
        (name,) = self._io["vision_encoder"][0]
        return self._run("vision_encoder", {name: pixels})[0]

    def encode_masks(self, crops, boxes):
        c, b = self._io["mask_encoder"][0]
        return self._run("mask_encoder", {c: crops, b: boxes})[0]

    def new_cache(self):
        dt = self._io["llm"][2][self._past[0]]
        # device buffers (IOBinding) when the in-process llm binds its KV cache (see bls_graphs), else host arrays
        device = self.local.kv_device if getattr(self.local, "bind_kv", False) else None
        if self.manifest.kv_layout == KV_INPLACE:     # buffers the llm writes into (runtime/kv_buffer.py)
            from ..runtime.kv_buffer import inplace_cache

            return inplace_cache(self.info, dt, device)
        return concat_kv_cache(self.info, dt, device)

    def llm(self, embeds, cache):
        keep = cache is not None
        if cache is None:
            cache = self.new_cache()
        if self.manifest.kv_layout == KV_INPLACE:
            t0 = time.perf_counter()
            hidden = self.local.llm_inplace(np.asarray(embeds, dtype=self._io["llm"][2][self._io["llm"][0][0]]), cache,
                                            self._io["llm"][0][0], self._past, self._io["llm"][1][0], self._present)
            self._add_ms("local", "llm", t0)
            return hidden
        if getattr(self.local, "bind_kv", False):
            ins, outs, dts = self._io["llm"]
            t0 = time.perf_counter()
            hidden = self.local.llm_bound(np.ascontiguousarray(embeds, dtype=dts[ins[0]]), cache, ins, outs)
            self._add_ms("local", "llm", t0)
            return hidden
        emb_name = self._io["llm"][0][0]
        feeds = {emb_name: embeds}
        feeds.update(zip(self._past, cache.arrays))
        # after a prefill the llm's arena gives back what it grew by
        out = self._run("llm", feeds, llm_run_options(getattr(self.local, "sessions", {}).get("llm"), np.shape(embeds)[1]))
        if keep:
            cache.arrays = [np.ascontiguousarray(a) for a in out[1:]]
        return out[0]

    def seg_head(self, hidden):
        (name,) = self._io["seg_head"][0]
        return self._run("seg_head", {name: hidden})[0]

    def mask_backbone(self, image):
        (name,) = self._io["mask_backbone"][0]
        return self._run("mask_backbone", {name: image})

    def mask_decode(self, features, cond):
        ins, outs, _ = self._io["mask_decoder"]
        feat_names = [n for n in ins if n.startswith("features.")]
        cond_name = next(n for n in ins if not n.startswith("features."))
        feeds = dict(zip(feat_names, features))
        feeds[cond_name] = cond
        return dict(zip(outs, self._run("mask_decoder", feeds)))

    def memory_bytes(self):
        return None


class BlsSession(Session):
    """A Session on encoded image bytes (decoded here: ImageError before any state exists).

    The image runs through the Session's own stages (``preprocess`` in this process, then one
    ``vision_encoder`` and one ``mask_backbone`` model call), so a round over the wire reports the same
    stage names as a local one."""

    def __init__(self, backend: TritonBlsBackend, payload: bytes, **kw):
        rgb = decode_image_bytes(payload)
        super().__init__(backend, rgb, **kw)
        self.payload = bytes(payload)     # what a durable state stores (runtime/session_state.py)


# --------------------------------------------------------------------------------------------
# conversations
# --------------------------------------------------------------------------------------------
class ConversationStore:
    """The live conversations, keyed by an unguessable token the server draws at START.

    The token (:func:`secrets.token_urlsafe`, 192 bits) is the conversation's only handle: holding
    it is what grants access, and nothing about it can be guessed from another conversation's.
    Capacity is this store's alone (no Triton sequence slots): a START over ``max_live`` is
    refused at once ("server full"), a conversation whose first round fails is dropped at once,
    and one left idle for ``idle_timeout_s`` expires.
    """

    def __init__(self, factory=None, idle_timeout_s: float | None = 600.0, max_live: int = 8,
                 clock=time.monotonic):
        self.idle_timeout_s = idle_timeout_s
        self.max_live = max_live
        self.clock = clock
        self._states: dict[str, tuple[float, object]] = {}
        self._in_use: dict[str, int] = {}      # tokens with a round running: never expired under it
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._states)

    def __contains__(self, token) -> bool:
        return token in self._states

    def expire(self) -> None:
        if not self.idle_timeout_s:
            return
        limit = self.clock() - self.idle_timeout_s
        with self._lock:
            old = [c for c, (t, _) in self._states.items() if t < limit and c not in self._in_use]
            dropped = [self._states.pop(c)[1] for c in old]
        for st in dropped:
            _close(st)

    def open(self, make) -> tuple[str, object]:
        """A new conversation from ``make()`` (ServerBusyError, a SessionError, "server full" at once at the cap)."""
        self.expire()
        if len(self._states) >= self.max_live:
            raise ServerBusyError(f"server full: it already holds {len(self._states)} live conversations "
                               f"(max_conversations={self.max_live}); close one or retry later")
        state = make()
        token = secrets.token_urlsafe(24)
        with self._lock:
            if len(self._states) >= self.max_live:
                raise ServerBusyError(f"server full (max_conversations={self.max_live}); retry later")
            self._states[token] = (self.clock(), state)
        return token, state

    def adopt(self, token: str, state) -> None:
        """Hold a conversation restored from a state store under its own token ("server full" at the cap)."""
        with self._lock:
            if token not in self._states and len(self._states) >= self.max_live:
                raise ServerBusyError(f"server full (max_conversations={self.max_live}); retry later")
            self._states[token] = (self.clock(), state)

    def get(self, token):
        self.expire()
        entry = self._states.get(token) if isinstance(token, str) else None
        if entry is None:
            idle = f" after {self.idle_timeout_s:g} s" if self.idle_timeout_s else ""
            raise SessionError("unknown conversation: it was never started, it ended, it idled out"
                               f"{idle}, the server restarted, or the request's conversation token is wrong "
                               "-- the server lost this conversation; start a new session")
        return entry[1]

    def hold(self, token) -> None:
        """A round of ``token`` starts: it cannot expire until :meth:`release`."""
        with self._lock:
            self._in_use[token] = self._in_use.get(token, 0) + 1

    def release(self, token) -> None:
        """The round of ``token`` ended: its idle clock restarts now."""
        with self._lock:
            n = self._in_use.pop(token, 0) - 1
            if n > 0:
                self._in_use[token] = n
            if token in self._states:
                self._states[token] = (self.clock(), self._states[token][1])

    def touch(self, token) -> None:
        """Restart the idle clock (at the end of a round: a round can take longer than the idle time)."""
        with self._lock:
            if token in self._states:
                self._states[token] = (self.clock(), self._states[token][1])

    def states(self) -> list:
        """The live conversations' states (a snapshot)."""
        with self._lock:
            return [st for _, st in self._states.values()]

    def drop(self, token) -> None:
        with self._lock:
            st = self._states.pop(token, None)
        if st is not None:
            _close(st[1])


def _close(state) -> None:
    if hasattr(state, "close"):
        state.close()


def _scalar_bytes(a) -> bytes | None:
    if a is None:
        return None
    a = np.asarray(a, dtype=object).reshape(-1)
    if a.size == 0:
        return None
    v = a[0]
    return v.encode() if isinstance(v, str) else bytes(v)


def _flag(a) -> bool:
    return a is not None and np.asarray(a).size > 0 and bool(np.asarray(a).reshape(-1)[0])


def default_session_bytes(info) -> int:
    """The per-conversation memory budget when none is configured: a full-context KV cache + 256 MiB
    (image state, and the masks of many rounds of a phone-sized image)."""
    return info.kv_bytes_per_token(4) * info.max_context + 256 * 2**20


class ConversationService:
    """Turns requests into rounds of :class:`BlsSession` conversations.

    Inputs (no batch dimension): ``start`` (BOOL, first round: carries ``image``), ``conversation``
    (the token the START's response returned; every later request), ``question`` (bytes), ``refs``
    (int32 [k], optional), ``end`` (BOOL; with no question it only closes). Every limit of
    :mod:`segllm_edge.limits` is checked before any graph runs.
    """

    def __init__(self, backend_factory: Callable[[], TritonBlsBackend], max_conversations: int = 8,
                 idle_timeout_s: float | None = 600.0, clock=time.monotonic, max_session_bytes: int | None = None,
                 state_store=None, metrics=None):
        self._backend_factory = backend_factory
        self.metrics = metrics                   # serving.metrics.ModelMetrics: each answered round's timings
        self.durable = DurableConversations(state_store) if state_store is not None else None
        self._backend: TritonBlsBackend | None = None
        self.max_session_bytes = max_session_bytes
        self.store = ConversationStore(None, idle_timeout_s, max_conversations, clock)

    @property
    def backend(self) -> TritonBlsBackend:
        if self._backend is None:
            self._backend = self._backend_factory()
        return self._backend

    @staticmethod
    def schedule_key(inputs: dict) -> str | None:
        """The queue of a request's round: its conversation's token (a START has none yet: None)."""
        if _flag(inputs.get(IN_START)):
            return None
        token = _scalar_bytes(inputs.get(IN_CONVERSATION))
        return token.decode("ascii", "replace") if token else None

    @staticmethod
    def _question(inputs: dict) -> str | None:
        from ..limits import MAX_QUESTION_BYTES

        q = _scalar_bytes(inputs.get(IN_QUESTION))
        if q is None:
            return None
        if len(q) > MAX_QUESTION_BYTES:       # before decoding or tokenizing anything
            raise QuestionError(f"the question is {len(q)} bytes, over the limit of {MAX_QUESTION_BYTES} bytes")
        return q.decode("utf-8", "replace")

    @staticmethod
    def _refs(inputs: dict) -> list[int] | None:
        from ..limits import MAX_REFS

        a = inputs.get(IN_REFS)
        if a is None:
            return None
        a = np.asarray(a).reshape(-1)
        if a.size > MAX_REFS:
            raise RoundReferenceError(f"{a.size} references in one round, over the limit of {MAX_REFS}")
        return [int(r) for r in a]

    def handle(self, inputs: dict, ctx: RequestContext | None = None) -> dict:
        t_start = time.perf_counter()
        backend = self.backend
        backend.reset_timers()
        written: dict = {}                       # the durable save's bytes and ms
        start, end = _flag(inputs.get(IN_START)), _flag(inputs.get(IN_END))
        token_b = _scalar_bytes(inputs.get(IN_CONVERSATION))
        token = token_b.decode("ascii", "replace") if token_b else None
        question = self._question(inputs)
        refs = self._refs(inputs)
        image = _scalar_bytes(inputs.get(IN_IMAGE))
        if start:
            if token is not None:
                raise SessionError("a START request must not name a conversation: the server assigns one")
            if image is None:
                raise ImageError("the first request of a conversation (start) must carry the image")
            if question is None:
                raise QuestionError("the request has no question")
            token, session = self.store.open(lambda: BlsSession(backend, image, max_bytes=self._budget()))
            try:
                result = session.ask(question, refs)
                if self.durable is not None:
                    written = self.durable.save(token, session, expect=None)   # durable before the answer leaves
            except BaseException:
                self.store.drop(token)           # a failed first round holds nothing
                raise
        else:
            if token is None:
                raise SessionError("the request names no conversation: send start (with the image) first")
            if end and (question is None or not question.strip()):
                if self.durable is None or not self.durable.holds(token):
                    self.store.get(token)        # unknown: SessionError
                self._drop(token)                # close(): nothing to run, nothing to restore
                return self._closed_response(token)
            if image is not None:
                raise SessionError("an image can only be sent with the first round (start); "
                                   "open a new session for a new image")
            if question is None:
                raise QuestionError("the request has no question")
            asked = round_number(inputs)
            self.store.expire()                  # idled out before this round arrived: gone (SessionError below)
            self.store.hold(token)               # running: its idle clock stops (a round may outlast it)
            try:
                session = self._session(token)   # after the cheap checks: a restore encodes the image
                result = replay(session, asked, question, refs) if asked is not None else None
                if result is None:
                    result, written = self._round(token, session, question, refs)
            finally:
                self.store.release(token)
        want_logits = _flag(inputs.get(IN_WANT_MASK_LOGITS))
        if want_logits:
            check_logits_held(result)            # before an end drops the conversation
        if end:
            self._drop(token)
        else:
            self.store.touch(token)
        total = (time.perf_counter() - t_start) * 1e3
        timings = dict(result.timings)
        timings["bls_model_calls"] = sum(backend.call_ms.values())
        timings["bls_in_process"] = sum(backend.local_ms.values())
        timings["bls_total"] = total
        timings["bls_overhead"] = max(0.0, total - timings["bls_model_calls"] - timings["bls_in_process"])
        timings[TIMINGS_CALLS] = dict(backend.call_ms)
        timings[TIMINGS_IN_PROCESS] = dict(backend.local_ms)
        timings.update(written)
        if self.metrics is not None:
            self.metrics.round_answered(timings)
        return round_response(result, token, timings, want_logits=want_logits)

    def _budget(self) -> int:
        return self.max_session_bytes or default_session_bytes(self.backend.info)

    def _session(self, token: str):
        """The conversation from memory or, when memory lacks it or holds an older round, from the state store."""
        self.store.expire()
        held = token in self.store if isinstance(token, str) else False
        stored = self.durable.rounds(token) if self.durable is not None else None   # one store read per request
        if self.durable is not None and held and stored is None:
            self._drop(token)                    # closed through another replica (or expired from the store)
            raise SessionError("this conversation was closed or has expired; start a new session")
        if self.durable is not None and (not held or stored != len(self.store.get(token).rounds)):
            if not held and len(self.store) >= self.store.max_live:   # before the restore's image encode + prefill
                raise ServerBusyError(f"server full (max_conversations={self.store.max_live}); retry later")
            backend = self.backend
            restored = self.durable.load(token, backend, lambda img, reuse: BlsSession(backend, img,
                                                                                       max_bytes=self._budget()))
            if restored is not None:
                self.store.adopt(token, restored)
        return self.store.get(token)

    def _round(self, token: str, session, question: str, refs):
        """One round, saved to the state store before it is answered; a failed save undoes the round.
        Returns the result and the save's bytes and ms."""
        before = snapshot(session)
        n = len(session.rounds)
        result = session.ask(question, refs)
        written = {}
        if self.durable is not None:
            try:
                written = self.durable.save(token, session, expect=n)
            except BaseException:
                before.restore(session)
                raise
        return result, written

    def _drop(self, token: str) -> None:
        self.store.drop(token)
        if self.durable is not None:
            self.durable.drop(token)

    @staticmethod
    def _closed_response(token: str) -> dict:
        return closed_response(token)


def check_logits_held(result) -> None:
    """A round asked for its mask logits has them (a replay from a state saved by an older version has not)."""
    if np.size(result.mask_logits) == 0:
        raise SessionError(f"round {result.round} was answered again from its stored state, which does not "
                           "hold its mask logits; ask for it without mask_logits")


def round_response(result, token: str, timings: dict, want_logits: bool = False) -> dict:
    """The response tensors of one round (:data:`~segllm_edge.contracts.serving.BLS_OUTPUTS`): every field of
    its :class:`~segllm_edge.runtime.results.RoundResult` but the trace; ``mask_logits`` only when asked for."""
    out = {
        OUT_MASK: np.array([encode_mask_png(result.mask)], dtype=np.object_),
        OUT_BOX: np.asarray(result.box, dtype=np.float32).reshape(4),
        OUT_MODEL_MASK: np.array([encode_mask_png(result.model_mask)], dtype=np.object_),
        OUT_MODEL_BOX: np.asarray(result.model_box, dtype=np.float32).reshape(4),
        OUT_SCORE: np.array([result.score], dtype=np.float32),
        OUT_ROUND: np.array([result.round], dtype=np.int32),
        OUT_QUERY_INDEX: np.array([result.query_index], dtype=np.int32),
        OUT_NEW_TOKENS: np.array([result.new_tokens], dtype=np.int32),
        OUT_CONTEXT_TOKENS: np.array([result.context_tokens], dtype=np.int32),
        OUT_MEMORY: np.array([json.dumps({k: int(v) for k, v in result.memory.items()}).encode()], dtype=np.object_),
        OUT_TIMINGS: np.array([json.dumps(timings).encode()], dtype=np.object_),
        OUT_CONVERSATION: np.array([token.encode()], dtype=np.object_),
    }
    if want_logits:
        check_logits_held(result)
        out[OUT_MASK_LOGITS] = np.ascontiguousarray(result.mask_logits, dtype=np.float32)
    return out


def closed_response(token: str) -> dict:
    """The response to a close (``end`` with no question): zeros, empty masks, the token."""
    ints = {n: np.zeros(1, np.int32) for n in (OUT_ROUND, OUT_QUERY_INDEX, OUT_NEW_TOKENS, OUT_CONTEXT_TOKENS)}
    return {OUT_MASK: np.array([b""], dtype=np.object_), OUT_BOX: np.zeros(4, np.float32),
            OUT_MODEL_MASK: np.array([b""], dtype=np.object_), OUT_MODEL_BOX: np.zeros(4, np.float32),
            OUT_SCORE: np.zeros(1, np.float32), **ints, OUT_MEMORY: np.array([b"{}"], dtype=np.object_),
            OUT_TIMINGS: np.array([b"{}"], dtype=np.object_),
            OUT_CONVERSATION: np.array([token.encode()], dtype=np.object_)}


# --------------------------------------------------------------------------------------------
# callers
# --------------------------------------------------------------------------------------------
def pb_utils_caller(model: str, inputs: Mapping[str, np.ndarray], outputs: Sequence[str]) -> dict:
    """Call another model of the same server (BLS), its outputs asked for in CPU memory: the round loop reads
    them as numpy arrays, and a model on a GPU instance (onnxruntime_onnx / tensorrt_plan, ``--target ngc``)
    would otherwise hand back GPU tensors, which ``as_numpy()`` cannot read."""
    import triton_python_backend_utils as pb_utils

    kw = {}
    if hasattr(pb_utils, "PreferredMemory"):   # Triton >= 23.04
        kw["preferred_memory"] = pb_utils.PreferredMemory(pb_utils.TRITONSERVER_MEMORY_CPU, 0)
    req = pb_utils.InferenceRequest(model_name=model,
                                    inputs=[pb_utils.Tensor(k, v) for k, v in inputs.items()],
                                    requested_output_names=list(outputs), **kw)
    resp = req.exec()
    if resp.has_error():
        msg = resp.error().message()
        parsed = parse_bracketed(msg)
        if parsed is not None:
            raise ERROR_CLASSES.get(parsed[0], BackendError)(parsed[1])
        if "ImageError" in msg:
            raise ImageError(msg.split("ImageError: ", 1)[-1])
        raise BackendError(f"model {model!r} failed: {msg}")
    return {o: host_array(pb_utils.get_output_tensor_by_name(resp, o), model, o) for o in outputs}


def host_array(tensor, model: str, name: str) -> np.ndarray:
    """A BLS response tensor as a numpy array; a clear error (not Triton's) for one left in GPU memory."""
    if tensor is None:
        raise BackendError(f"model {model!r} returned no output {name!r}")
    if hasattr(tensor, "is_cpu") and not tensor.is_cpu():
        raise BackendError(f"model {model!r} returned {name!r} in GPU memory although CPU memory was asked for "
                           "(a Triton older than 23.04 ignores preferred_memory); upgrade the server")
    return tensor.as_numpy()


class InProcessCaller:
    """Runs the repository's model classes in this process (tests, debugging): the same code paths
    as Triton minus the transport. Like the repository it has no model for
    :data:`~segllm_edge.contracts.serving.BLS_GRAPHS`."""

    def __init__(self, export_dir: str | Path, threads: int | None = None, graph_engine: str = "onnxruntime"):
        from ..contracts.manifest import Manifest
        from .models import OrtGraphModel, PreprocessModel
        from .repository import graph_model_config_dict

        folder = Path(export_dir)
        manifest = Manifest.load(folder)
        self.models: dict[str, PythonModel] = {}
        for name, g in manifest.graphs.items():
            if name in BLS_GRAPHS:
                continue
            m = OrtGraphModel()
            m.setup(graph_model_config_dict(g, folder / g.file, threads, int(manifest.model["max_context"]),
                                            engine=graph_engine))
            self.models[name] = m
        pre = PreprocessModel()
        pre.setup({"name": PREPROCESS_MODEL, "parameters": {
            PARAM_CLIP_SIZE: {"string_value": str(manifest.model["clip_image_size"])}}})
        self.models[PREPROCESS_MODEL] = pre

    def __call__(self, model: str, inputs: Mapping[str, np.ndarray], outputs: Sequence[str]) -> dict:
        got = self.models[model].infer(dict(inputs), RequestContext())
        return {o: got[o] for o in outputs}


# --------------------------------------------------------------------------------------------
# the python-backend entry point
# --------------------------------------------------------------------------------------------
class SegLLMBlsModel(PythonModel):
    """``segllm``: the BLS model (one instance: it holds the conversations). Parameters: ``segllm_export_dir``
    (absolute or relative to the model folder), ``segllm_max_conversations``, ``segllm_idle_timeout_s``,
    ``segllm_max_session_bytes`` (per-conversation memory budget; default :func:`default_session_bytes`)."""

    caller: Caller = staticmethod(pb_utils_caller)

    def initialize(self) -> None:
        name = self.config.get("name", "segllm")
        export_dir = resolve_model_path(self.params[PARAM_EXPORT_DIR], self.args, name)
        idle = float(self.params.get(PARAM_IDLE_TIMEOUT) or 600)
        cap = int(self.params.get(PARAM_MAX_CONVERSATIONS) or 8)
        budget = int(self.params.get(PARAM_MAX_SESSION_BYTES) or 0) or None
        threads = int(self.params.get(PARAM_THREADS) or 0) or None
        caller = self.caller
        from .state_store import open_store, redis_url_for_server

        redis_url = self.params.get(PARAM_REDIS_URL) or None
        store = open_store(self.params.get(PARAM_STATE_DIR) or None, redis_url and redis_url_for_server(redis_url), idle,
                           int(self.params.get(PARAM_STATE_MAX_BYTES) or 0) or None,
                           int(self.params.get(PARAM_STATE_MAX_TOTAL_BYTES) or 0) or None)
        from .metrics import ModelMetrics, triton_family

        self.metrics = ModelMetrics(name, triton_family())   # on Triton's metrics port (segllm_* families)
        self.service = ConversationService(lambda: TritonBlsBackend(export_dir, caller, threads=threads), cap, idle,
                                           max_session_bytes=budget, state_store=store, metrics=self.metrics)
        self.service.backend  # load tokenizer, manifest and the in-process graphs now: fail at model load
        from .round_scheduler import scheduler_from_parameters

        # rounds of different conversations at once (execute hands each request to it and returns; see pystub)
        self.scheduler = scheduler_from_parameters(self.params, cap, name=f"{name}-round")
        self.scheduler.on_change = self.metrics.rounds_in_flight

    def schedule_key(self, inputs: dict, ctx: RequestContext):
        """A conversation's rounds queue behind each other (its token); a START has a queue of its own."""
        key = self.service.schedule_key(inputs)
        return ("conversation", key) if key is not None else self.scheduler.unique_key()

    def infer(self, inputs: dict, ctx: RequestContext) -> dict:
        self._gauges()
        try:
            return self.service.handle(inputs, ctx)
        finally:
            self._gauges()

    def error_response(self, exc: BaseException):
        self.metrics.refused(exc)
        self._gauges()
        return super().error_response(exc)

    def _gauges(self) -> None:
        self.metrics.conversations(self.service.store.states())

    def finalize(self) -> None:
        self.stop_scheduler()
        self.metrics.close()

    def error_message(self, exc: BaseException) -> str:
        return bracketed(exc)
