"""The Redis client factory: which client per settings, arq's URL, pub/sub, and the one-line
configuration errors (no server needed; the cluster itself is in integration/test_cluster.py)."""

from __future__ import annotations

import pytest
from redis.asyncio import Redis
from redis.asyncio.cluster import ClusterNode, RedisCluster

from pullwake.config import Settings
from pullwake.errors import ConfigError
from pullwake.streams.client import (
    ClusterUnavailable,
    arq_redis_url,
    check_redis_mode,
    check_redis_mode_sync,
    is_cluster,
    pubsub_client,
    redis_client,
)

URL = "redis://127.0.0.1:1/0"  # nothing listens on port 1


async def test_single_server_by_default() -> None:
    client = redis_client(Settings(redis_url=URL))
    try:
        assert type(client) is Redis
        assert not is_cluster(client)
        assert client.get_encoder().decode_responses
    finally:
        await client.aclose()


async def test_cluster_client_in_cluster_mode() -> None:
    client = redis_client(Settings(redis_url=URL, redis_cluster=True))
    try:
        assert isinstance(client, RedisCluster)
        assert is_cluster(client)
        assert client.get_encoder().decode_responses
    finally:
        await client.aclose()


async def test_an_unreachable_cluster_is_a_connection_error() -> None:
    """redis-py's RedisClusterException is no RedisError: pullwake's outage handling (503,
    wake left queued, worker waiting) needs a ConnectionError."""
    client = redis_client(Settings(redis_url=URL, redis_cluster=True))
    try:
        with pytest.raises(ClusterUnavailable):
            await client.ping()
    finally:
        await client.aclose()


def test_cluster_mode_refuses_a_database_number() -> None:
    with pytest.raises(ConfigError, match=r"PULLWAKE_REDIS_URL redis://127.0.0.1:6379/3: .*db"):
        redis_client(Settings(redis_url="redis://127.0.0.1:6379/3", redis_cluster=True))


def test_arq_url_defaults_to_the_redis_url_except_in_cluster_mode() -> None:
    assert arq_redis_url(Settings(redis_url=URL)) == URL
    queue = "redis://queue:6379/2"
    assert arq_redis_url(Settings(redis_url=URL, arq_redis_url=queue)) == queue
    assert arq_redis_url(Settings(redis_url=URL, redis_cluster=True, arq_redis_url=queue)) == queue
    with pytest.raises(ConfigError, match="PULLWAKE_ARQ_REDIS_URL"):
        arq_redis_url(Settings(redis_url=URL, redis_cluster=True))


async def test_unreachable_servers_are_not_checked() -> None:
    """Processes start during an outage: the mode is checked when the server answers."""
    for cluster in (False, True):
        settings = Settings(redis_url=URL, redis_cluster=cluster, arq_redis_url=URL)
        await check_redis_mode(settings, arq=True)
        check_redis_mode_sync(settings, arq=True)


async def test_pubsub_client_is_a_plain_redis_on_one_node() -> None:
    plain = pubsub_client(Settings(redis_url="redis://:pw@10.0.0.1:7000/0"))
    assert type(plain) is Redis
    await plain.aclose()
    settings = Settings(redis_url="redis://:pw@10.0.0.1:7000/0", redis_cluster=True)
    node = pubsub_client(settings)  # no cluster client yet: the URL's node
    assert type(node) is Redis
    kwargs = node.connection_pool.connection_kwargs
    assert (kwargs["host"], kwargs["port"], kwargs["password"]) == ("10.0.0.1", 7000, "pw")
    await node.aclose()
    cluster = redis_client(settings)
    assert isinstance(cluster, RedisCluster)
    cluster.nodes_manager.nodes_cache = {
        "10.0.0.2:7001": ClusterNode("10.0.0.2", 7001, server_type="primary")
    }
    other = pubsub_client(settings, cluster)  # a primary the cluster client knows
    kwargs = other.connection_pool.connection_kwargs
    assert (kwargs["host"], kwargs["port"], kwargs["password"]) == ("10.0.0.2", 7001, "pw")
    assert kwargs["decode_responses"] is True
    await other.aclose()
    await cluster.aclose()
