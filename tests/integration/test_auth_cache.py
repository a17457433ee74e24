"""The auth cache: a known API token and runner cost no Postgres lookup, and a revoke, delete or
disable (through the API, the CLI's code path or plain SQL) counts on every replica at once.

Two servers on one database are two replicas: each has its own cache and listener."""

from __future__ import annotations

import asyncio
from typing import Any

import asyncpg

from pullwake.authcache import RUNNER, TOKEN
from pullwake.config import Settings
from pullwake.core.runners import RunnerAccess
from pullwake.model import Principal, hash_token
from pullwake.store.pg import q
from pullwake.testing import free_port

from .helpers import (
    ALICE,
    BOB,
    assert_problem,
    bearer,
    claim,
    claim_ok,
    create_entity,
    read_sse,
    register_runner,
    send,
    wait_for,
)
from .servers import Server, serve

LOOKUPS = {q("token_lookup"), q("token_touch"), q("runner_get")}


class Statements:
    """The statements a store sends while installed as its observer."""

    def __init__(self) -> None:
        self.sent: list[str] = []

    def __call__(self, record: Any) -> None:
        self.sent.append(record.query)

    @property
    def lookups(self) -> list[str]:
        return [s for s in self.sent if s in LOOKUPS]


def token_key(raw: str) -> str:
    return TOKEN + hash_token(raw)


async def _token(server: Server, principal: str = ALICE) -> tuple[str, str]:
    raw, row = await server.services.tokens.create(Principal.parse(principal), "test")
    return raw, row.id


async def test_a_warm_cache_looks_nothing_up(api, db: asyncpg.Connection) -> None:
    services = api.services
    cache = services.auth_cache
    http = api.http
    alice = await api.as_(ALICE)
    runner = await register_runner(http, alice)
    entity = await create_entity(http, alice, runner)
    await services.streams.ensure_group(runner)
    wakes = [(await send(http, alice, entity, 1))["wake"]["id"]]
    assert cache.peek(token_key(alice["Authorization"][7:])) is not None
    assert cache.peek(RUNNER + runner) == RunnerAccess(ALICE, "enabled")

    statements = Statements()
    rounds = cache.listener.rounds
    services.store.observer = statements
    try:
        assert (await http.get("/v1/runners", headers=alice)).status_code == 200
        resp = await http.post(f"/v1/runners/{runner}/heartbeat", headers=alice)
        assert resp.status_code == 200, resp.text
        await claim_ok(http, alice, runner, wakes[0])
        # Strict mode: one listener round per request (the claim's token and runner share one).
        assert cache.listener.rounds - rounds == 3
        events = await read_sse(http, alice, runner, None, until=lambda events: bool(events))
        assert events[0].comments
        await asyncio.sleep(0)
    finally:
        services.store.observer = None
    assert statements.sent, "the observer saw nothing"
    assert statements.lookups == []


async def test_concurrent_hits_share_one_listener_round(api) -> None:
    tokens = api.services.tokens
    raw = await api.make_token(ALICE)
    assert await tokens.authenticate(raw) == Principal.parse(ALICE)  # fills
    rounds = tokens.cache.listener.rounds
    found = await asyncio.gather(*(tokens.authenticate(raw) for _ in range(50)))
    assert set(found) == {Principal.parse(ALICE)}
    assert tokens.cache.listener.rounds - rounds == 1


async def test_revocation_counts_on_every_replica_at_once(
    settings: Settings, db: asyncpg.Connection
) -> None:
    async with serve(settings) as one, serve(settings) as two:
        by_cli, by_cli_id = await _token(one)
        by_sql, by_sql_id = await _token(one)
        by_delete, by_delete_id = await _token(one)
        kept, _ = await _token(one)
        for server in (one, two):
            assert server.services.auth_cache.active
            for raw in (by_cli, by_sql, by_delete, kept):
                resp = await server.http.get("/v1/runners", headers=bearer(raw))
                assert resp.status_code == 200, resp.text
                assert server.services.auth_cache.peek(token_key(raw)) is not None

        await one.services.tokens.revoke(by_cli_id)  # what `pullwake tokens revoke` runs
        for server in (two, one):
            resp = await server.http.get("/v1/runners", headers=bearer(by_cli))
            assert "revoked" in assert_problem(resp, 401, "UNAUTHORIZED")["detail"]

        await db.execute("UPDATE principals_tokens SET revoked_at = now() WHERE id = $1", by_sql_id)
        for server in (two, one):
            assert_problem(await server.http.get("/v1/runners", headers=bearer(by_sql)), 401)

        await db.execute("DELETE FROM principals_tokens WHERE id = $1", by_delete_id)
        for server in (two, one):
            assert_problem(await server.http.get("/v1/runners", headers=bearer(by_delete)), 401)

        for server in (two, one):
            assert (await server.http.get("/v1/runners", headers=bearer(kept))).status_code == 200
        await db.execute("TRUNCATE principals_tokens CASCADE")
        for server in (two, one):
            assert_problem(await server.http.get("/v1/runners", headers=bearer(kept)), 401)


