"""Reachability checks, service resolution and (marked ``embedded``) the embedded servers."""

from __future__ import annotations

import socket
import time
from pathlib import Path

import asyncpg
import pytest
import redis.asyncio

from pullwake import embedded
from pullwake.embedded import (
    DEFAULT_DATABASE_URL,
    DEFAULT_REDIS_URL,
    FORCE_EMBEDDED_ENV,
    EmbeddedServices,
    postgres_reachable,
    redis_reachable,
    resolve_services,
)
from pullwake.errors import ConfigError


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _listening(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return True
    except OSError:
        return False


def test_closed_port_is_unreachable() -> None:
    port = _closed_port()
    assert not postgres_reachable(f"postgresql://postgres@127.0.0.1:{port}/postgres", 0.5)
    assert not redis_reachable(f"redis://127.0.0.1:{port}/0", 0.5)


@pytest.mark.parametrize("url", ["postgresql://h:notaport/db", "postgresql://nohost.invalid/db"])
def test_bad_postgres_url_is_unreachable(url: str) -> None:
    assert not postgres_reachable(url, 0.5)


def test_bad_redis_url_is_unreachable() -> None:
    assert not redis_reachable("http://127.0.0.1:6379", 0.5)


@pytest.mark.skipif(not _listening(5432), reason="no local postgres on 127.0.0.1:5432")
def test_local_postgres_is_reachable() -> None:
    assert postgres_reachable(DEFAULT_DATABASE_URL)


@pytest.mark.skipif(not _listening(6379), reason="no local redis on 127.0.0.1:6379")
def test_local_redis_is_reachable() -> None:
    assert redis_reachable(DEFAULT_REDIS_URL)


@pytest.mark.skipif(not _listening(5432), reason="no local postgres on 127.0.0.1:5432")
def test_redis_check_wants_pong_not_just_a_listener() -> None:
    assert not redis_reachable("redis://127.0.0.1:5432/0", 0.5)


def _fake_reachable(monkeypatch: pytest.MonkeyPatch, *up: str) -> None:
    monkeypatch.setattr(embedded, "postgres_reachable", lambda url, timeout_s=1.0: url in up)
    monkeypatch.setattr(embedded, "redis_reachable", lambda url, timeout_s=1.0: url in up)


def test_resolve_prefers_the_configured_urls(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.delenv(FORCE_EMBEDDED_ENV, raising=False)
    db, rd = "postgresql://u@db.example:5433/x", "redis://cache.example:6380/2"
    _fake_reachable(monkeypatch, db, rd, DEFAULT_DATABASE_URL, DEFAULT_REDIS_URL)
    with resolve_services(db, rd, tmp_path) as services:
        assert services == (db, rd)
    assert not (tmp_path / "pg").exists()


def test_resolve_falls_back_to_local_defaults(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.delenv(FORCE_EMBEDDED_ENV, raising=False)
    _fake_reachable(monkeypatch, DEFAULT_DATABASE_URL, DEFAULT_REDIS_URL)
    with resolve_services("postgresql://u@down.example/x", None, tmp_path) as services:
        assert services == (DEFAULT_DATABASE_URL, DEFAULT_REDIS_URL)


def test_data_dir_has_one_owner(tmp_path: Path) -> None:
    second = EmbeddedServices(tmp_path, postgres=False, redis=False)
    with EmbeddedServices(tmp_path, postgres=False, redis=False), pytest.raises(ConfigError):
        second.start()
    with EmbeddedServices(tmp_path, postgres=False, redis=False):
        pass  # released on exit


@pytest.mark.embedded
@pytest.mark.timeout(60)
async def test_forced_embedded_services_work_and_stop(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv(FORCE_EMBEDDED_ENV, "1")
    started = time.monotonic()
    with resolve_services(DEFAULT_DATABASE_URL, DEFAULT_REDIS_URL, tmp_path) as (db_url, rd_url):
        assert time.monotonic() - started < 30
        assert db_url != DEFAULT_DATABASE_URL
        assert rd_url != DEFAULT_REDIS_URL
        await _exercise_postgres(db_url)
        await _exercise_redis(rd_url)
    assert not postgres_reachable(db_url, 0.5)
    assert not redis_reachable(rd_url, 0.5)


async def _exercise_postgres(url: str) -> None:
    conn = await asyncpg.connect(url)
    try:
        assert await conn.fetchval("SELECT 1") == 1
        await conn.execute("CREATE DATABASE pullwake_embedded_check")
    finally:
        await conn.close()
    conn = await asyncpg.connect(url.rsplit("/", 1)[0] + "/pullwake_embedded_check")
    try:
        assert await conn.fetchval("SELECT current_database()") == "pullwake_embedded_check"
    finally:
        await conn.close()


async def _exercise_redis(url: str) -> None:
    client = redis.asyncio.Redis.from_url(url)
    try:
        assert await client.ping() is True
        entry_id = await client.xadd("pullwake:check", {"k": "v"})
        assert await client.xlen("pullwake:check") == 1
        assert entry_id
    finally:
        await client.aclose()
