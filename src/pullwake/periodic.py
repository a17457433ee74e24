"""The worker's periodic jobs (lease expiry, re-delivery, repair, hygiene, ...): each runs in
its own asyncio loop, outside arq's job slots, so recovery never waits behind webhook deliveries
and a failing pass (Redis or Postgres away) is reported and retried instead of ending the worker.

Several workers may run the same loops at once: recovery batches use ``SKIP LOCKED``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import secrets
import socket
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from pullwake.core.recovery import RecoveryReport, summary
from pullwake.metrics import WORKER_LAST_PASS, WORKER_PASS_ERRORS
from pullwake.reachability import WorkerHealth
from pullwake.services import Services

__all__ = ["Periodic", "PeriodicLoops"]

log = logging.getLogger(__name__)
MAX_BACKOFF_MS = 30_000
PROBE_TIMEOUT_S = 2.0
STATUS_FORGET_AFTER = timedelta(hours=1)
"""Status rows of workers silent for this long are deleted (a crashed worker leaves one)."""


@dataclass(frozen=True, slots=True)
class Periodic:
    """One periodic job: its name, the coroutine it runs, and how often (milliseconds).

    ``needs_redis=False`` keeps the job running while Redis is down (lease expiry only needs
    Postgres: the re-wakes it publishes stay ``queued`` for re-delivery)."""

    name: str
    run: Callable[[Services], Awaitable[Any]]
    interval_ms: int
    needs_redis: bool = True


class PeriodicLoops:
    """Runs each :class:`Periodic` job, and a Redis/Postgres probe, in tasks of their own."""

    def __init__(self, services: Services, jobs: list[Periodic], health: WorkerHealth) -> None:
        self.services = services
        self.jobs = jobs
        self.health = health
        self.probe_interval_s = services.settings.recovery_interval_ms / 1000
        self._tasks: list[asyncio.Task[None]] = []
        self._failing: set[str] = set()
        self.worker_id = f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(3)}"
        self.last_pass_at: datetime | None = None

    def start(self) -> None:
        """Start every loop in the running event loop."""
        self._tasks = [asyncio.create_task(self._probe_loop(), name="pullwake:probe")]
        for job in self.jobs:
            self._tasks.append(asyncio.create_task(self._loop(job), name=f"pullwake:{job.name}"))
        self.health.loops_running = True

    async def stop(self) -> None:
        """Cancel every loop and wait for them."""
        self.health.loops_running = False
        for task in self._tasks:
            task.cancel()
        if self._tasks:  # bounded: a loop stuck past its cancellation must not hang shutdown
            _done, stuck = await asyncio.wait(self._tasks, timeout=2 * PROBE_TIMEOUT_S)
            for task in stuck:
                log.warning("periodic loop %s did not stop within the shutdown grace", task)
        with contextlib.suppress(Exception):  # best effort: a silent row is pruned later
            async with asyncio.timeout(PROBE_TIMEOUT_S):
                await self.services.store.remove_worker_status(self.worker_id)

    async def probe(self) -> None:
        """Ping Redis and Postgres once (bounded in time) and record what answered."""
        for reach, ping in (
            (self.health.redis, self.services.streams.ping),
            (self.health.postgres, self.services.store.ping),
        ):
            try:
                async with asyncio.timeout(PROBE_TIMEOUT_S):
                    ok = await ping()
            except TimeoutError:
                ok = False
            if ok:
                reach.succeeded()
            else:
                reach.failed(ConnectionError(f"{reach.name} did not answer a ping"))

    async def record_status(self) -> None:
        """Upsert this worker's status row (what ``/readyz`` and ``/metrics`` report)."""
        if not self.health.postgres.is_up:
            return  # the row goes stale: the API reports this worker as silent
        store, settings = self.services.store, self.services.settings
        try:
            async with asyncio.timeout(PROBE_TIMEOUT_S):
                await store.record_worker_status(
                    self.worker_id,
                    host=socket.gethostname(),
                    pid=os.getpid(),
                    interval_ms=settings.recovery_interval_ms,
                    redis_ok=self.health.redis.is_up,
                    failing_jobs=sorted(self._failing),
                    last_recovery_at=self.last_pass_at,
                )
                await store.forget_workers(STATUS_FORGET_AFTER)
        except Exception as exc:  # the probe reports a Postgres outage; this is bookkeeping
            log.debug("worker status not recorded: %s", exc)

    async def _probe_loop(self) -> None:
        while True:
            await self.probe()
            await self.record_status()
            await asyncio.sleep(self.probe_interval_s)

    async def _loop(self, job: Periodic) -> None:
        failures = 0
        while True:
            ok = await self.run_once(job)
            failures = failures + 1 if ok is False else 0
            await asyncio.sleep(_delay_ms(job.interval_ms, failures) / 1000)

    async def run_once(self, job: Periodic) -> bool | None:
        """One pass of ``job``: True done, False failed (reported), None skipped because a
        dependency it needs is down."""
        if not self.health.postgres.is_up or (job.needs_redis and not self.health.redis.is_up):
            return None
        try:
            async with asyncio.timeout(_pass_timeout_s(job.interval_ms)):
                result = await job.run(self.services)
        except Exception as exc:  # every failure is reported; the loop goes on
            WORKER_PASS_ERRORS.labels(job.name).inc()
            self._report_failure(job, exc)
            await self.probe()  # an outage is then logged once, by the reachability state
            return False
        WORKER_LAST_PASS.labels(job.name).set(time.time())
        self.last_pass_at = datetime.now(UTC)
        self._report_success(job, result)
        return True

    def _report_failure(self, job: Periodic, exc: Exception) -> None:
        if job.name in self._failing:
            return
        self._failing.add(job.name)
        log.warning(
            "%s: pass failed (%s: %s); retrying with back-off", job.name, type(exc).__name__, exc
        )

    def _report_success(self, job: Periodic, result: Any) -> None:
        if job.name in self._failing:
            self._failing.discard(job.name)
            log.info("%s: passes succeed again", job.name)
        counts = summary(result) if isinstance(result, RecoveryReport) else {}
        if counts:
            log.info("%s: %s", job.name, counts)


def _delay_ms(interval_ms: int, failures: int) -> float:
    """The interval, doubled for each failure in a row, capped at 30 s (never below it)."""
    if failures == 0:
        return interval_ms
    backoff_ms: int = min(interval_ms * 2**failures, MAX_BACKOFF_MS)
    return max(interval_ms, backoff_ms)


def _pass_timeout_s(interval_ms: int) -> float:
    """A pass stuck on a dead connection is abandoned (its transaction rolls back)."""
    return max(60.0, interval_ms * 10 / 1000)
