"""Time as the runner sees it, injectable so timing rules can be tested exactly."""

from __future__ import annotations

import asyncio
import heapq
import itertools
import time
from collections.abc import Iterable
from datetime import UTC, datetime
from typing import Protocol

__all__ = ["Clock", "FakeClock", "SystemClock", "iso", "wait_tasks"]


class Clock(Protocol):
    """Monotonic milliseconds, wall-clock seconds and an async sleep."""

    def now_ms(self) -> float:
        """Monotonic time in milliseconds."""
        ...

    def wall(self) -> float:
        """Wall-clock time (Unix seconds), for timestamps in health reports."""
        ...

    async def sleep_ms(self, delay_ms: float) -> None:
        """Sleep for ``delay_ms`` milliseconds."""
        ...


class SystemClock:
    """The real clock."""

    def now_ms(self) -> float:
        """Monotonic time in milliseconds."""
        return time.monotonic() * 1000

    def wall(self) -> float:
        """Wall-clock time (Unix seconds)."""
        return time.time()

    async def sleep_ms(self, delay_ms: float) -> None:
        """Sleep for ``delay_ms`` milliseconds."""
        await asyncio.sleep(max(delay_ms, 0) / 1000)


class FakeClock:
    """A clock that only moves when told to; sleepers wake in deadline order."""

    def __init__(self, start_ms: float = 0, wall_start: float = 1_767_225_600.0) -> None:
        self._now_ms: float = start_ms
        self._wall_start = wall_start
        self._sleepers: list[tuple[float, int, asyncio.Future[None]]] = []
        self._seq = itertools.count()

    def now_ms(self) -> float:
        """Fake monotonic milliseconds."""
        return self._now_ms

    def wall(self) -> float:
        """Fake wall-clock seconds, moving with the monotonic time."""
        return self._wall_start + self._now_ms / 1000

    async def sleep_ms(self, delay_ms: float) -> None:
        """Sleep until :meth:`advance` reaches ``now + delay_ms``."""
        if delay_ms <= 0:
            await asyncio.sleep(0)
            return
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        heapq.heappush(self._sleepers, (self._now_ms + delay_ms, next(self._seq), future))
        await future

    async def advance(self, delta_ms: float) -> None:
        """Move time forward, waking each sleeper at its deadline and letting tasks run."""
        target = self._now_ms + delta_ms
        await settle()
        while self._sleepers and self._sleepers[0][0] <= target:
            deadline, _, future = heapq.heappop(self._sleepers)
            if future.done():
                continue
            self._now_ms = max(self._now_ms, deadline)
            future.set_result(None)
            await settle()
        self._now_ms = target
        await settle()

    @property
    def sleepers(self) -> int:
        """How many sleeps are pending."""
        return sum(1 for _, _, future in self._sleepers if not future.done())


async def settle(rounds: int = 30) -> None:
    """Let ready tasks run for a few event-loop turns."""
    for _ in range(rounds):
        await asyncio.sleep(0)


async def wait_tasks(
    tasks: Iterable[asyncio.Task[object]], clock: Clock, timeout_ms: float
) -> set[asyncio.Task[object]]:
    """Wait until every task is done or ``timeout_ms`` passed on ``clock``; return the rest."""
    pending = {task for task in tasks if not task.done()}
    if not pending or timeout_ms <= 0:
        return pending
    timer: asyncio.Task[None] = asyncio.create_task(clock.sleep_ms(timeout_ms))
    try:
        while pending and not timer.done():
            await asyncio.wait({*pending, timer}, return_when=asyncio.FIRST_COMPLETED)
            pending = {task for task in pending if not task.done()}
    finally:
        timer.cancel()
    return pending


def iso(wall: float | None) -> str | None:
    """A Unix timestamp as ISO 8601 UTC (``None`` stays ``None``)."""
    if wall is None:
        return None
    return (
        datetime.fromtimestamp(wall, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")
    )
