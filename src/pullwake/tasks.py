"""The arq side (the only module importing arq): WorkerSettings, webhook jobs, and the list
of periodic jobs the worker runs next to arq (outside its job slots).

``arq pullwake.tasks.WorkerSettings`` works as well as ``pullwake worker``; both read
``PULLWAKE_*`` from the environment.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from typing import Any

import httpx
from arq import Retry, func
from arq.connections import ArqRedis
from arq.worker import Worker, get_kwargs
from redis.asyncio import ConnectionPool
from redis.exceptions import WatchError

from pullwake.config import Settings
from pullwake.core.recovery import RecoveryReport
from pullwake.core.retention import WORKER_BUDGET_S, prune_log
from pullwake.periodic import Periodic, PeriodicLoops
from pullwake.reachability import RETRYABLE, OutageRetry, WorkerHealth
from pullwake.services import Services, open_services
from pullwake.streams.client import arq_redis_url
from pullwake.webhooks import WebhookDelivery

__all__ = [  # noqa: F822
    "ArqEnqueuer",
    "PullwakeWorker",
    "WorkerSettings",
    "create_worker",
    "periodic_jobs",
    "queue_name",
    "worker_settings",
]

log = logging.getLogger(__name__)
ARQ_CONNECT_TIMEOUT_S = 2.0
ARQ_SOCKET_TIMEOUT_S = 10.0
POLL_ERROR_PAUSE_S = 1.0
CLOSE_TIMEOUT_S = 30.0
_POLL_ERRORS: tuple[type[Exception], ...] = (WatchError, *RETRYABLE)


def queue_name(settings: Settings) -> str:
    """The arq queue, namespaced by the Redis key prefix."""
    return f"{settings.redis_key_prefix}:arq:queue"


class ArqEnqueuer:
    """Enqueues one ``deliver_webhook`` job per webhook wake (job id = wake id)."""

    def __init__(self, pool: ArqRedis, settings: Settings) -> None:
        self.pool = pool
        self.settings = settings

    @classmethod
    @contextlib.asynccontextmanager
    async def open(cls, settings: Settings) -> AsyncIterator[ArqEnqueuer]:
        """An enqueuer with its own arq connection pool. It connects on first use, so the API
        starts (and keeps taking sends) while Redis is down; a failed enqueue leaves the wake
        ``queued`` for the worker's re-delivery. arq's Redis is ``PULLWAKE_ARQ_REDIS_URL``
        (a standalone server even when the wake streams live on a cluster)."""
        pool = ArqRedis(
            pool_or_conn=ConnectionPool.from_url(
                arq_redis_url(settings),
                socket_connect_timeout=ARQ_CONNECT_TIMEOUT_S,
                socket_timeout=ARQ_SOCKET_TIMEOUT_S,  # an unreachable Redis fails the enqueue
            )
        )
        try:
            yield cls(pool, settings)
        finally:
            await pool.aclose()

    async def enqueue_webhook(self, wake_id: str) -> None:
        await self.pool.enqueue_job(
            "deliver_webhook", wake_id, _job_id=wake_id, _queue_name=queue_name(self.settings)
        )


# The periodic jobs, each its own loop outside arq's job slots (see ``pullwake.periodic``).
# Adding one is one line: ``Periodic(name, coroutine(services), interval_ms)``.
def periodic_jobs(settings: Settings) -> list[Periodic]:
    """Every periodic job of the worker, with its interval."""
    every = settings.recovery_interval_ms
    return [
        Periodic("expire_claims", expire_claims, every, needs_redis=False),
        Periodic("repair_streams", repair_streams, every),
        Periodic("redeliver_wakes", redeliver_wakes, every),
        # A slice of the runners per pass: each is visited once per PULLWAKE_HYGIENE_INTERVAL_MS.
        Periodic("stream_hygiene", stream_hygiene, every),
        Periodic(
            "prune_retention", prune_retention, settings.retention_interval_ms, needs_redis=False
        ),
    ]


async def expire_claims(services: Services) -> RecoveryReport:
    """Expire claims past their lease and re-wake pending work."""
    return await services.recovery.expire_claims()


async def redeliver_wakes(services: Services) -> RecoveryReport:
    """Publish again wakes never published or not claimed within redeliver_after_ms."""
    return await services.recovery.redeliver()


async def repair_streams(services: Services) -> RecoveryReport:
    """Rebuild lost streams/groups from Postgres; XAUTOCLAIM stranded entries (the runners
    queued for a check, every runner after a Redis loss, else a slice of the fleet)."""
    return await services.recovery.repair_streams()


async def stream_hygiene(services: Services) -> RecoveryReport:
    """Delete idle consumers with empty pending lists; trim acked entries (a slice of the
    runners per pass)."""
    return await services.recovery.hygiene()


async def prune_retention(services: Services) -> dict[str, int]:
    """Delete finished history older than PULLWAKE_RETENTION_MS, in small batches."""
    return prune_log((await services.retention.prune(budget_s=WORKER_BUDGET_S)).rows)


def _ensure_logging() -> None:
    """Under plain ``arq`` (which configures only its own logger), pullwake's lines (an
    outage's start and end, recovery counts) would be lost: give them pullwake's handler, in
    ``PULLWAKE_LOG_FORMAT`` at ``PULLWAKE_LOG_LEVEL``."""
    ours = logging.getLogger("pullwake")
    if logging.getLogger().handlers or ours.handlers:
        return
    from pullwake import logs

    logs.configure(*logs.from_env())


async def startup(ctx: dict[str, Any]) -> None:
    """Open the service graph once per worker process and start the periodic loops."""
    _ensure_logging()
    settings: Settings = ctx["pullwake_settings"]
    health: WorkerHealth = ctx["pullwake_health"]
    # arq's own pool waits out Redis outages; from now on it gives up once the worker stops.
    ctx["pullwake_retry"].owner = health.main_task = asyncio.current_task()
    stack = contextlib.AsyncExitStack()
    # The enqueuer has a pool of its own that fails fast: a re-delivery pass during an outage
    # must not hang on arq's patient pool (the wake stays queued for the next pass).
    webhooks = await stack.enter_async_context(ArqEnqueuer.open(settings))
    services = await stack.enter_async_context(open_services(settings, webhooks=webhooks))
    http = await stack.enter_async_context(httpx.AsyncClient(headers={"user-agent": "pullwake"}))
    loops = PeriodicLoops(services, ctx["pullwake_jobs"], health)
    loops.start()
    stack.push_async_callback(loops.stop)
    ctx.update(
        stack=stack,
        services=services,
        webhooks=WebhookDelivery(services.webhook_claims, services.callbacks, settings, http),
    )
    log.info("pullwake worker ready (queue %s)", queue_name(settings))


async def shutdown(ctx: dict[str, Any]) -> None:
    """Stop the periodic loops and close the service graph."""
    stack: contextlib.AsyncExitStack | None = ctx.get("stack")
    if stack is not None:
        await stack.aclose()


async def deliver_webhook(ctx: dict[str, Any], wake_id: str) -> str:
    """Job: one delivery attempt of a webhook wake; failures are retried with back-off."""
    delivery: WebhookDelivery = ctx["webhooks"]
    outcome = await delivery.deliver(wake_id, attempt=int(ctx.get("job_try", 1)))
    if outcome.result == "retry":
        raise Retry(defer=outcome.retry_in_s)
    return f"{outcome.result} {outcome.detail}".strip()


def _arq_pool(settings: Settings, retry: OutageRetry) -> ArqRedis:
    """arq's connection: every call waits out an outage (back-off, one log line) instead of
    raising out of arq's poll loop, which ended the worker. It connects to
    ``PULLWAKE_ARQ_REDIS_URL`` (default ``PULLWAKE_REDIS_URL``): arq has no cluster support."""
    pool = ConnectionPool.from_url(
        arq_redis_url(settings),
        socket_connect_timeout=ARQ_CONNECT_TIMEOUT_S,
        socket_timeout=ARQ_SOCKET_TIMEOUT_S,  # arq issues no blocking commands
        retry=retry,
        retry_on_error=list(RETRYABLE),
    )
    return ArqRedis(pool_or_conn=pool, default_queue_name=queue_name(settings))


def worker_settings(settings: Settings) -> type:
    """An arq ``WorkerSettings`` class for ``settings``."""
    if not settings.redis_url:
        raise ValueError("PULLWAKE_REDIS_URL must be set for the worker")
    health = WorkerHealth()
    retry = OutageRetry(health.redis)
    namespace: dict[str, Any] = {
        "__doc__": "arq settings for the pullwake worker.",
        "functions": [
            func(deliver_webhook, max_tries=settings.webhook_max_attempts + 1, keep_result=0)
        ],
        "on_startup": startup,
        "on_shutdown": shutdown,
        "redis_pool": _arq_pool(settings, retry),
        "queue_name": queue_name(settings),
        "health_check_key": f"{settings.redis_key_prefix}:arq:health-check",
        "ctx": {
            "pullwake_settings": settings,
            "pullwake_health": health,
            "pullwake_retry": retry,
            "pullwake_jobs": periodic_jobs(settings),
        },
        "keep_result": 60,
        "max_jobs": settings.webhook_concurrency,
        # an attempt is bounded by PULLWAKE_WEBHOOK_TIMEOUT_MS; the rest is Postgres work
        "job_timeout": settings.webhook_timeout_ms / 1000 + 30,
        "poll_delay": 0.2,
    }
    return type("WorkerSettings", (), namespace)


class PullwakeWorker(Worker):
    """arq's worker, whose poll loop survives Redis errors the client retry cannot absorb
    (a WATCH broken by a lost connection, an error raised by a finished job task), and whose
    periodic loops start before arq first needs Redis."""

    async def main(self) -> None:
        """Start the periodic loops (lease expiry needs only Postgres) before arq's start-up,
        which waits for Redis: a worker started during an outage works from the first second."""
        if self.on_startup is not None:
            await self.on_startup(self.ctx)
            self.on_startup = None
        await super().main()

    async def start_jobs(self, job_ids: list[bytes]) -> None:
        """arq's job start, one id at a time, giving the job slot back when Redis fails between
        taking the slot and starting the job (arq keeps it: after one such failure per slot,
        no webhook would ever be delivered again)."""
        for job_id in job_ids:
            earlier = self.tasks.get(job_id.decode())
            try:
                await super().start_jobs([job_id])
            except _POLL_ERRORS:
                # Redis only fails arq's start after it took the slot; no new task: give it back.
                if self.tasks.get(job_id.decode()) is earlier:
                    self.job_counter -= 1
                    self.sem.release()
                raise

    async def _poll_iteration(self) -> None:
        try:
            await super()._poll_iteration()
        except _POLL_ERRORS as exc:
            health: WorkerHealth = self.ctx["pullwake_health"]
            health.redis.failed(exc)
            await asyncio.sleep(POLL_ERROR_PAUSE_S)

    async def close(self) -> None:
        """arq's close, bounded in time: a shutdown never hangs, whatever a job or a
        connection does."""
        try:
            await asyncio.wait_for(self._close(), CLOSE_TIMEOUT_S)
        except TimeoutError:
            log.warning("worker did not shut down within %.0f s; exiting anyway", CLOSE_TIMEOUT_S)
            self._pool = None

    async def _close(self) -> None:
        """arq's close, which cannot delete its health-check key while Redis is away: the
        pullwake side still shuts down cleanly (stopped during an outage).

        arq cancels the running jobs and then gathers them: one cancelled job re-raised its
        CancelledError out of that gather, and the rest of the shutdown (``on_shutdown``, which
        closes the services, and the pool) never ran. The jobs are awaited here first, their
        outcomes swallowed, so arq's gather finds nothing left to raise."""
        if not self._handle_signals:  # what arq's close does first (a signal did it otherwise)
            for task in self.tasks.values():
                task.cancel()
        jobs = list(self.tasks.values())
        await asyncio.gather(*jobs, return_exceptions=True)
        for job_id in [job_id for job_id, task in self.tasks.items() if task.done()]:
            del self.tasks[job_id]
        try:
            await super().close()
        except _POLL_ERRORS as exc:
            log.warning("worker stopped while Redis is unreachable (%s)", type(exc).__name__)
            if self.on_shutdown:
                await self.on_shutdown(self.ctx)
            self._pool = None


def create_worker(settings: Settings, **options: Any) -> PullwakeWorker:
    """The pullwake arq worker for ``settings`` (``pullwake worker`` and ``pullwake dev``)."""
    return PullwakeWorker(**{**get_kwargs(worker_settings(settings)), **options})


def __getattr__(name: str) -> Any:
    # ``WorkerSettings`` is built on first access so importing this module needs no env vars.
    if name == "WorkerSettings":
        return worker_settings(Settings.from_env())
    raise AttributeError(name)
