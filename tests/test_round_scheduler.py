"""RoundScheduler with real threads: order within a conversation, overlap across, fairness, bounds, shutdown."""
from __future__ import annotations

import threading
import time

import pytest

from segllm_edge.errors import ConfigError, ServerBusyError
from segllm_edge.serving.round_scheduler import (RoundScheduler, default_max_queued, scheduler_from_parameters,
                                                 scheduler_parameters)


class Log:
    """Jobs that record when they start and end, optionally blocking on an event."""

    def __init__(self):
        self.lock = threading.Lock()
        self.events: list[tuple[str, str]] = []
        self.live = 0
        self.peak = 0

    def job(self, name: str, hold: float = 0.0, gate: threading.Event | None = None):
        def run():
            with self.lock:
                self.events.append(("start", name))
                self.live += 1
                self.peak = max(self.peak, self.live)
            if gate is not None:
                assert gate.wait(10)
            time.sleep(hold)
            with self.lock:
                self.live -= 1
                self.events.append(("end", name))
        return run

    def order(self, kind: str) -> list[str]:
        return [n for k, n in self.events if k == kind]


@pytest.fixture
def sched():
    made = []

    def make(**kw):
        s = RoundScheduler(**kw)
        made.append(s)
        return s

    yield make
    for s in made:
        s.close(drain=False, timeout=10)


def test_a_conversations_rounds_run_in_order_and_never_overlap(sched):
    s = sched(workers=4, max_pending_per_conversation=10, max_queued=100)
    log = Log()
    for i in range(6):
        s.submit("a", log.job(f"a{i}", hold=0.01))
    assert s.wait_idle(10)
    assert log.order("start") == [f"a{i}" for i in range(6)]
    assert log.peak == 1
    ev = log.events       # each round ends before the next starts
    assert ev == [(k, f"a{i}") for i in range(6) for k in ("start", "end")]


def test_rounds_of_different_conversations_overlap(sched):
    s = sched(workers=4, max_pending_per_conversation=2, max_queued=16)
    log = Log()
    gate = threading.Event()
    for c in "abcd":
        s.submit(c, log.job(c, gate=gate))
    deadline = time.monotonic() + 5
    while s.running < 4 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert s.running == 4 and log.live == 4      # all four at once, none waiting for another
    gate.set()
    assert s.wait_idle(10)
    assert s.stats["peak_running"] == 4


def test_at_most_workers_at_once(sched):
    s = sched(workers=2, max_pending_per_conversation=2, max_queued=16)
    log = Log()
    for c in "abcdef":
        s.submit(c, log.job(c, hold=0.05))
    assert s.wait_idle(10)
    assert log.peak == 2 and s.stats["peak_running"] == 2


def test_round_robin_a_busy_conversation_does_not_starve_the_others(sched):
    """One worker; conversation a queues 3 rounds, then b and c one each: b and c run before a's second round."""
    s = sched(workers=1, max_pending_per_conversation=5, max_queued=16)
    log = Log()
    gate = threading.Event()
    s.submit("a", log.job("a0", gate=gate))          # running
    s.submit("a", log.job("a1"))
    s.submit("a", log.job("a2"))
    s.submit("b", log.job("b0"))
    s.submit("c", log.job("c0"))
    gate.set()
    assert s.wait_idle(10)
    assert log.order("start") == ["a0", "b0", "c0", "a1", "a2"]


def test_a_short_round_is_not_stuck_behind_a_long_one(sched):
    s = sched(workers=2, max_pending_per_conversation=2, max_queued=16)
    log = Log()
    gate = threading.Event()
    s.submit("long", log.job("long", gate=gate))
    done = threading.Event()
    s.submit("short", lambda: done.set())
    assert done.wait(5)                               # finished while the long one still runs
    assert log.live == 1
    gate.set()
    assert s.wait_idle(10)


def test_per_conversation_bound_refuses_at_once(sched):
    s = sched(workers=1, max_pending_per_conversation=2, max_queued=16)
    gate = threading.Event()
    log = Log()
    s.submit("a", log.job("a0", gate=gate))
    s.submit("a", log.job("a1"))
    t0 = time.monotonic()
    with pytest.raises(ServerBusyError, match=r"this conversation already has 2 round.*max 2 per conversation"):
        s.submit("a", log.job("a2"))
    assert time.monotonic() - t0 < 0.5
    s.submit("b", log.job("b0"))                      # another conversation still gets in
    assert s.stats["refused"] == 1
    gate.set()
    assert s.wait_idle(10)
    assert log.order("start") == ["a0", "b0", "a1"]


