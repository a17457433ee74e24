"""Shared fixtures: a fresh database per run, a unique Redis prefix per test, a live API."""

from __future__ import annotations

import contextlib
import os
import secrets
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import httpx
import pytest
from redis.asyncio import Redis
from redis.asyncio.cluster import RedisCluster
from redis.exceptions import RedisError

from cluster import LocalCluster, cluster_binaries_missing
from pullwake.config import Settings
from pullwake.http import create_app
from pullwake.model import Principal
from pullwake.store.migrate import apply_migrations
from pullwake.testing import RedisServer, serve_in_background

SERVER_URL = os.environ.get(
    "PULLWAKE_TEST_DATABASE_URL", "postgresql://postgres@127.0.0.1:5432/postgres"
)
REDIS_URL = os.environ.get("PULLWAKE_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")
TABLES = (
    "claims, wakes, inbox_messages, entity_events, dispatch_state, entities, entity_types, "
    "runner_liveness, runners, principals_tokens"
)


def _with_database(url: str, name: str) -> str:
    parts = urlsplit(url)
    return urlunsplit(parts._replace(path=f"/{name}"))


@contextlib.asynccontextmanager
async def new_database(prefix: str) -> AsyncIterator[str]:
    """The URL of a brand-new, empty database ``<prefix>_<hex>``; dropped afterwards."""
    name = f"{prefix}_{secrets.token_hex(4)}"
    admin = await asyncpg.connect(SERVER_URL)
    await admin.execute(f'CREATE DATABASE "{name}"')
    await admin.close()
    try:
        yield _with_database(SERVER_URL, name)
    finally:
        admin = await asyncpg.connect(SERVER_URL)
        await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        await admin.close()


@pytest.fixture(scope="session")
async def database_url() -> AsyncIterator[str]:
    """A brand-new database with every migration applied; dropped at the end of the run."""
    async with new_database("pullwake_test") as url:
        await apply_migrations(url)
        yield url


@pytest.fixture
async def bare_database_url() -> AsyncIterator[str]:
    """A database of the test's own without any pullwake schema; dropped afterwards."""
    async with new_database("pullwake_bare") as url:
        yield url


@pytest.fixture
async def db(database_url: str) -> AsyncIterator[asyncpg.Connection]:
    """A direct connection to the test database, emptied before the test."""
    conn = await asyncpg.connect(database_url)
    await conn.execute(f"TRUNCATE {TABLES} CASCADE")
    try:
        yield conn
    finally:
        await conn.close()


@pytest.fixture
async def redis() -> AsyncIterator[Redis]:
    client: Redis = Redis.from_url(REDIS_URL, decode_responses=True)
    yield client
    await client.aclose()


@pytest.fixture
async def settings(
    database_url: str, db: asyncpg.Connection, redis: Redis
) -> AsyncIterator[Settings]:
    """Settings for one test: its own Redis key prefix (deleted afterwards), clean tables."""
    prefix = f"pwtest{secrets.token_hex(4)}"
    yield Settings(
        database_url=database_url,
        redis_url=REDIS_URL,
        redis_key_prefix=prefix,
        sse_block_ms=200,
        sse_keepalive_ms=1_000,
    )
    keys = [key async for key in redis.scan_iter(match=f"{prefix}:*", count=500)]
    if keys:
        await redis.delete(*keys)


@dataclass
class Api:
    """A live pullwake server and helpers to call it as different principals."""

    base_url: str
    http: httpx.AsyncClient
    settings: Settings
    make_token: Callable[[str], Awaitable[str]]
    app: Any = None

    @property
    def services(self) -> Any:
        """The live server's service graph."""
        return self.app.state["pullwake"]

    async def as_(self, principal: str) -> dict[str, str]:
        """Authorization headers for a fresh API token of ``principal``."""
        return {"Authorization": f"Bearer {await self.make_token(principal)}"}

    async def request(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        return await self.http.request(method, path, **kwargs)


@pytest.fixture
def server_settings(settings: Settings) -> Settings:
    """Override in a test module to change the server's settings."""
    return settings


@pytest.fixture
async def api(server_settings: Settings) -> AsyncIterator[Api]:
    """pullwake served by uvicorn on a free loopback port, plus an httpx client."""
    app = create_app(server_settings)

    async def make_token(principal: str) -> str:
        services = app.state["pullwake"]
        raw, _ = await services.tokens.create(Principal.parse(principal), "test")
        return str(raw)

    async with (
        serve_in_background(app) as base_url,
        httpx.AsyncClient(base_url=base_url, timeout=10) as http,
    ):
        yield Api(base_url, http, server_settings, make_token, app)


@pytest.fixture
async def private_redis(tmp_path: Path) -> AsyncIterator[RedisServer]:
    """A redis-server of the test's own on a free loopback port, for tests that stop it."""
    server = RedisServer(tmp_path)
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="session")
def redis_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalCluster]:
    """A Redis Cluster of three primaries on free loopback ports (``tests/cluster.py``), shared
    by the run; tests that restart a node leave it ``cluster_state:ok`` again."""
    missing = cluster_binaries_missing()
    if missing is not None:
        pytest.skip(f"Redis Cluster tests need redis-server and redis-cli: {missing}")
    cluster = LocalCluster(tmp_path_factory.mktemp("redis-cluster"))
    cluster.start()
    try:
        yield cluster
    finally:
        cluster.stop()


@pytest.fixture
async def cluster_settings(
    settings: Settings, redis_cluster: LocalCluster
) -> AsyncIterator[Settings]:
    """``settings`` in cluster mode: wake streams and limits on the test cluster, arq on the
    shared standalone Redis. The test's keys are deleted from every primary afterwards."""
    yield settings.with_(redis_url=redis_cluster.url, redis_cluster=True, arq_redis_url=REDIS_URL)
    client = RedisCluster.from_url(redis_cluster.url, decode_responses=True)
    try:
        with contextlib.suppress(RedisError, OSError):  # a test may leave the cluster broken
            match = f"{settings.redis_key_prefix}:*"
            async for key in client.scan_iter(match=match, count=500):  # every primary
                await client.delete(key)
    finally:
        await client.aclose()
