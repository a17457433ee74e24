"""The arq side (the only module importing arq): WorkerSettings, recovery crons, webhook jobs.

``arq pullwake.tasks.WorkerSettings`` works as well as ``pullwake worker``; both read
``PULLWAKE_*`` from the environment.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import AsyncIterator
from typing import Any

import httpx
from arq import Retry, cron, func
from arq.connections import ArqRedis, RedisSettings
from arq.cron import CronJob
from redis.asyncio import ConnectionPool

from pullwake.config import Settings
from pullwake.recovery import RecoveryReport, summary
from pullwake.retention import WORKER_BUDGET_S, prune_log
from pullwake.services import Services, open_services
from pullwake.webhooks import WebhookDelivery

__all__ = ["ArqEnqueuer", "WorkerSettings", "queue_name", "worker_settings"]  # noqa: F822

log = logging.getLogger(__name__)


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
        ``queued`` for the worker's re-delivery."""
        assert settings.redis_url is not None
        pool = ArqRedis(pool_or_conn=ConnectionPool.from_url(settings.redis_url))
        try:
            yield cls(pool, settings)
        finally:
            await pool.aclose()

    async def enqueue_webhook(self, wake_id: str) -> None:
        await self.pool.enqueue_job(
            "deliver_webhook", wake_id, _job_id=wake_id, _queue_name=queue_name(self.settings)
        )


async def startup(ctx: dict[str, Any]) -> None:
    """Open the service graph once per worker process."""
    settings: Settings = ctx["pullwake_settings"]
    stack = contextlib.AsyncExitStack()
    webhooks = ArqEnqueuer(ctx["redis"], settings)
    services = await stack.enter_async_context(open_services(settings, webhooks=webhooks))
    http = await stack.enter_async_context(httpx.AsyncClient(headers={"user-agent": "pullwake"}))
    ctx.update(
        stack=stack, services=services, webhooks=WebhookDelivery(services.claims, settings, http)
    )
    log.info("pullwake worker ready (queue %s)", queue_name(settings))


async def shutdown(ctx: dict[str, Any]) -> None:
    stack: contextlib.AsyncExitStack | None = ctx.get("stack")
    if stack is not None:
        await stack.aclose()


def _log(name: str, report: RecoveryReport) -> dict[str, Any]:
    counts = summary(report)
    if counts:
        log.info("%s: %s", name, counts)
    return counts


async def expire_claims(ctx: dict[str, Any]) -> dict[str, Any]:
    """Cron: expire claims past their lease and re-wake pending work."""
    services: Services = ctx["services"]
    return _log("expire_claims", await services.recovery.expire_claims())


async def redeliver_wakes(ctx: dict[str, Any]) -> dict[str, Any]:
    """Cron: publish again wakes never published or not claimed within redeliver_after_ms."""
    services: Services = ctx["services"]
    return _log("redeliver_wakes", await services.recovery.redeliver())


async def repair_streams(ctx: dict[str, Any]) -> dict[str, Any]:
    """Cron: rebuild lost streams/groups from Postgres; XAUTOCLAIM stranded entries."""
    services: Services = ctx["services"]
    return _log("repair_streams", await services.recovery.repair_streams())


async def stream_hygiene(ctx: dict[str, Any]) -> dict[str, Any]:
    """Cron: delete idle consumers with empty pending lists; trim acked entries."""
    services: Services = ctx["services"]
    return _log("stream_hygiene", await services.recovery.hygiene())


async def prune_retention(ctx: dict[str, Any]) -> dict[str, int]:
    """Cron: delete finished history older than PULLWAKE_RETENTION_MS, in small batches."""
    services: Services = ctx["services"]
    return prune_log((await services.retention.prune(budget_s=WORKER_BUDGET_S)).rows)


async def deliver_webhook(ctx: dict[str, Any], wake_id: str) -> str:
    """Job: one delivery attempt of a webhook wake; failures are retried with back-off."""
    delivery: WebhookDelivery = ctx["webhooks"]
    outcome = await delivery.deliver(wake_id, attempt=int(ctx.get("job_try", 1)))
    if outcome.result == "retry":
        raise Retry(defer=outcome.retry_in_s)
    return f"{outcome.result} {outcome.detail}".strip()


def _every(interval_ms: int) -> dict[str, Any]:
    """arq cron fields for "every interval" (arq's resolution is one second)."""
    seconds = max(1, round(interval_ms / 1000))
    if seconds < 60:
        return {"second": set(range(0, 60, seconds))}
    minutes = max(1, seconds // 60)
    return {"minute": set(range(0, 60, minutes)), "second": 0}


def worker_settings(settings: Settings) -> type:
    """An arq ``WorkerSettings`` class for ``settings``."""
    if not settings.redis_url:
        raise ValueError("PULLWAKE_REDIS_URL must be set for the worker")
    every = _every(settings.recovery_interval_ms)

    def _cron(job: Any, schedule: dict[str, Any], **options: Any) -> CronJob:
        # arq's unique cron job id is "<name>:<ms>" under the global "arq:job:" keys, whatever
        # the queue: with the default name, two deployments (key prefixes) sharing a Redis
        # database would swallow each other's ticks. The name carries the prefix.
        name = f"cron:{settings.redis_key_prefix}:{job.__name__}"
        return cron(job, name=name, **schedule, unique=True, **options)

    crons: list[CronJob] = [
        _cron(expire_claims, every, run_at_startup=True),
        _cron(redeliver_wakes, every),
        _cron(repair_streams, every, run_at_startup=True),
        _cron(stream_hygiene, _every(settings.hygiene_interval_ms)),
        _cron(prune_retention, _every(settings.retention_interval_ms)),
    ]
    namespace: dict[str, Any] = {
        "__doc__": "arq settings for the pullwake worker.",
        "functions": [
            func(deliver_webhook, max_tries=settings.webhook_max_attempts + 1, keep_result=0)
        ],
        "cron_jobs": crons,
        "on_startup": startup,
        "on_shutdown": shutdown,
        "redis_settings": RedisSettings.from_dsn(settings.redis_url),
        "queue_name": queue_name(settings),
        "health_check_key": f"{settings.redis_key_prefix}:arq:health-check",
        "ctx": {"pullwake_settings": settings},
        "keep_result": 60,
        "max_jobs": 50,
        "job_timeout": max(60, settings.webhook_timeout_ms // 1000 * 2),
        "poll_delay": 0.2,
    }
    return type("WorkerSettings", (), namespace)


def __getattr__(name: str) -> Any:
    # ``WorkerSettings`` is built on first access so importing this module needs no env vars.
    if name == "WorkerSettings":
        return worker_settings(Settings.from_env())
    raise AttributeError(name)