def test_global_queue_bound_refuses_at_once(sched):
    s = sched(workers=1, max_pending_per_conversation=2, max_queued=2)
    gate = threading.Event()
    log = Log()
    s.submit("a", log.job("a", gate=gate))            # running: not queued
    deadline = time.monotonic() + 5
    while s.running < 1 and time.monotonic() < deadline:
        time.sleep(0.01)
    s.submit("b", log.job("b"))
    s.submit("c", log.job("c"))
    assert s.queued == 2
    with pytest.raises(ServerBusyError, match=r"2 rounds are waiting.*max_queued_rounds=2"):
        s.submit("d", log.job("d"))
    gate.set()
    assert s.wait_idle(10)
    assert sorted(log.order("end")) == ["a", "b", "c"]
    s.submit("d", log.job("d"))                       # room again
    assert s.wait_idle(10)


def test_a_failing_job_does_not_kill_its_worker(sched):
    seen = []
    s = sched(workers=1, max_pending_per_conversation=2, max_queued=4)
    s.on_error = seen.append

    def boom():
        raise RuntimeError("bug")

    done = threading.Event()
    s.submit("a", boom)
    s.submit("a", done.set)
    assert done.wait(5)
    assert [str(e) for e in seen] == ["bug"]


def test_an_answer_is_delivered_after_its_round_left_the_counts(sched):
    """A job's returned delivery (sending the answer) runs once the round is no longer running or pending and the
    gauges were told: a client holding its answer never scrapes its own round as running."""
    s = sched(workers=2, max_pending_per_conversation=2, max_queued=4)
    gauges, seen, failures = [], [], []
    s.on_change = lambda running, queued: gauges.append((running, queued))
    s.on_error = failures.append
    delivered = threading.Event()

    def deliver():
        seen.append((s.running, s.queued, s.pending("a"), gauges[-1]))
        delivered.set()

    def round_():
        seen.append(("ran", s.running))
        return deliver

    def bad_delivery():
        raise RuntimeError("send failed")

    s.submit("a", round_)
    assert delivered.wait(5)
    assert seen == [("ran", 1), (0, 0, 0, (0, 0))]
    s.submit("b", lambda: bad_delivery)                 # a failing delivery is reported, the worker goes on
    deadline = time.monotonic() + 5
    while not failures and time.monotonic() < deadline:
        time.sleep(0.01)
    assert [str(e) for e in failures] == ["send failed"]
    done = threading.Event()
    s.submit("b", done.set)
    assert done.wait(5)


def test_close_without_drain_refuses_waiting_rounds_and_finishes_running(sched):
    s = sched(workers=1, max_pending_per_conversation=3, max_queued=8)
    gate = threading.Event()
    log = Log()
    s.submit("a", log.job("a0", gate=gate))
    deadline = time.monotonic() + 5
    while s.running < 1 and time.monotonic() < deadline:
        time.sleep(0.01)
    w1, w2 = log.job("a1"), log.job("b0")
    s.submit("a", w1)
    s.submit("b", w2)
    refused = []
    closer = threading.Thread(target=s.close, kwargs=dict(drain=False, timeout=10,
                                                          on_refused=lambda job, exc: refused.append((job, exc))))
    closer.start()
    time.sleep(0.1)
    gate.set()
    closer.join(10)
    assert [j for j, _ in refused] == [w1, w2]
    assert all(isinstance(e, ServerBusyError) and "shutting down" in str(e) for _, e in refused)
    assert log.order("end") == ["a0"]                  # the running round finished; the others never ran
    with pytest.raises(ServerBusyError, match="shutting down"):
        s.submit("c", log.job("c"))


def test_close_with_drain_runs_what_waits(sched):
    s = sched(workers=1, max_pending_per_conversation=3, max_queued=8)
    log = Log()
    for i in range(3):
        s.submit("a", log.job(f"a{i}", hold=0.01))
    s.close(drain=True, timeout=10)
    assert log.order("end") == ["a0", "a1", "a2"]


@pytest.mark.parametrize("kw", [dict(workers=0), dict(max_pending_per_conversation=0), dict(max_queued=-1),
                                dict(workers=True), dict(workers=2.5)])
def test_bad_bounds_are_config_errors(kw):
    with pytest.raises(ConfigError, match="must be an integer >= 1"):
        RoundScheduler(**kw)


def test_parameters_round_trip_and_defaults():
    assert scheduler_parameters() == {}
    p = scheduler_parameters(3, 5, 1)
    s = scheduler_from_parameters(p, max_conversations=8)
    try:
        assert (s.workers, s.max_queued, s.max_pending_per_conversation) == (3, 5, 1)
    finally:
        s.close()
    s = scheduler_from_parameters({}, max_conversations=8)
    try:
        assert (s.workers, s.max_queued, s.max_pending_per_conversation) == (4, default_max_queued(8), 2)
        assert default_max_queued(8) == 16
    finally:
        s.close()
    with pytest.raises(ConfigError, match="max_queued_rounds must be an integer >= 1"):
        scheduler_parameters(max_queued_rounds=0)
    with pytest.raises(ConfigError, match="segllm_max_concurrent_rounds must be an integer"):
        scheduler_from_parameters({"segllm_max_concurrent_rounds": "many"}, 8)
