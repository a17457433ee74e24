"""PgBouncer in transaction mode in front of Postgres (``PULLWAKE_PG_TRANSACTION_POOLING``).

Each test starts a pgbouncer of its own (``pool_mode = transaction``, a server pool of
``SERVER_POOL`` connections per database) on a free loopback port in front of the test Postgres.
The app's pool goes through it with more connections than that, so one client connection's
statements run on several server connections; the auth cache's LISTEN goes to Postgres directly
(``PULLWAKE_LISTEN_DATABASE_URL``). Without the setting, asyncpg's cached prepared statements
break as soon as a statement lands on another server connection than the one it was prepared on.

Skipped when the ``pgbouncer`` binary is missing (Debian: ``apt-get install pgbouncer``), or set
``PULLWAKE_TEST_PGBOUNCER`` to its path.
"""

from __future__ import annotations

import asyncio
import os
import secrets
import shutil
import socket
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import httpx
import pytest
from redis.asyncio import Redis

from pullwake.authcache import TOKEN, AuthCache, listening
from pullwake.config import Settings
from pullwake.model import Principal, hash_token
from pullwake.store import Store
from pullwake.store.migrate import available_migrations
from pullwake.testing import free_port

from .helpers import (
    ALICE,
    append_event,
    bearer,
    claim_ok,
    create_entity,
    done,
    heartbeat,
    read_wakes,
    register_runner,
    release,
    send,
    signal,
    uid,
)

SERVER_URL = os.environ.get(
    "PULLWAKE_TEST_DATABASE_URL", "postgresql://postgres@127.0.0.1:5432/postgres"
)
SERVER_POOL = 2  # pgbouncer's server connections per database
CLIENT_POOL = 10  # the app's pool: five clients per server connection
ENTITIES = 12


def _find_pgbouncer() -> str | None:
    """``PULLWAKE_TEST_PGBOUNCER``, else ``pgbouncer`` on PATH or in the ``sbin`` next to a
    ``bin`` on PATH (Debian installs it in sbin, which is not on every user's PATH)."""
    forced = os.environ.get("PULLWAKE_TEST_PGBOUNCER")
    if forced:
        return forced
    dirs = os.environ.get("PATH", "").split(os.pathsep)
    dirs += [str(Path(d).with_name("sbin")) for d in dirs if Path(d).name == "bin"]
    return shutil.which("pgbouncer", path=os.pathsep.join(dirs))


PGBOUNCER = _find_pgbouncer()

pytestmark = pytest.mark.skipif(
    PGBOUNCER is None,
    reason="pgbouncer is not installed (Debian: apt-get install pgbouncer; "
    "or set PULLWAKE_TEST_PGBOUNCER to its path)",
)


class PgBouncer:
    """A pgbouncer process in transaction mode in front of the Postgres of ``server_url``."""

    def __init__(self, directory: Path, server_url: str) -> None:
        self.dir = directory
        self.server = urlsplit(server_url)
        self.port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def log_path(self) -> Path:
        return self.dir / "pgbouncer.log"

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def url(self, direct_url: str) -> str:
        """``direct_url`` (same user and database) through this pgbouncer."""
        parts = urlsplit(direct_url)
        user = parts.username or "postgres"
        return urlunsplit(parts._replace(netloc=f"{user}@127.0.0.1:{self.port}"))

    def start(self, timeout: float = 10) -> None:
        user = self.server.username or "postgres"
        password = f" password={self.server.password}" if self.server.password else ""
        server = f"host={self.server.hostname or '127.0.0.1'} port={self.server.port or 5432}"
        users = self.dir / "userlist.txt"
        users.write_text(f'"{user}" ""\n')
        ini = self.dir / "pgbouncer.ini"
        ini.write_text(
            "[databases]\n"
            f"* = {server} user={user}{password}\n"
            "[pgbouncer]\n"
            "listen_addr = 127.0.0.1\n"
            f"listen_port = {self.port}\n"
            "unix_socket_dir =\n"
            "auth_type = trust\n"
            f"auth_file = {users}\n"
            "pool_mode = transaction\n"
            f"default_pool_size = {SERVER_POOL}\n"
            "min_pool_size = 0\n"
            "reserve_pool_size = 0\n"
            "max_client_conn = 500\n"
            "server_round_robin = 0\n"  # LIFO: the connection used last is handed out first
            "query_wait_timeout = 30\n"
        )
        assert PGBOUNCER is not None
        argv = [PGBOUNCER]
        if os.geteuid() == 0:  # it refuses to run as root; it reads its files before switching
            argv += ["-u", "nobody"]
        with self.log_path.open("ab") as log:
            self.proc = subprocess.Popen(
                [*argv, str(ini)], stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT
            )
        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                raise AssertionError(f"pgbouncer exited {self.proc.returncode}:\n{self.log()}")
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
                return
            except OSError:
                if time.monotonic() > deadline:
                    raise AssertionError(
                        f"pgbouncer not listening in {timeout} s:\n{self.log()}"
                    ) from None
                time.sleep(0.05)

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(5)


