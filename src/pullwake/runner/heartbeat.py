"""Runner liveness heartbeats: periodic, event-driven (throttled), single-flight, coalesced."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable

from pullwake.runner.clock import Clock

__all__ = ["HeartbeatScheduler"]

log = logging.getLogger(__name__)


class HeartbeatScheduler:
    """Sends heartbeats through ``send`` and counts consecutive failures.

    - At most one request is in flight; requests made meanwhile coalesce into exactly one
      follow-up sent after it.
    - Periodic: at :meth:`start` and every ``interval_ms`` (``<= 0`` disables both).
    - Event-driven: :meth:`changed` schedules one heartbeat ``throttle_ms`` later; further changes
      inside that window ride along (``<= 0`` disables).
    - ``failures_before_reset`` consecutive failures call ``on_reset`` (and so does every further
      failure) so the runner drops its wake stream, even when stuck connecting.
    """

    def __init__(
        self,
        send: Callable[[], Awaitable[None]],
        clock: Clock,
        *,
        interval_ms: int,
        throttle_ms: int,
        on_result: Callable[[BaseException | None], None],
        on_reset: Callable[[BaseException], None],
        failures_before_reset: int = 2,
    ) -> None:
        self._send = send
        self._clock = clock
        self.interval_ms = interval_ms
        self.throttle_ms = throttle_ms
        self._on_result = on_result
        self._on_reset = on_reset
        self.failures_before_reset = failures_before_reset
        self.consecutive_failures = 0
        self.sent = 0
        self._running = False
        self._pending = False
        self._flight: asyncio.Task[None] | None = None
        self._periodic: asyncio.Task[None] | None = None
        self._throttle: asyncio.Task[None] | None = None

    @property
    def in_flight(self) -> bool:
        """True while a heartbeat request is outstanding."""
        return self._flight is not None and not self._flight.done()

    def start(self) -> None:
        """Reset the failure count and begin periodic heartbeats (the first one now)."""
        self.stop()
        self._running = True
        self.consecutive_failures = 0
        if self.interval_ms > 0:
            self._periodic = asyncio.create_task(self._every_interval(), name="pullwake-hb")

    def stop(self) -> None:
        """Stop every timer and abandon the in-flight request; late results are ignored."""
        self._running = False
        self._pending = False
        for task in (self._periodic, self._throttle, self._flight):
            if task is not None and task is not asyncio.current_task():
                task.cancel()
        self._periodic = self._throttle = self._flight = None

    def request(self) -> None:
        """Send a heartbeat now, or once more after the one in flight."""
        if not self._running:
            return
        if self.in_flight:
            self._pending = True
            return
        self._flight = asyncio.create_task(self._fly(), name="pullwake-hb-send")

    def changed(self) -> None:
        """Diagnostics changed: heartbeat within ``throttle_ms`` (one per window)."""
        if not self._running or self.throttle_ms <= 0:
            return
        if self._throttle is not None and not self._throttle.done():
            return
        self._throttle = asyncio.create_task(self._after_throttle(), name="pullwake-hb-throttle")

    async def _after_throttle(self) -> None:
        await self._clock.sleep_ms(self.throttle_ms)
        self._throttle = None
        self.request()

    async def _every_interval(self) -> None:
        while self._running:
            self.request()
            await self._clock.sleep_ms(self.interval_ms)

    async def _fly(self) -> None:
        while True:
            self._pending = False
            error: BaseException | None = None
            try:
                await self._send()
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                error = exc
            if not self._running:
                return  # stopped meanwhile: this result no longer means anything
            self.sent += 1
            self._record(error)
            if not self._pending:
                return

    def _record(self, error: BaseException | None) -> None:
        if error is None:
            self.consecutive_failures = 0
            self._on_result(None)
            return
        self.consecutive_failures += 1
        self._on_result(error)
        if self.consecutive_failures >= self.failures_before_reset:
            self._on_reset(error)
