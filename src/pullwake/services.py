"""The service graph (store, Redis, dispatch, claims, tokens, runners, entity types, recovery),
built in one place."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from functools import partial
from typing import TYPE_CHECKING, Any

from redis.asyncio import Redis

from pullwake.authcache import AuthCache
from pullwake.config import Settings
from pullwake.core.batch import BatchSender
from pullwake.core.callbacks import ClaimCallbacks
from pullwake.core.claims import Claims
from pullwake.core.entities import Dispatcher
from pullwake.core.entity_types import EntityTypes
from pullwake.core.recovery import Recovery
from pullwake.core.retention import Retention
from pullwake.core.runners import Runners
from pullwake.core.tokens import Tokens
from pullwake.core.webhook_claims import WebhookClaims
from pullwake.errors import ConfigError
from pullwake.limits import Limits
from pullwake.publish import Publisher, WebhookEnqueuer
from pullwake.store import Store
from pullwake.streams import Keys, WakeStreams
from pullwake.streams.audit import check_sessions
from pullwake.streams.client import check_redis_mode, pubsub_client, redis_client
from pullwake.streams.reader import WakeReader, WakeSession

if TYPE_CHECKING:
    from pullwake.streams.client import RedisClient
else:
    # Litestar hands Services to msgspec (a dependency), which types no union of two classes.
    RedisClient = Any

__all__ = ["Services", "build_services", "open_services"]


@dataclass(slots=True)
class Services:
    """Everything the API, the worker and the CLI need, sharing one pool and one Redis client."""

    settings: Settings
    store: Store
    redis: RedisClient
    """``Redis``, or ``RedisCluster`` with ``PULLWAKE_REDIS_CLUSTER`` (see
    :mod:`pullwake.streams.client`, which also has the pub/sub client)."""
    streams: WakeStreams
    publisher: Publisher
    dispatcher: Dispatcher
    batch: BatchSender
    claims: Claims
    callbacks: ClaimCallbacks
    webhook_claims: WebhookClaims
    auth_cache: AuthCache
    """API tokens and runner access; in use only while a listener runs (the API's lifespan)."""
    tokens: Tokens
    runners: Runners
    entity_types: EntityTypes
    recovery: Recovery
    limits: Limits
    retention: Retention
    wake_reader: WakeReader
    """Reads every wake stream (SSE session) of this process (starts with the first one)."""
    authenticate: Any = None
    draining: asyncio.Event = field(default_factory=asyncio.Event)
    """Set when the process begins shutting down: open wake streams end at once."""
    worker_health: Any = None
    """The in-process worker's :class:`~pullwake.reachability.WorkerHealth` (``pullwake dev``),
    reported by ``/readyz``; None when workers run as processes of their own."""


def build_services(
    settings: Settings,
    store: Store,
    redis: RedisClient,
    *,
    webhooks: WebhookEnqueuer | None = None,
    authenticate: Any = None,
) -> Services:
    """Wire the graph around an open store and Redis client."""
    keys = Keys(settings.redis_key_prefix)
    streams = WakeStreams(redis, keys, maxlen=settings.stream_maxlen)
    publisher = Publisher(store, streams, webhooks)
    auth_cache = AuthCache.from_settings(settings)
    limits = Limits(redis, keys, settings)
    draining = asyncio.Event()
    return Services(
        settings=settings,
        store=store,
        redis=redis,
        streams=streams,
        publisher=publisher,
        dispatcher=Dispatcher(store, streams, publisher, settings),
        batch=BatchSender(store, publisher, settings),
        claims=Claims(store, streams, publisher, settings),
        callbacks=ClaimCallbacks(store, publisher, settings),
        webhook_claims=WebhookClaims(store, publisher, settings),
        auth_cache=auth_cache,
        tokens=Tokens(store, auth_cache),
        runners=Runners(store, streams, publisher, settings, auth_cache),
        entity_types=EntityTypes(store, allow_private_webhooks=settings.webhook_allow_private),
        recovery=Recovery(store, streams, publisher, settings),
        limits=limits,
        retention=Retention(store, settings),
        wake_reader=_wake_reader(settings, streams, store, limits, auth_cache, draining, redis),
        authenticate=authenticate,
        draining=draining,
    )


def _wake_reader(
    settings: Settings,
    streams: WakeStreams,
    store: Store,
    limits: Limits,
    auth_cache: AuthCache,
    draining: asyncio.Event,
    redis: RedisClient,
) -> WakeReader:
    url = settings.redis_url

    def subscriber() -> Redis:
        # A plain client of its own, whatever the command pool is: it holds one connection (on
        # a cluster, to one node: a PUBLISH reaches the subscribers of every node).
        return pubsub_client(settings, redis)

    async def refresh(sessions: Sequence[WakeSession]) -> None:
        await limits.refresh_slots([s.slot for s in sessions if s.slot is not None])

    return WakeReader(
        streams,
        subscriber if url else None,
        poll_interval_s=settings.sse_block_ms / 1000,
        keepalive_s=settings.sse_keepalive_ms / 1000,
        check=partial(check_sessions, store),
        refresh=refresh,
        draining=draining,
        invalidations=lambda: auth_cache.generation,
    )


@asynccontextmanager
async def open_services(
    settings: Settings,
    *,
    webhooks: WebhookEnqueuer | None = None,
    authenticate: Any = None,
    pool_max: int | None = None,
) -> AsyncIterator[Services]:
    """Connect to Postgres and Redis, yield the services, close both on exit."""
    if not settings.database_url or not settings.redis_url:
        raise ConfigError("PULLWAKE_DATABASE_URL and PULLWAKE_REDIS_URL must be set")
    await check_redis_mode(settings)  # cluster mode vs the server: one clear line, not MOVED
    # Bounded, whatever the number of wake streams: PULLWAKE_REDIS_MAX_CONNECTIONS counts the
    # wake reader's pub/sub connection too; past it, callers wait for a pooled connection.
    redis = redis_client(settings, max_connections=settings.redis_max_connections - 1)
    store = await Store.connect(
        settings.database_url,
        min_size=min(settings.pg_pool_min, pool_max or settings.pg_pool_max),
        max_size=pool_max or settings.pg_pool_max,
        transaction_pooling=settings.pg_transaction_pooling,
    )
    store.combine_sends = settings.combine_sends
    try:
        services = build_services(
            settings, store, redis, webhooks=webhooks, authenticate=authenticate
        )
        try:
            yield services
        finally:
            await services.wake_reader.close()
            await services.publisher.close()
    finally:
        await redis.aclose()
        await store.close()
