"""Whether the worker can reach Redis and Postgres: one log line per outage, a gauge, and a
redis-py ``Retry`` that waits out outages with back-off instead of raising."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

from redis.asyncio.retry import Retry
from redis.backoff import EqualJitterBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError
from redis.exceptions import TimeoutError as RedisTimeoutError

from pullwake.metrics import WORKER_DEPENDENCY_UP

__all__ = ["RETRYABLE", "OutageRetry", "Reachability", "WorkerHealth"]

log = logging.getLogger(__name__)
T = TypeVar("T")
RETRYABLE: tuple[type[Exception], ...] = (RedisConnectionError, RedisTimeoutError, OSError)
"""Errors that mean "Redis is not there right now" (refused, reset, timed out, loading)."""


class Reachability:
    """Up/down state of one dependency: a WARNING when an outage starts, an INFO when it ends,
    nothing in between (however many calls fail meanwhile)."""

    def __init__(self, name: str, clock: Callable[[], float] = time.monotonic) -> None:
        self.name = name
        self.clock = clock
        self.is_up = True
        self.down_since: float | None = None
        self.outages = 0
        WORKER_DEPENDENCY_UP.labels(name).set(1)

    def failed(self, error: BaseException) -> None:
        """Record a failed call; logs only when this starts an outage."""
        if not self.is_up:
            return
        self.is_up = False
        self.down_since = self.clock()
        self.outages += 1
        WORKER_DEPENDENCY_UP.labels(self.name).set(0)
        log.warning(
            "worker: %s is unreachable (%s: %s); retrying with back-off until it is back",
            self.name,
            type(error).__name__,
            error,
        )

    def succeeded(self) -> None:
        """Record a successful call; logs only when this ends an outage."""
        if self.is_up:
            return
        lasted = self.clock() - (self.down_since or self.clock())
        self.is_up = True
        self.down_since = None
        WORKER_DEPENDENCY_UP.labels(self.name).set(1)
        log.info("worker: %s is reachable again after %.1f s; resuming", self.name, lasted)


class OutageRetry(Retry):
    """Retries connection errors forever (jittered exponential back-off, capped) and reports
    them to a :class:`Reachability`; gives up once ``owner`` (the worker's main task) is done,
    so a worker stopped during an outage can still exit."""

    def __init__(
        self,
        reachability: Reachability,
        *,
        cap_s: float = 5.0,
        base_s: float = 0.1,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    ) -> None:
        super().__init__(EqualJitterBackoff(cap=cap_s, base=base_s), -1, RETRYABLE)  # type: ignore[arg-type]
        self.reachability = reachability
        self.owner: asyncio.Task[Any] | None = None
        self.sleep = sleep

    def __deepcopy__(self, memo: dict[int, Any]) -> OutageRetry:
        # redis-py deep-copies the retry of every connection: they must share one state.
        return self

    async def call_with_retry(
        self, do: Callable[[], Awaitable[T]], fail: Callable[[RedisError], Any]
    ) -> T:
        """Run ``do`` until it succeeds, backing off between failures."""
        failures = 0
        while True:
            try:
                result = await do()
            except RETRYABLE as error:
                failures += 1
                self.reachability.failed(error)
                await fail(error)  # type: ignore[arg-type]
                if self.owner is not None and self.owner.done():
                    raise
                await self.sleep(self._backoff.compute(failures))
            else:
                self.reachability.succeeded()
                return result


class WorkerHealth:
    """What a worker process knows about its own ability to work."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self.redis = Reachability("redis", clock)
        self.postgres = Reachability("postgres", clock)
        self.loops_running = False
        self.main_task: asyncio.Task[Any] | None = None
        """The worker's main task (arq's poll loop), once it started."""

    def ready(self) -> bool:
        """True while the worker polls, its loops run and both Redis and Postgres answer."""
        polling = self.main_task is not None and not self.main_task.done()
        return polling and self.loops_running and self.redis.is_up and self.postgres.is_up

    def describe(self) -> dict[str, str]:
        """``{"redis": "ok"|"down", "postgres": ..., "loops": "running"|"stopped"}``."""
        return {
            "redis": "ok" if self.redis.is_up else "down",
            "postgres": "ok" if self.postgres.is_up else "down",
            "loops": "running" if self.loops_running else "stopped",
        }