async def test_runner_disable_enable_and_delete_count_on_every_replica_at_once(
    settings: Settings,
) -> None:
    async with serve(settings) as one, serve(settings) as two:
        alice = await one.headers(ALICE)
        runner = await register_runner(one.http, alice)
        entity = await create_entity(one.http, alice, runner)
        wake_id = (await send(one.http, alice, entity, "a"))["wake"]["id"]
        resp = await two.http.post(f"/v1/runners/{runner}/heartbeat", headers=alice)
        assert resp.status_code == 200, resp.text
        assert two.services.auth_cache.peek(RUNNER + runner) == RunnerAccess(ALICE, "enabled")

        resp = await one.http.post(f"/v1/runners/{runner}/disable", headers=alice)
        assert resp.json()["admin_status"] == "disabled", resp.text
        assert_problem(await claim(two.http, alice, runner, wake_id), 409, "RUNNER_DISABLED")
        resp = await two.http.get(f"/v1/runners/{runner}/wakes", headers=alice)
        assert_problem(resp, 409, "RUNNER_DISABLED")

        resp = await one.http.post(f"/v1/runners/{runner}/enable", headers=alice)
        assert resp.json()["admin_status"] == "enabled", resp.text
        await claim_ok(two.http, alice, runner, wake_id)

        assert (await one.http.delete(f"/v1/runners/{runner}", headers=alice)).status_code == 204
        resp = await two.http.post(f"/v1/runners/{runner}/heartbeat", headers=alice)
        assert_problem(resp, 404, "NOT_FOUND")
        assert_problem(await claim(two.http, alice, runner, wake_id), 404, "NOT_FOUND")


async def test_runner_changes_in_sql_count_at_once(
    api, http, alice, db: asyncpg.Connection
) -> None:
    runner = await register_runner(http, alice)
    path = f"/v1/runners/{runner}/heartbeat"
    assert (await http.post(path, headers=alice)).status_code == 200
    await db.execute("UPDATE runners SET admin_status = 'disabled' WHERE id = $1", runner)
    wake = "wk_0000000000000000000000000000"
    assert_problem(await claim(http, alice, runner, wake), 409, "RUNNER_DISABLED")
    await db.execute("UPDATE runners SET owner_principal = $2 WHERE id = $1", runner, BOB)
    assert_problem(await http.post(path, headers=alice), 403, "FORBIDDEN")
    assert (await http.post(path, headers=await api.as_(BOB))).status_code == 200
    await db.execute("DELETE FROM runners WHERE id = $1", runner)
    assert_problem(await http.post(path, headers=await api.as_(BOB)), 404, "NOT_FOUND")


async def test_a_lost_listener_turns_the_cache_off_until_it_is_back(
    api, db: asyncpg.Connection
) -> None:
    services = api.services
    cache = services.auth_cache
    listener = cache.listener
    alice = await api.as_(ALICE)
    raw, doomed_id = await _token(Server(api.app, api.http))
    for headers in (alice, bearer(raw)):
        assert (await api.http.get("/v1/runners", headers=headers)).status_code == 200
    assert len(cache) == 2

    dsn, listener.dsn = listener.dsn, f"postgresql://postgres@127.0.0.1:{free_port()}/x"
    await db.execute("SELECT pg_terminate_backend($1)", listener.server_pid)
    await wait_for(lambda: _true(not cache.active))
    assert len(cache) == 0

    statements = Statements()
    services.store.observer = statements
    try:
        for _ in range(2):
            assert (await api.http.get("/v1/runners", headers=alice)).status_code == 200
        await asyncio.sleep(0)
        assert statements.lookups.count(q("token_lookup")) == 2  # nothing cached meanwhile
    finally:
        services.store.observer = None
    assert len(cache) == 0
    await db.execute("UPDATE principals_tokens SET revoked_at = now() WHERE id = $1", doomed_id)
    assert_problem(await api.http.get("/v1/runners", headers=bearer(raw)), 401)

    listener.dsn = dsn
    await asyncio.wait_for(listener.wait_connected(), 10)
    assert (await api.http.get("/v1/runners", headers=alice)).status_code == 200  # fills again
    statements = Statements()
    services.store.observer = statements
    try:
        assert (await api.http.get("/v1/runners", headers=alice)).status_code == 200
        await asyncio.sleep(0)
    finally:
        services.store.observer = None
    assert statements.lookups == []
    await db.execute("UPDATE principals_tokens SET revoked_at = now()")
    assert_problem(await api.http.get("/v1/runners", headers=alice), 401)


