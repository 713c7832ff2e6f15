"""Rounds as transactions: a snapshot of a session's mutable state, restored when a round fails.

A round touches: the list of rounds, the mask tokens it caches on earlier rounds, the image
state (built by round 1, rebuilt every round without reuse), the KV cache object and its
length.  :func:`snapshot` records all of them before the round; :meth:`Snapshot.restore`
puts them back on *any* exception (``KeyboardInterrupt`` included), so the next round sees
exactly the state an undisturbed session would have.  numpy/stdlib only.
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass
class Snapshot:
    rounds: list
    mask_tokens: list
    image: object
    cache: object
    cache_length: int

    def restore(self, session) -> None:
        session.rounds[:] = self.rounds
        for r, tok in zip(self.rounds, self.mask_tokens):
            r.mask_tokens = tok
        session._image = self.image
        session._cache = self.cache
        if self.cache is not None and self.cache.length > self.cache_length:
            self.cache.crop(self.cache_length)


def snapshot(session) -> Snapshot:
    cache = session._cache
    return Snapshot(rounds=list(session.rounds), mask_tokens=[r.mask_tokens for r in session.rounds],
                    image=session._image, cache=cache, cache_length=cache.length if cache is not None else 0)
