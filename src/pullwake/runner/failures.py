"""How long a failed claim is held before it ends: a delay that grows with each failure in a
row of the same entity, so that a handler that keeps failing is retried seconds apart, not
milliseconds (the server re-wakes the entity as soon as the claim ends)."""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Callable

__all__ = ["Failures"]


class Failures:
    """Failures in a row per entity in this process, and the delay each one earns.

    The n-th failure in a row waits ``initial_ms * 2**(n-1)``, at most ``max_ms``, plus up to
    ``jitter`` of itself (only ever added). Progress or success forgets the entity; so does the
    server parking it. At most ``limit`` entities are remembered (the oldest are forgotten).
    """

    def __init__(
        self,
        initial_ms: int,
        max_ms: int,
        *,
        random: Callable[[], float],
        jitter: float = 0.25,
        limit: int = 10_000,
    ) -> None:
        if initial_ms < 0 or max_ms < initial_ms:
            raise ValueError("need 0 <= retry_delay_ms <= max_retry_delay_ms")
        self.initial_ms = initial_ms
        self.max_ms = max_ms
        self.jitter = jitter
        self._random = random
        self._limit = limit
        self._counts: OrderedDict[str, int] = OrderedDict()

    def count(self, entity: str) -> int:
        """Failures in a row of ``entity`` so far."""
        return self._counts.get(entity, 0)

    def failed(self, entity: str) -> int:
        """Count one more failure in a row; returns the count."""
        count = self._counts.pop(entity, 0) + 1
        self._counts[entity] = count
        while len(self._counts) > self._limit:
            self._counts.popitem(last=False)
        return count

    def forget(self, entity: str) -> None:
        """``entity`` made progress (or was parked): its next failure starts over."""
        self._counts.pop(entity, None)

    def delay_ms(self, count: int) -> int:
        """The delay the ``count``-th failure in a row waits (0 when delays are off)."""
        if count <= 0 or self.initial_ms == 0:
            return 0
        base: int = min(self.initial_ms << min(count - 1, 40), self.max_ms)
        extra = math.floor(base * self.jitter * min(max(self._random(), 0.0), 1.0))
        return base + extra
