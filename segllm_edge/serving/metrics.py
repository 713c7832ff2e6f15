"""The ``segllm`` model's Prometheus metrics, on Triton's metrics port beside Triton's own ``nv_*`` ones.

Inside Triton the families are the python backend's custom metrics (``pb_utils.MetricFamily``); outside
(in-process serving, tests) :class:`LocalFamily` keeps the same values in memory. Every label takes a
bounded set of values (the model, the round's stages, the package's error classes), never a token.

================================== ========= ==================================================================
``segllm_round_stage_seconds``     histogram a round's time per stage (``stage``: :data:`runtime.profiler.STAGES`,
                                             ``round`` = the whole request inside the model, ``state_save``,
                                             ``state_write`` = the durable save)
``segllm_rounds_total``            counter   rounds answered
``segllm_refused_requests_total``  counter   requests refused, by ``reason`` (the error class) and ``code``
                                             (the Triton error code: INVALID_ARG, NOT_FOUND, UNAVAILABLE, INTERNAL)
``segllm_live_conversations``      gauge     conversations held in memory
``segllm_kv_cache_bytes``          gauge     their KV caches' bytes
``segllm_conversation_state_bytes`` gauge    everything they hold (KV, image features, masks)
``segllm_running_rounds``          gauge     rounds running now
``segllm_queued_rounds``           gauge     rounds waiting for a worker
================================== ========= ==================================================================
"""
from __future__ import annotations

import bisect
import re
import threading
from typing import Mapping

from ..runtime.profiler import STAGES

#: histogram bucket bounds (seconds): a CPU round is seconds, a GPU stage milliseconds
STAGE_BUCKETS_S = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 25.0, 60.0)
#: timings keys (ms) of a round that are observed, with their ``stage`` label
SERVING_STAGES = {"bls_total": "round", "state_save_ms": "state_save", "state_write_ms": "state_write"}

COUNTER, GAUGE, HISTOGRAM = "counter", "gauge", "histogram"
FAMILIES = {
    "round_stage": ("segllm_round_stage_seconds", HISTOGRAM, "Time of a segllm round per stage, in seconds"),
    "rounds": ("segllm_rounds_total", COUNTER, "Rounds the segllm model answered"),
    "refused": ("segllm_refused_requests_total", COUNTER, "Requests the segllm model refused, by reason and code"),
    "live": ("segllm_live_conversations", GAUGE, "Conversations held in memory"),
    "kv": ("segllm_kv_cache_bytes", GAUGE, "Bytes of the live conversations' KV caches"),
    "state": ("segllm_conversation_state_bytes", GAUGE, "Bytes the live conversations hold (KV, image, masks)"),
    "running": ("segllm_running_rounds", GAUGE, "Rounds running now"),
    "queued": ("segllm_queued_rounds", GAUGE, "Rounds waiting for a worker"),
}


class LocalMetric:
    """One labelled metric in memory (the subset of ``pb_utils.Metric`` used here)."""

    def __init__(self, kind: str, buckets=None):
        self.kind, self.buckets = kind, tuple(buckets or ())
        self.counts = [0] * (len(self.buckets) + 1)
        self.sum = 0.0
        self._value = 0.0
        self._lock = threading.Lock()

    def increment(self, v: float) -> None:
        with self._lock:
            self._value += v

    def set(self, v: float) -> None:
        with self._lock:
            self._value = float(v)

    def observe(self, v: float) -> None:
        with self._lock:
            self.counts[bisect.bisect_left(self.buckets, v)] += 1
            self.sum += v
            self._value += 1

    def value(self) -> float:
        return self._value


class LocalFamily:
    """``pb_utils.MetricFamily``'s interface, in memory (outside Triton)."""

    COUNTER, GAUGE, HISTOGRAM = COUNTER, GAUGE, HISTOGRAM

    def __init__(self, name: str, description: str, kind: str):
        self.name, self.description, self.kind = name, description, kind
        self.metrics: dict[tuple, LocalMetric] = {}

    def Metric(self, labels: Mapping[str, str] | None = None, buckets=None) -> LocalMetric:  # noqa: N802 (pb_utils)
        m = LocalMetric(self.kind, buckets)
        self.metrics[tuple(sorted((labels or {}).items()))] = m
        return m


