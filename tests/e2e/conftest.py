"""Fixtures for the end-to-end tests: environment, CLI runner and server processes."""

from __future__ import annotations

import secrets
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path

import pytest
from redis.asyncio import Redis

from pullwake.testing import free_port

from .harness import REDIS_URL, Cli, ServerProcess, child_env


@pytest.fixture
def key_prefix() -> str:
    return f"pwe2e{secrets.token_hex(4)}"


@pytest.fixture
async def pw_env(database_url: str, redis: Redis, key_prefix: str) -> AsyncIterator[dict[str, str]]:
    """Environment of every child process: the test database, Redis and a unique key prefix."""
    yield child_env(
        PULLWAKE_DATABASE_URL=database_url,
        PULLWAKE_REDIS_URL=REDIS_URL,
        PULLWAKE_REDIS_KEY_PREFIX=key_prefix,
        # short Redis blocks and keep-alives so streams notice shutdowns quickly
        PULLWAKE_SSE_BLOCK_MS="200",
        PULLWAKE_SSE_KEEPALIVE_MS="1000",
    )
    keys = [key async for key in redis.scan_iter(match=f"{key_prefix}:*", count=500)]
    if keys:
        await redis.delete(*keys)


@pytest.fixture
def cli(pw_env: dict[str, str]) -> Cli:
    return Cli(pw_env)


@pytest.fixture
def server_factory(
    pw_env: dict[str, str], tmp_path: Path
) -> Iterator[Callable[..., Awaitable[ServerProcess]]]:
    """Start ``pullwake serve`` processes; every one is terminated (then killed) afterwards."""
    servers: list[ServerProcess] = []

    async def start(*args: str) -> ServerProcess:
        log_path = tmp_path / f"serve-{len(servers)}.log"
        server = ServerProcess(pw_env, free_port(), log_path, args=args)
        servers.append(server)
        await server.start()
        return server

    try:
        yield start
    finally:
        for server in servers:
            server.cleanup()


@pytest.fixture
async def server(server_factory: Callable[[], Awaitable[ServerProcess]]) -> ServerProcess:
    return await server_factory()
