"""Rounds of many conversations at once, each conversation's own rounds strictly in order.

:class:`RoundScheduler` is a pool of ``workers`` threads fed by one FIFO queue *per conversation* and a
round-robin list of the conversations that have work and none running:

* a conversation's rounds run one at a time, in the order they arrived (a round never overtakes an
  earlier round of its own conversation, so everything a round guarantees -- its tokens, its rollback on
  failure, its durable save -- holds exactly as when the server ran one round at a time);
* rounds of different conversations run at the same time, up to ``workers`` (``--max-concurrent-rounds``);
* a conversation whose round finishes goes to the *back* of the ready list: one conversation sending
  rounds back to back never holds a worker while others wait (no head-of-line blocking beyond the rounds
  already running);
* the queues are bounded: more than ``max_pending_per_conversation`` rounds of one conversation (running +
  waiting), or more than ``max_queued`` rounds waiting in all, is refused at once with
  :class:`~segllm_edge.errors.ServerBusyError` ("busy, retry") instead of queueing without bound.

Pure Python (``threading`` only), so the scheduling is tested without Triton; inside Triton the ``segllm``
BLS model's ``execute`` submits each request here and returns at once, and each job answers its request
through the request's response sender (:class:`~segllm_edge.serving.pystub.PythonModel`).
"""
from __future__ import annotations

import itertools
import threading
import time
from collections import deque
from typing import Callable, Hashable

from ..contracts.serving import (DEFAULT_MAX_CONCURRENT_ROUNDS, DEFAULT_MAX_PENDING_PER_CONVERSATION,
                                 PARAM_MAX_CONCURRENT_ROUNDS, PARAM_MAX_PENDING_PER_CONVERSATION,
                                 PARAM_MAX_QUEUED_ROUNDS)
from ..errors import ConfigError, ServerBusyError

Job = Callable[[], None]


class RoundScheduler:
    """``submit(key, job)`` runs ``job()`` on a worker thread, jobs of one ``key`` one after another in order.

    ``on_refused(job, exc)`` (optional) is called for each job still waiting when :meth:`close` is called
    without ``drain`` (every request must get its answer). A job must not raise; if it does, the exception
    goes to ``on_error(exc)`` (default: ignored) and the worker goes on. ``on_change(running, queued)``
    (optional attribute) is called after every change of those counts (the metrics' gauges).

    A job may return a callable, its *delivery* (sending the answer): it runs on the same worker after the job has
    left the running count and ``on_change`` has been told, so whoever receives the answer never sees its own
    round still counted as running or still pending for its conversation. (The key's next job may start while the
    delivery runs: everything the round did is done by then; only its answer is still on its way.)
    """

    def __init__(self, workers: int = 4, max_pending_per_conversation: int = 2, max_queued: int = 16,
                 name: str = "segllm-round", on_error: Callable[[BaseException], None] | None = None):
        for label, v in (("max_concurrent_rounds", workers), ("max_pending_per_conversation",
                                                              max_pending_per_conversation),
                         ("max_queued_rounds", max_queued)):
            _check_bound(label, v)
        self.workers = workers
        self.max_pending_per_conversation = max_pending_per_conversation
        self.max_queued = max_queued
        self.on_error = on_error
        self.on_change: Callable[[int, int], None] | None = None
        self._cond = threading.Condition()
        self._queues: dict[Hashable, deque] = {}     # key -> waiting jobs (FIFO)
        self._running: set = set()                   # keys with a job on a worker
        self._ready: deque = deque()                 # keys with waiting jobs and none running, round-robin
        self._queued = 0                             # waiting jobs, all keys
        self._closed = False
        self._unique = itertools.count()
        self.stats = {"submitted": 0, "refused": 0, "peak_running": 0, "peak_queued": 0}
        self._threads = [threading.Thread(target=self._work, name=f"{name}-{i}", daemon=True) for i in range(workers)]
        for t in self._threads:
            t.start()

    # -- submitting ------------------------------------------------------------------------------
    def unique_key(self) -> tuple:
        """A key no other job has (a conversation that does not exist yet: a START)."""
        return ("new", next(self._unique))

    def pending(self, key: Hashable) -> int:
        """Rounds of ``key`` running or waiting."""
        with self._cond:
            return self._pending(key)

    def _pending(self, key: Hashable) -> int:       # under self._cond
        return len(self._queues.get(key, ())) + (key in self._running)

    @property
    def running(self) -> int:
        with self._cond:
            return len(self._running)

    @property
    def queued(self) -> int:
        with self._cond:
            return self._queued

    def submit(self, key: Hashable, job: Job) -> None:
        """Queue ``job`` behind the earlier jobs of ``key``; ServerBusyError at once when a bound is reached."""
        with self._cond:
            if self._closed:
                raise ServerBusyError("the server is shutting down; retry against another replica or later")
            pending = self._pending(key)
            if pending >= self.max_pending_per_conversation:
                self.stats["refused"] += 1
                raise ServerBusyError(
                    f"server busy: this conversation already has {pending} round(s) running or waiting "
                    f"(max {self.max_pending_per_conversation} per conversation); wait for its answer, then retry")
            if self._queued >= self.max_queued:
                self.stats["refused"] += 1
                raise ServerBusyError(
                    f"server busy: {self._queued} rounds are waiting for one of its {self.workers} round slots "
                    f"(max_queued_rounds={self.max_queued}); retry in a moment")
            q = self._queues.setdefault(key, deque())
            q.append(job)
            self._queued += 1
            self.stats["submitted"] += 1
            self.stats["peak_queued"] = max(self.stats["peak_queued"], self._queued)
            if key not in self._running and len(q) == 1:
                self._ready.append(key)
            self._cond.notify()
        self._changed()

    def _changed(self) -> None:
        if self.on_change is not None:
            with self._cond:      # under the lock: the last call carries the last counts
                try:
                    self.on_change(len(self._running), self._queued)
                except Exception:     # a gauge must never fail a round
                    pass

    # -- working ---------------------------------------------------------------------------------
    def _next(self):
        with self._cond:
            while not self._ready:
                if self._closed:
                    return None, None
                self._cond.wait()
            key = self._ready.popleft()
            job = self._queues[key].popleft()
            self._queued -= 1
            self._running.add(key)
            self.stats["peak_running"] = max(self.stats["peak_running"], len(self._running))
            return key, job

    def _finish(self, key) -> None:
        with self._cond:
            self._running.discard(key)
            if self._queues.get(key):
                self._ready.append(key)      # to the back: the others that waited go first
                self._cond.notify()
            else:
                self._queues.pop(key, None)
            self._cond.notify_all()          # close() / wait_idle() watch this

    def _work(self) -> None:
        while True:
            key, job = self._next()
            if job is None:
                return
            self._changed()
            delivery = None
            try:
                delivery = job()
            except BaseException as e:  # a job answers its own request; this is a bug in it, not a reason to die
                self._report(e)
            finally:
                self._finish(key)
                self._changed()
            if callable(delivery):
                try:
                    delivery()
                except BaseException as e:
                    self._report(e)

    def _report(self, exc: BaseException) -> None:
        if self.on_error is not None:
            try:
                self.on_error(exc)
            except Exception:
                pass

    # -- stopping --------------------------------------------------------------------------------
    def wait_idle(self, timeout: float | None = None) -> bool:
        """Block until nothing runs or waits (True), or ``timeout`` seconds pass (False)."""
        end = None if timeout is None else time.monotonic() + timeout
        with self._cond:
            while self._running or self._queued:
                left = None if end is None else end - time.monotonic()
                if left is not None and left <= 0:
                    return False
                self._cond.wait(left)
        return True

    def close(self, drain: bool = True, timeout: float | None = None,
              on_refused: Callable[[Job, BaseException], None] | None = None) -> None:
        """Stop taking jobs; run the waiting ones (``drain``) or hand each to ``on_refused`` with a
        ServerBusyError; wait for the workers (at most ``timeout`` s)."""
        with self._cond:
            self._closed = True
            dropped = []
            if not drain:
                for q in self._queues.values():
                    dropped.extend(q)
                    q.clear()
                self._queued = 0
                self._ready.clear()
            self._cond.notify_all()
        for job in dropped:
            if on_refused is not None:
                on_refused(job, ServerBusyError("the server is shutting down; retry against another replica or later"))
        end = None if timeout is None else time.monotonic() + timeout
        for t in self._threads:
            t.join(None if end is None else max(0.0, end - time.monotonic()))