def triton_family():
    """``pb_utils.MetricFamily`` inside Triton (a python backend with custom metrics), else :class:`LocalFamily`."""
    try:
        import triton_python_backend_utils as pb_utils
    except ImportError:
        return LocalFamily
    family = getattr(pb_utils, "MetricFamily", None)
    return family if family is not None and hasattr(family, "HISTOGRAM") else LocalFamily


class ModelMetrics:
    """The metrics of one ``segllm`` model (label ``model``); ``family`` is ``pb_utils.MetricFamily`` inside
    Triton, :class:`LocalFamily` outside. Thread-safe: rounds run on several workers."""

    def __init__(self, model: str, family=LocalFamily):
        self.model = model
        kinds = {COUNTER: family.COUNTER, GAUGE: family.GAUGE, HISTOGRAM: family.HISTOGRAM}
        self.families = {k: family(name=n, description=d, kind=kinds[kind]) for k, (n, kind, d) in FAMILIES.items()}
        self._metrics: dict[tuple, object] = {}
        self._lock = threading.Lock()

    def metric(self, family: str, **labels):
        """The metric of ``family`` with these labels (made on first use)."""
        key = (family, *sorted(labels.items()))
        m = self._metrics.get(key)
        if m is None:
            with self._lock:
                m = self._metrics.get(key)
                if m is None:
                    kw = {"buckets": list(STAGE_BUCKETS_S)} if FAMILIES[family][1] == HISTOGRAM else {}
                    m = self._metrics[key] = self.families[family].Metric(labels={"model": self.model, **labels}, **kw)
        return m

    def round_answered(self, timings: Mapping[str, object]) -> None:
        """A round's timings (ms, the response's ``timings``): the known stages into the histogram."""
        for key, ms in timings.items():
            stage = key if key in STAGES else SERVING_STAGES.get(key)
            if stage is not None and isinstance(ms, (int, float)):
                self.metric("round_stage", stage=stage).observe(max(0.0, float(ms)) / 1e3)
        self.metric("rounds").increment(1)

    def refused(self, exc: BaseException) -> None:
        """A refused request: ``reason`` is the package's error class (``unexpected`` for anything else)."""
        from ..errors import SegLLMError
        from .wire import error_code

        reason = type(exc).__name__ if isinstance(exc, SegLLMError) else "unexpected"
        self.metric("refused", reason=reason, code=error_code(exc)).increment(1)

    def conversations(self, states) -> None:
        """The live conversations' count and bytes (``states``: their sessions)."""
        states = list(states)
        self.metric("live").set(len(states))
        self.metric("kv").set(sum(s.kv_cache_bytes() for s in states))
        self.metric("state").set(sum(s.state_bytes() for s in states))

    def rounds_in_flight(self, running: int, queued: int) -> None:
        self.metric("running").set(running)
        self.metric("queued").set(queued)

    def close(self) -> None:
        """Drop the metrics, then the families (the python backend wants them deleted in that order)."""
        with self._lock:
            self._metrics.clear()
        self.families.clear()


_SAMPLE = re.compile(r'^([A-Za-z_:][A-Za-z0-9_:]*)(?:\{(.*)\})?\s+(\S+)')
_LABEL = re.compile(r'([A-Za-z_][A-Za-z0-9_]*)="((?:[^"\\]|\\.)*)"')


def parse_metrics(text: str) -> dict[tuple[str, frozenset], float]:
    """Prometheus text exposition → {(sample name, frozenset of (label, value)): value}."""
    out = {}
    for line in text.splitlines():
        m = _SAMPLE.match(line)
        if m is None or line.startswith("#"):
            continue
        labels = frozenset((k, v.encode().decode("unicode_escape")) for k, v in _LABEL.findall(m.group(2) or ""))
        out[(m.group(1), labels)] = float(m.group(3))
    return out


def scrape(url: str, timeout: float = 10.0) -> dict[tuple[str, frozenset], float]:
    """The metrics a server publishes at ``url`` (Triton: ``http://host:8002/metrics``), parsed."""
    import urllib.request

    with urllib.request.urlopen(url, timeout=timeout) as r:
        return parse_metrics(r.read().decode())


def sample(metrics: Mapping, name: str, **labels) -> float:
    """One sample of :func:`scrape`'s result (0 when absent: a metric appears at its first use)."""
    return metrics.get((name, frozenset(labels.items())), 0.0)
