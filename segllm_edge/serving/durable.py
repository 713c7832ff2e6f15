"""The BLS model's side of durable conversations: save after every round, restore what memory lacks.

:class:`DurableConversations` sits between :class:`~segllm_edge.serving.bls.ConversationService` and a
:mod:`~segllm_edge.serving.state_store` store. Every state is saved through the public Session API
(:mod:`segllm_edge.runtime.session_state`), so it works whatever backend the BLS session runs on.

* :meth:`save` -- after a round, before the answer leaves: the whole durable state, compare-and-set on
  the round count the session had before the round (a conflict means another replica moved on);
* :meth:`load` -- a conversation this process does not hold (a restart, another replica): restored
  from the store (image encoded again, one prefill), or None when the store has none;
* :meth:`rounds` -- the stored state's round count: a conversation held in memory at another count is
  stale (another replica answered since) and the caller reloads it instead of answering from an old state.
"""
from __future__ import annotations

import time

import numpy as np

from ..contracts.serving import IN_ROUND
from ..errors import SessionError
from ..runtime.session_state import restore_session, save_session
from .state_store import StateStore, state_key


class DurableConversations:
    def __init__(self, store: StateStore):
        self.store = store

    def save(self, token: str, session, expect: int | None) -> dict:
        """Save; returns the bytes and ms of the write (reported in the round's timings)."""
        t0 = time.perf_counter()
        blob = save_session(session)
        t1 = time.perf_counter()
        self.store.put(state_key(token), blob, expect=expect)
        return {"state_bytes": len(blob), "state_save_ms": (t1 - t0) * 1e3,
                           "state_write_ms": (time.perf_counter() - t1) * 1e3}

    def load(self, token: str, backend, make_session):
        blob = self.store.get(state_key(token))
        if blob is None:
            return None
        return restore_session(blob, backend, make_session=make_session)

    def rounds(self, token: str) -> int | None:
        """Rounds of the stored state (None: the store has none). A held conversation whose stored state has
        more rounds is stale (another replica answered since): the caller reloads it."""
        return self.store.rounds(state_key(token))

    def holds(self, token: str) -> bool:
        return self.rounds(token) is not None

    def drop(self, token: str) -> None:
        self.store.delete(state_key(token))


def replay(session, round_no: int, question: str, refs=None):
    """The stored result of ``round_no`` when a client repeats the request of the round it asked last (its
    answer was lost with a crash after the state was written): the same question and the same references
    (given + inline, as the round merged them). SessionError for any other round number, or for a request
    that repeats the last round's number with another question or other references."""
    n = len(session.rounds)
    if round_no == n + 1:
        return None                              # the next round: run it
    if round_no == n and n:
        r = session.rounds[-1]
        text, merged = session.check_question(question, refs)    # merged as ask() merged the round's own
        if text == r.question and merged == tuple(int(x) for x in r.refs):
            return r.result
        raise SessionError(f"the request asks for round {round_no} again, which this conversation answered for "
                           f"another question or other references (refs {list(r.refs)}, this request's "
                           f"{list(merged)}); the next round is {n + 1}")
    raise SessionError(f"the request asks for round {round_no}, but this conversation has {n} answered "
                       f"round(s); the next one is {n + 1}")


def round_number(inputs: dict) -> int | None:
    a = inputs.get(IN_ROUND)
    if a is None or np.asarray(a).size == 0:
        return None
    return int(np.asarray(a).reshape(-1)[0])


__all__ = ["DurableConversations", "replay", "round_number"]