@pytest.fixture
def pgbouncer(tmp_path: Path) -> Iterator[PgBouncer]:
    bouncer = PgBouncer(tmp_path, SERVER_URL)
    bouncer.start()
    try:
        yield bouncer
    finally:
        bouncer.stop()


@pytest.fixture
def server_settings(settings: Settings, pgbouncer: PgBouncer) -> Settings:
    """The app's pool through pgbouncer (transaction pooling on); its LISTEN direct."""
    assert settings.database_url is not None
    return settings.with_(
        database_url=pgbouncer.url(settings.database_url),
        listen_database_url=settings.database_url,
        pg_transaction_pooling=True,
        pg_pool_min=1,
        pg_pool_max=CLIENT_POOL,
    )


async def _backend_moves(conn: Any, other: Any) -> tuple[int, int, int]:
    """One statement on ``conn``, then (while ``other`` holds that server connection in a
    transaction) the same statement again: the backend pids of the three."""
    statement = "SELECT pg_backend_pid() + $1::int"
    for _ in range(20):
        first = await conn.fetchval(statement, 0)
        async with other.transaction():
            held = await other.fetchval("SELECT pg_backend_pid()")
            if held != first:  # pgbouncer handed out another idle server: try again
                continue
            second = await asyncio.wait_for(conn.fetchval(statement, 0), 10)
            return first, held, second
    raise AssertionError("pgbouncer never handed the same server connection on")


async def test_without_transaction_pooling_a_cached_statement_breaks(
    pgbouncer: PgBouncer, database_url: str
) -> None:
    """What the setting is for, shown on two pooled connections: a statement prepared on one
    server connection and executed again after another client took that server connection."""
    url = pgbouncer.url(database_url)

    cached = await Store.connect(url, min_size=2, max_size=2)
    try:
        async with cached.pool.acquire() as conn, cached.pool.acquire() as other:
            with pytest.raises(asyncpg.InvalidSQLStatementNameError, match="does not exist"):
                await _backend_moves(conn, other)
    finally:
        await cached.close()

    store = await Store.connect(url, min_size=2, max_size=2, transaction_pooling=True)
    try:
        async with store.pool.acquire() as conn, store.pool.acquire() as other:
            first, held, second = await _backend_moves(conn, other)
        assert first == held != second  # the client's statements ran on two backends
        assert await store.fetchval("schema_now") is not None
    finally:
        await store.close()


