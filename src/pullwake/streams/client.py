"""Redis clients, built in one place: a single server or a Redis Cluster, per settings.

``PULLWAKE_REDIS_CLUSTER=1`` makes :func:`redis_client` a :class:`redis.asyncio.cluster.
RedisCluster` that discovers the cluster from the node in ``PULLWAKE_REDIS_URL`` (any node
will do) and routes each command to the primary of its key's slot. Every pullwake key of one
command, script or pipeline shares a hash tag (see :mod:`pullwake.streams.keys`), so nothing
here routes by hand.

What stays on one node:

* **pub/sub**: redis-py 5's asyncio ``RedisCluster`` has none. A classic ``PUBLISH`` reaches
  the subscribers on every node of a cluster, so :func:`pubsub_client` hands out a plain
  ``Redis`` to one node for ``SUBSCRIBE``, and :func:`publish` sends on either client.
* **arq**, which has no cluster support: its queue lives on the standalone Redis of
  ``PULLWAKE_ARQ_REDIS_URL`` (:func:`arq_redis_url`).
"""

from __future__ import annotations

import random
from typing import Any, TypeAlias, cast

from redis import Redis as SyncRedis
from redis.asyncio import BlockingConnectionPool, ConnectionPool, Redis
from redis.asyncio.cluster import ClusterNode, RedisCluster
from redis.cluster import get_node_name
from redis.commands.core import AsyncScript
from redis.connection import parse_url
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisClusterException, RedisError

from pullwake.config import Settings, redact_url
from pullwake.errors import ConfigError

__all__ = [
    "ClusterUnavailable",
    "RedisClient",
    "arq_redis_url",
    "check_redis_mode",
    "check_redis_mode_sync",
    "is_cluster",
    "publish",
    "pubsub_client",
    "redis_client",
    "register_script",
]

RedisClient: TypeAlias = Redis | RedisCluster
"""What :func:`redis_client` returns; both speak every command pullwake sends."""

PROBE_TIMEOUT_S = 1.0


class ClusterUnavailable(RedisConnectionError):
    """The cluster's layout could not be read from any known node (all unreachable, or a node
    that is not in cluster mode): a connection error like any other Redis outage."""


