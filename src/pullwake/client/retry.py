"""When the client tries a call again, and how long it waits first.

Only calls that are safe to repeat are retried: GET, PUT and DELETE, and the two sends when
every message carries an ``idempotency_key`` (the server answers a repeat with the original
offset and ``duplicate: true``). They are retried after a connection failure or timeout and
after a 429, 502, 503 or 504, with capped exponential back-off plus jitter, and never sooner
than the server's ``Retry-After``.
"""

from __future__ import annotations

import random as _random
from collections.abc import Callable
from dataclasses import dataclass, field

import httpx

__all__ = ["NO_RETRY", "RetryPolicy"]

_TRANSIENT_ERRORS = (httpx.TimeoutException, httpx.NetworkError, httpx.RemoteProtocolError)


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """``attempts`` tries in all (1: never retry); delays double from ``initial_s`` up to
    ``max_s``, each plus up to ``jitter`` of itself. A ``Retry-After`` longer than
    ``max_retry_after_s`` is not waited for: the error is raised for the caller to decide."""

    attempts: int = 4
    initial_s: float = 0.25
    max_s: float = 8.0
    jitter: float = 0.25
    max_retry_after_s: float = 60.0
    statuses: frozenset[int] = frozenset({429, 502, 503, 504})
    random: Callable[[], float] = field(default=_random.random, compare=False, repr=False)

    def __post_init__(self) -> None:
        if self.attempts < 1:
            raise ValueError("attempts must be at least 1")
        if not 0 < self.initial_s <= self.max_s:
            raise ValueError("need 0 < initial_s <= max_s")
        if not 0 <= self.jitter <= 1:
            raise ValueError("jitter must be within [0, 1]")

    def backoff_s(self, retry: int) -> float:
        """The un-jittered delay before retry number ``retry`` (1 for the first)."""
        return float(min(self.initial_s * 2 ** max(retry - 1, 0), self.max_s))

    def delay_s(self, retry: int, *, retry_after: float | None = None) -> float | None:
        """Seconds to wait before retry number ``retry`` (1 for the first), or None: give up
        (no tries left, or the server asks for a longer wait than ``max_retry_after_s``)."""
        if retry >= self.attempts:
            return None
        base = self.backoff_s(retry)
        if retry_after is not None:
            if retry_after > self.max_retry_after_s:
                return None
            base = max(base, retry_after)
        # Jitter is only added: never sooner than Retry-After, and callers spread out.
        return base + base * self.jitter * min(max(self.random(), 0.0), 1.0)

    def retries_status(self, status: int) -> bool:
        """Whether an answer with this status is worth another try (of a repeatable call)."""
        return status in self.statuses

    @staticmethod
    def retries_error(exc: httpx.TransportError) -> bool:
        """Whether this failure to get an answer is worth another try (of a repeatable call):
        timeouts and network errors are; a malformed URL or a proxy refusal is not."""
        return isinstance(exc, _TRANSIENT_ERRORS)


NO_RETRY = RetryPolicy(attempts=1)
"""Every call is tried once."""