async def _true(value: bool) -> bool:
    return value


async def test_cached_use_is_recorded_about_once_a_minute(api, db: asyncpg.Connection) -> None:
    cache = api.services.auth_cache
    alice = await api.as_(ALICE)
    assert (await api.http.get("/v1/runners", headers=alice)).status_code == 200
    entry = cache.peek(token_key(alice["Authorization"][7:]))
    assert entry is not None
    await db.execute("UPDATE principals_tokens SET last_used_at = now() - interval '1 hour'")

    assert (await api.http.get("/v1/runners", headers=alice)).status_code == 200
    assert cache.peek(token_key(alice["Authorization"][7:])) is entry  # last_used_at: silent
    await asyncio.sleep(0.05)
    old = "SELECT last_used_at < now() - interval '59 minutes' FROM principals_tokens"
    assert await db.fetchval(old), "a hit within the minute recorded the use again"

    entry.recorded_at -= 61 * 1_000_000_000  # the last record is a minute old
    assert (await api.http.get("/v1/runners", headers=alice)).status_code == 200
    await wait_for(lambda: _not(db.fetchval(old)))


async def _not(value: Any) -> bool:
    return not await value


async def test_cache_off_looks_up_every_time(settings: Settings) -> None:
    async with serve(settings.with_(auth_cache_ttl_ms=0)) as server:
        assert server.services.auth_cache.listener is None
        alice = await server.headers(ALICE)
        runner = await register_runner(server.http, alice)
        statements = Statements()
        server.services.store.observer = statements
        try:
            for _ in range(2):
                resp = await server.http.post(f"/v1/runners/{runner}/heartbeat", headers=alice)
                assert resp.status_code == 200, resp.text
            await asyncio.sleep(0)
        finally:
            server.services.store.observer = None
        assert sorted(statements.lookups) == sorted([q("token_lookup"), q("runner_get")] * 2)


async def test_without_strict_mode_a_hit_waits_for_nothing(
    settings: Settings, db: asyncpg.Connection
) -> None:
    async with serve(settings.with_(auth_cache_strict=False)) as server:
        listener = server.services.auth_cache.listener
        raw, token_id = await _token(server)
        for _ in range(3):
            assert (await server.http.get("/v1/runners", headers=bearer(raw))).status_code == 200
        assert listener.rounds == 0
        await db.execute("UPDATE principals_tokens SET revoked_at = now() WHERE id = $1", token_id)

        async def refused() -> bool:
            resp = await server.http.get("/v1/runners", headers=bearer(raw))
            return resp.status_code == 401

        await wait_for(refused, timeout=2)  # once the notification is in


async def test_a_listener_whose_commands_reach_another_backend_turns_the_cache_off(
    api, monkeypatch, caplog
) -> None:
    """What a transaction-pooling PgBouncer would do: the backend that answers is not the one
    that listens, so notifications could go anywhere."""
    cache = api.services.auth_cache
    alice = await api.as_(ALICE)
    assert (await api.http.get("/v1/runners", headers=alice)).status_code == 200
    assert len(cache) == 1
    monkeypatch.setattr(asyncpg.Connection, "get_server_pid", lambda self: -1)
    resp = await api.http.get("/v1/runners", headers=alice)  # the hit's round finds out
    assert resp.status_code == 200, resp.text  # answered by a lookup instead
    assert not cache.active
    assert len(cache) == 0
    assert "PULLWAKE_LISTEN_DATABASE_URL" in caplog.text
    monkeypatch.undo()
    await asyncio.wait_for(cache.listener.wait_connected(), 10)
