"""Exponential backoff with additive jitter and an injectable random source."""

from __future__ import annotations

import math
import random as _random
from collections.abc import Callable

__all__ = ["Backoff"]


class Backoff:
    """Delays doubling from ``initial_ms`` to ``max_ms``, each plus up to ``jitter`` of itself.

    Jitter is only ever added, so the first retry is never earlier than ``initial_ms`` and a
    restarted server does not see every runner return in the same millisecond.
    """

    def __init__(
        self,
        initial_ms: int = 1_000,
        max_ms: int = 30_000,
        *,
        jitter: float = 0.25,
        random: Callable[[], float] = _random.random,
    ) -> None:
        if initial_ms <= 0 or max_ms < initial_ms:
            raise ValueError("need 0 < initial_ms <= max_ms")
        if not 0 <= jitter <= 1:
            raise ValueError("jitter must be within [0, 1]")
        self.initial_ms = initial_ms
        self.max_ms = max_ms
        self.jitter = jitter
        self._random = random
        self._base_ms = initial_ms

    @property
    def base_ms(self) -> int:
        """The un-jittered delay the next call will use."""
        return self._base_ms

    def next_delay_ms(self) -> int:
        """The next delay (jittered); the base delay doubles for the call after."""
        base = self._base_ms
        self._base_ms = min(base * 2, self.max_ms)
        extra = math.floor(base * self.jitter * min(max(self._random(), 0.0), 1.0))
        return base + min(extra, math.floor(base * self.jitter))

    def reset(self) -> None:
        """Back to ``initial_ms`` (after a good connect)."""
        self._base_ms = self.initial_ms