class _Cluster(RedisCluster):
    """``RedisCluster`` that survives what redis-py 5 does when nodes fail.

    * "Cannot reach the cluster" is a ``ConnectionError``: redis-py raises
      ``RedisClusterException`` (not a ``RedisError``) when no node answers ``CLUSTER SLOTS``,
      and pullwake treats every Redis outage alike (``503 UNAVAILABLE``, a wake left
      ``queued`` for recovery, a worker riding the outage out).
    * The client forgets no node for good: redis-py drops a node from its start-up nodes on
      each connection error and then disconnects every node, so the commands in flight on the
      healthy nodes fail too and drop theirs; with none left it can never rediscover the
      cluster, even once it is back (redis-py issues 3284 and 3693, fixed only in redis-py 7.2,
      which arq's ``redis<6`` rules out). Before each rediscovery the start-up nodes are
      topped up with the URL's node and every node last seen.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._seeds = [(n.host, n.port) for n in self.nodes_manager.startup_nodes.values()]

    async def initialize(self) -> RedisCluster:
        if self._initialize:
            self._reseed()
        try:
            return await super().initialize()
        except RedisClusterException as exc:
            raise ClusterUnavailable(str(exc)) from exc

    def _reseed(self) -> None:
        manager = self.nodes_manager
        startup = manager.startup_nodes
        for name, node in manager.nodes_cache.items():
            startup.setdefault(name, node)
        for host, port in self._seeds:
            name = get_node_name(host, port)
            if name not in startup:
                startup[name] = ClusterNode(host, port, **manager.connection_kwargs)


def _url(settings: Settings) -> str:
    if not settings.redis_url:
        raise ConfigError("PULLWAKE_REDIS_URL must be set")
    return settings.redis_url


def redis_client(
    settings: Settings, *, max_connections: int | None = None, **options: Any
) -> RedisClient:
    """The API's, worker's and CLI's Redis client: ``Redis`` or ``RedisCluster`` (per
    ``PULLWAKE_REDIS_CLUSTER``), decoding replies to ``str``. Connects on first use, so a
    process starts while Redis is down.

    ``max_connections`` bounds a single server's connections: its pool makes a caller wait
    for a free connection instead of opening one more (``BlockingConnectionPool``). A cluster
    client is not bounded: redis-py 5's cluster nodes have no waiting pool, only one that
    raises once full, which would fail requests under a burst instead of queueing them (the
    wake reader keeps stream reads themselves to a few pipelines either way)."""
    url = _url(settings)
    if settings.redis_cluster:
        try:
            cluster: RedisCluster = _Cluster.from_url(url, decode_responses=True, **options)
        except (RedisClusterException, ValueError) as exc:  # a database number, a unix socket
            raise ConfigError(f"PULLWAKE_REDIS_URL {redact_url(url)}: {exc}") from None
        return cluster
    if max_connections is not None:
        pool = BlockingConnectionPool.from_url(
            url, max_connections=max_connections, decode_responses=True, **options
        )
        bounded: Redis = Redis.from_pool(pool)  # the pool is closed with the client
        return bounded
    single: Redis = Redis.from_url(url, decode_responses=True, **options)
    return single


def register_script(redis: RedisClient, script: str) -> AsyncScript:
    """A Lua script callable on either client. On a cluster, ``EVALSHA`` goes to the primary
    of the script's keys (pullwake's scripts name one key each) and a ``NOSCRIPT`` (a node
    restarted empty) loads it on every primary; redis-py types ``register_script`` for
    ``Redis`` only."""
    return AsyncScript(cast(Redis, redis), script)


def is_cluster(redis: RedisClient) -> bool:
    """True for a Redis Cluster client."""
    return isinstance(redis, RedisCluster)


def pubsub_client(settings: Settings, redis: RedisClient | None = None) -> Redis:
    """A plain ``Redis`` for pub/sub (``SUBSCRIBE``), to be closed by the caller.

    Single server: a client of its own for ``PULLWAKE_REDIS_URL``. Cluster: a client of one
    node, any primary the cluster client ``redis`` knows (spreading subscribers, and letting a
    re-subscribe after a node failure pick a live one), else the URL's node. A ``PUBLISH`` on
    any node reaches subscribers on all of them.
    """
    url = _url(settings)
    if not settings.redis_cluster:
        own: Redis = Redis.from_url(url, decode_responses=True)
        return own
    options: dict[str, Any] = {**parse_url(url), "decode_responses": True}  # type: ignore[no-untyped-call]
    if isinstance(redis, RedisCluster):
        primaries = redis.get_primaries()  # empty before the client first connected
        if primaries:
            node = random.choice(primaries)
            options.update(host=node.host, port=node.port)
    client: Redis = Redis.from_pool(ConnectionPool(**options))
    return client


async def publish(redis: RedisClient, channel: str, message: str) -> int:
    """``PUBLISH`` on either client (redis-py 5's ``RedisCluster`` has no ``publish``
    method); returns the number of subscribers reached on the node it went to."""
    reached: int = await redis.execute_command("PUBLISH", channel, message)
    return reached


def arq_redis_url(settings: Settings) -> str:
    """Where arq's queue lives: ``PULLWAKE_ARQ_REDIS_URL``, else ``PULLWAKE_REDIS_URL``. arq has
    no cluster support, so cluster mode needs a standalone Redis named explicitly."""
    if settings.arq_redis_url:
        return settings.arq_redis_url
    if settings.redis_cluster:
        raise ConfigError(
            "PULLWAKE_REDIS_CLUSTER=1 needs PULLWAKE_ARQ_REDIS_URL: arq's queue must live on a "
            "standalone Redis (arq has no cluster support)"
        )
    return _url(settings)


def _mismatch(settings: Settings, url: str, enabled: bool, *, arq: bool) -> str | None:
    shown = redact_url(url)
    if arq:
        if enabled:
            return (
                f"PULLWAKE_ARQ_REDIS_URL {shown} is a Redis Cluster node; arq needs a "
                "standalone Redis"
            )
        return None
    if settings.redis_cluster and not enabled:
        return (
            f"PULLWAKE_REDIS_CLUSTER=1 but PULLWAKE_REDIS_URL {shown} is not a Redis Cluster "
            "node (cluster_enabled:0); unset PULLWAKE_REDIS_CLUSTER or name a cluster node"
        )
    if enabled and not settings.redis_cluster:
        return f"PULLWAKE_REDIS_URL {shown} is a Redis Cluster node; set PULLWAKE_REDIS_CLUSTER=1"
    return None


def _targets(settings: Settings, arq: bool) -> list[tuple[str, bool]]:
    targets = [(_url(settings), False)]
    if arq:
        arq_url = arq_redis_url(settings)
        if arq_url != targets[0][0] or settings.redis_cluster:
            targets.append((arq_url, True))
    return targets


def _enabled(info: Any) -> bool:
    return str(dict(info).get("cluster_enabled", 0)) == "1"


async def check_redis_mode(settings: Settings, *, arq: bool = False) -> None:
    """Raise :class:`ConfigError` when ``PULLWAKE_REDIS_CLUSTER`` disagrees with the server at
    ``PULLWAKE_REDIS_URL`` (and, with ``arq``, when arq's URL names a cluster node). An
    unreachable server is not checked: processes start during an outage."""
    for url, for_arq in _targets(settings, arq):
        probe = Redis.from_url(
            url, socket_connect_timeout=PROBE_TIMEOUT_S, socket_timeout=PROBE_TIMEOUT_S
        )
        try:
            info = await probe.info("cluster")
        except (RedisError, OSError):
            continue
        finally:
            await probe.aclose()
        problem = _mismatch(settings, url, _enabled(info), arq=for_arq)
        if problem:
            raise ConfigError(problem)


def check_redis_mode_sync(settings: Settings, *, arq: bool = False) -> None:
    """:func:`check_redis_mode` without an event loop (``pullwake serve`` and ``worker`` check
    before their servers start, so a mismatch is one line, not a start-up traceback)."""
    for url, for_arq in _targets(settings, arq):
        probe = SyncRedis.from_url(
            url, socket_connect_timeout=PROBE_TIMEOUT_S, socket_timeout=PROBE_TIMEOUT_S
        )
        try:
            info = probe.info("cluster")
        except (RedisError, OSError):
            continue
        finally:
            probe.close()
        problem = _mismatch(settings, url, _enabled(info), arq=for_arq)
        if problem:
            raise ConfigError(problem)
