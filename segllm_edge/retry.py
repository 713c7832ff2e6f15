"""How a client rides out a server restart: bounded exponential backoff on errors a retry can fix.

Only transport failures that mean "no server answered" are retried (gRPC UNAVAILABLE: connection
refused or reset, the server going down or not up yet). Anything the server answered -- a bad
question, an unknown conversation, a full server, a deadline -- is raised at once. Retrying a round is
safe: the request names the round it asks for, and a server that already answered it (its answer was
lost with the crash) answers it again from the stored state instead of running it twice.
"""
from __future__ import annotations

import random
import time
from dataclasses import dataclass

from .errors import ConfigError

#: words of a gRPC error that mean no server answered (tritonclient puts the status in the message)
_UNAVAILABLE = ("statuscode.unavailable", "failed to connect", "connection refused", "connection reset",
                "socket closed", "broken pipe")


@dataclass(frozen=True)
class RetryPolicy:
    """``total_s``: give up after this long (0: never retry); delays start at ``first_delay_s`` and double up
    to ``max_delay_s``, with ±20 % jitter so that clients of one restarted server do not retry in lockstep."""

    total_s: float = 60.0
    first_delay_s: float = 0.25
    max_delay_s: float = 5.0

    def __post_init__(self):
        for name in ("total_s", "first_delay_s", "max_delay_s"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or v < 0:
                raise ConfigError(f"retry {name} must be a number >= 0, not {v!r}")

    def delays(self, clock=time.monotonic):
        """Seconds to sleep before each retry, until ``total_s`` is spent."""
        end = clock() + self.total_s
        d = self.first_delay_s
        while True:
            left = end - clock()
            if left <= 0:
                return
            yield min(left, d * random.uniform(0.8, 1.2))
            d = min(self.max_delay_s, d * 2)


#: of those, the words that mean the request never left (safe to resend even a request that is not idempotent)
_NOT_SENT = ("failed to connect", "connection refused")


def retryable(exc: BaseException, unsent_only: bool = False) -> bool:
    """True for a transport error that means no server answered (see :data:`_UNAVAILABLE`); with
    ``unsent_only``, only one that means the request never reached a server (:data:`_NOT_SENT`: a start is
    not idempotent, a reset connection may have started a conversation). An error the server answered
    (``[ErrorClass] ...``) is never retried, whatever words it carries."""
    from .serving.wire import parse_bracketed, status_and_message

    status, message = status_and_message(exc)
    if parse_bracketed(str(message if message is not None else exc)) is not None:
        return False
    text = " ".join(str(x) for x in (exc, status, message) if x is not None).lower()
    return any(w in text for w in (_NOT_SENT if unsent_only else _UNAVAILABLE))


def policy(retry) -> RetryPolicy:
    """``retry`` as a policy: a RetryPolicy, seconds (total), None (the default) or False/0 (no retries)."""
    if isinstance(retry, RetryPolicy):
        return retry
    if retry is None or retry is True:
        return RetryPolicy()
    if retry is False:
        return RetryPolicy(total_s=0)
    return RetryPolicy(total_s=retry)


__all__ = ["RetryPolicy", "retryable", "policy"]