async def test_the_whole_lifecycle_through_pgbouncer_in_transaction_mode(
    api: Any, db: asyncpg.Connection, pgbouncer: PgBouncer
) -> None:
    http: httpx.AsyncClient = api.http
    services = api.services
    assert api.settings.pg_transaction_pooling
    statuses: Counter[int] = Counter()

    async def count(response: httpx.Response) -> None:
        statuses[response.status_code] += 1

    http.event_hooks["response"].append(count)

    # One pooled connection's statements wander between pgbouncer's server connections while
    # the load below runs: the pids it sees.
    pids: set[int] = set()
    load_done = asyncio.Event()

    async def watch_backends() -> None:
        async with services.store.pool.acquire() as conn:
            while not load_done.is_set():
                pids.add(await conn.fetchval("SELECT pg_backend_pid()"))
                await asyncio.sleep(0.005)

    watcher = asyncio.create_task(watch_backends())

    alice = await api.as_(ALICE)
    runner = await register_runner(http, alice)
    entities = await asyncio.gather(*(create_entity(http, alice, runner) for _ in range(ENTITIES)))
    await services.streams.ensure_group(runner)

    # sends, concurrent (the combiner joins them), then a batch of one more each
    async def send_three(entity: Any) -> None:
        for n in range(1, 4):
            result = await send(http, alice, entity, {"n": n}, idempotency_key=f"k{n}")
            assert result["offset"] == n, result

    await asyncio.gather(*(send_three(e) for e in entities))
    again = await send(http, alice, entities[0], {"n": 1}, idempotency_key="k1")
    assert (again["duplicate"], again["offset"]) == (True, 1), again
    batch = [{"entity": e.url, "payload": {"n": 4}, "idempotency_key": "k4"} for e in entities]
    response = await http.post("/v1/messages", json={"messages": batch}, headers=alice)
    assert response.status_code == 200, response.text
    assert [r["offset"] for r in response.json()["results"]] == [4] * ENTITIES, response.text

    # one wake per entity (the later sends coalesced); claims, heartbeats, events, concurrent
    wakes = await read_wakes(http, alice, runner, count=ENTITIES, timeout=20)
    assert sorted(w.data["entity"] for w in wakes) == sorted(e.url for e in entities)
    claims = await asyncio.gather(
        *(claim_ok(http, alice, runner, w.data["wake_id"], w.id) for w in wakes)
    )
    by_url = {c["entity"]["url"]: c for c in claims}
    assert all(c["tail_offset"] == 4 and len(c["messages"]) == 4 for c in claims), claims

    async def hold(notification: dict[str, Any]) -> None:
        for _ in range(2):
            r = await heartbeat(http, notification)
            assert r.status_code == 200, r.text
        entity = next(e for e in entities if e.url == notification["entity"]["url"])
        r = await append_event(http, entity, notification["claim_token"], {"seen": 4})
        assert r.status_code == 201, r.text

    await asyncio.gather(*(hold(c) for c in claims))

    # half done, half released (their work comes back as new wakes); one of those is paused
    # first, so it gets no wake until resumed
    done_half, released = entities[: ENTITIES // 2], entities[ENTITIES // 2 :]
    paused = released[0]
    assert (await signal(http, alice, paused, "pause"))["status"] == "paused"

    async def finish(entity: Any, ok: bool) -> None:
        notification = by_url[entity.url]
        if ok:
            r = await done(http, notification, 4)
        else:
            r = await release(http, notification, error="through pgbouncer")
        assert r.status_code == 200, r.text

    await asyncio.gather(
        *(finish(e, True) for e in done_half), *(finish(e, False) for e in released)
    )

    again_wakes = await read_wakes(http, alice, runner, count=len(released) - 1, timeout=20)
    assert paused.url not in {w.data["entity"] for w in again_wakes}
    assert (await signal(http, alice, paused, "resume"))["status"] != "paused"
    again_wakes += await read_wakes(http, alice, runner, count=1, timeout=20)
    assert again_wakes[-1].data["entity"] == paused.url
    seconds = await asyncio.gather(
        *(claim_ok(http, alice, runner, w.data["wake_id"], w.id) for w in again_wakes)
    )
    assert sorted(c["entity"]["url"] for c in seconds) == sorted(e.url for e in released)
    finished = await asyncio.gather(*(done(http, c, 4) for c in seconds))
    assert [r.status_code for r in finished] == [200] * len(seconds)

    load_done.set()
    await watcher

    rows = await db.fetch(
        "SELECT entity_url, tail_offset, acked_offset, active_claim_id FROM dispatch_state "
        "WHERE entity_url = ANY($1::text[])",
        [e.url for e in entities],
    )
    assert len(rows) == ENTITIES
    assert all(
        (r["tail_offset"], r["acked_offset"], r["active_claim_id"]) == (4, 4, None) for r in rows
    ), [dict(r) for r in rows]
    events = await db.fetchval(
        "SELECT count(*) FROM entity_events WHERE entity_url = ANY($1::text[])",
        [e.url for e in entities],
    )
    assert events == ENTITIES

    # statements really interleaved: more client connections than server connections, and
    # one client connection's statements ran on more than one backend
    assert services.store.pool.get_size() > SERVER_POOL
    assert len(pids) > 1, pids
    backends = await db.fetchval(
        "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
        "AND pid = ANY($1::int[])",
        list(pids),
    )
    assert 1 < backends <= SERVER_POOL

    # the auth cache listens on its direct connection, and a revoke counts at once
    cache = services.auth_cache
    assert cache.active
    listener_pid = cache.listener.server_pid
    assert listener_pid not in pids
    assert await db.fetchval("SELECT count(*) FROM pg_stat_activity WHERE pid = $1", listener_pid)
    raw, row = await services.tokens.create(Principal.parse(ALICE), "doomed")
    assert (await http.get("/v1/runners", headers=bearer(raw))).status_code == 200
    assert cache.peek(TOKEN + hash_token(raw)) is not None
    await db.execute("UPDATE principals_tokens SET revoked_at = now() WHERE id = $1", row.id)
    assert (await http.get("/v1/runners", headers=bearer(raw))).status_code == 401
    http.event_hooks["response"].remove(count)
    assert not [s for s in statuses if s >= 500], statuses


def _with_database(url: str, name: str) -> str:
    return urlunsplit(urlsplit(url)._replace(path=f"/{name}"))


async def _pullwake(env: dict[str, str], *args: str) -> tuple[int, str]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "pullwake",
        *args,
        env=env,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    out, _ = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode is not None
    return proc.returncode, out.decode()


async def test_migrate_and_the_cli_work_through_pgbouncer(pgbouncer: PgBouncer) -> None:
    """``pullwake migrate`` needs no direct URL: twice through pgbouncer on a fresh database
    (the second run reuses the first one's server connection), then the CLI's and the
    worker's pools with the setting from the environment."""
    name = f"pullwake_pgb_{secrets.token_hex(4)}"
    prefix = uid("pgb")
    redis_url = os.environ.get("PULLWAKE_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")
    admin = await asyncpg.connect(SERVER_URL)
    await admin.execute(f'CREATE DATABASE "{name}"')
    try:
        url = pgbouncer.url(_with_database(SERVER_URL, name))
        env = {k: v for k, v in os.environ.items() if not k.startswith("PULLWAKE_")}
        env.update(
            PULLWAKE_DATABASE_URL=url,
            PULLWAKE_REDIS_URL=redis_url,
            PULLWAKE_REDIS_KEY_PREFIX=prefix,
            PULLWAKE_PG_TRANSACTION_POOLING="1",
        )
        code, out = await _pullwake(env, "migrate")
        assert (code, "applied: 0001_initial" in out) == (0, True), out
        code, out = await _pullwake(env, "migrate")
        assert (code, "database is up to date" in out) == (0, True), out
        code, out = await _pullwake(env, "tokens", "create", "--principal", ALICE)
        assert (code, "pwk_" in out) == (0, True), out
        code, out = await _pullwake(env, "tokens", "list")
        assert (code, ALICE in out) == (0, True), out
        code, out = await _pullwake(env, "worker", "--once")  # one recovery pass
        assert (code, out.splitlines()[-1].startswith("{")) == (0, True), out
        direct = await asyncpg.connect(_with_database(SERVER_URL, name))
        try:
            versions = await direct.fetchval("SELECT count(*) FROM pullwake_migrations")
            assert versions == len(available_migrations())
        finally:
            await direct.close()
    finally:
        pgbouncer.stop()  # its server connections to the database go first
        await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        await admin.close()
        redis = Redis.from_url(redis_url)
        try:  # the worker's pass left its recovery marker under the prefix
            keys = [key async for key in redis.scan_iter(match=f"{prefix}:*")]
            if keys:
                await redis.delete(*keys)
        finally:
            await redis.aclose()


async def test_listener_stays_off_without_a_direct_url(settings: Settings) -> None:
    """Transaction pooling on and no PULLWAKE_LISTEN_DATABASE_URL: no LISTEN through the pooler,
    the cache is simply off (every request looks its token up)."""
    cache = AuthCache.from_settings(settings)
    async with listening(cache, settings.with_(pg_transaction_pooling=True)) as listener:
        assert listener is None
        assert not cache.active
    async with listening(cache, settings.with_(listen_database_url=settings.database_url)) as lst:
        assert lst is not None
        await asyncio.wait_for(lst.wait_connected(), 10)
        assert cache.active
    assert not cache.active