def _check_bound(label: str, v) -> int:
    """``v`` when it is an integer >= 1 (a bool is not), else ConfigError naming ``label``."""
    if not isinstance(v, int) or isinstance(v, bool) or v < 1:
        raise ConfigError(f"{label} must be an integer >= 1, got {v!r}")
    return v


def default_max_queued(max_conversations: int) -> int:
    """Rounds that may wait for a slot by default: two per live conversation."""
    return 2 * max(1, int(max_conversations))


def scheduler_parameters(max_concurrent_rounds: int | None = None, max_queued_rounds: int | None = None,
                         max_pending_per_conversation: int | None = None) -> dict[str, str]:
    """The ``segllm`` model's config parameters for these bounds (None: the default, not written);
    ConfigError on a bound < 1."""
    out = {}
    for param, label, v in ((PARAM_MAX_CONCURRENT_ROUNDS, "max_concurrent_rounds", max_concurrent_rounds),
                            (PARAM_MAX_QUEUED_ROUNDS, "max_queued_rounds", max_queued_rounds),
                            (PARAM_MAX_PENDING_PER_CONVERSATION, "max_pending_per_conversation",
                             max_pending_per_conversation)):
        if v is not None:
            out[param] = str(_check_bound(label, v))
    return out


def scheduler_from_parameters(params: dict, max_conversations: int, name: str = "segllm-round") -> RoundScheduler:
    """The scheduler a ``segllm`` model's config asks for (its parameters as strings; missing: the defaults)."""
    def get(param: str, default: int) -> int:
        raw = (params.get(param) or "").strip()
        if not raw:
            return default
        try:
            return int(raw)
        except ValueError:
            raise ConfigError(f"model parameter {param} must be an integer, got {raw!r}") from None

    return RoundScheduler(workers=get(PARAM_MAX_CONCURRENT_ROUNDS, DEFAULT_MAX_CONCURRENT_ROUNDS),
                          max_pending_per_conversation=get(PARAM_MAX_PENDING_PER_CONVERSATION,
                                                           DEFAULT_MAX_PENDING_PER_CONVERSATION),
                          max_queued=get(PARAM_MAX_QUEUED_ROUNDS, default_max_queued(max_conversations)), name=name)


__all__ = ["RoundScheduler", "default_max_queued", "scheduler_from_parameters", "scheduler_parameters"]
