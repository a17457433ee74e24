"""The per-process wake reader on real Redis: many wake streams share a bounded set of Redis
connections, a wake reaches the right session, a lost notification is delivered by the poll,
and a Redis restart is survived by the open streams."""

from __future__ import annotations

import asyncio
import contextlib
import json
import secrets
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
from redis.asyncio import Redis

from pullwake.config import Settings
from pullwake.model import hash_token
from pullwake.testing import RedisServer

from .helpers import (
    ALICE,
    GROUP,
    claim_ok,
    create_entity,
    read_wake,
    register_runner,
    send,
    stream_key,
    wait_for,
)
from .servers import Server, serve


@dataclass
class RawStream:
    """One wake stream over a raw socket: cheap enough to hold hundreds."""

    reader: asyncio.StreamReader
    writer: asyncio.StreamWriter
    session: str
    wakes: asyncio.Queue[tuple[str, dict[str, Any]]] = field(default_factory=asyncio.Queue)
    task: asyncio.Task[None] | None = None

    async def pump(self) -> None:
        entry = ""
        while line := await self.reader.readline():
            text = line.decode().rstrip("\r\n")
            if text.startswith("id:"):
                entry = text[3:].strip()
            elif text.startswith("data:"):
                await self.wakes.put((entry, json.loads(text[5:])))

    def close(self) -> None:
        if self.task is not None:
            self.task.cancel()
        self.writer.close()


async def open_raw(base_url: str, token: str, runner_id: str, session: str) -> RawStream:
    url = urlsplit(base_url)
    reader, writer = await asyncio.open_connection(url.hostname, url.port)
    writer.write(
        f"GET /v1/runners/{runner_id}/wakes?session={session} HTTP/1.1\r\n"
        f"Host: {url.netloc}\r\nAuthorization: Bearer {token}\r\n"
        "Accept: text/event-stream\r\n\r\n".encode()
    )
    status = await reader.readline()
    assert b" 200 " in status, status
    async with asyncio.timeout(10):
        while b"connected session=" not in await reader.readline():
            pass
    stream = RawStream(reader, writer, session)
    stream.task = asyncio.create_task(stream.pump())
    return stream


def named(settings: Settings, name: str, **changes: Any) -> Settings:
    """Settings whose Redis connections carry ``name`` (CLIENT LIST tells them apart)."""
    url = changes.pop("redis_url", settings.redis_url)
    return settings.with_(redis_url=f"{url}?client_name={name}", **changes)


async def connections_named(redis: Redis, name: str) -> int:
    return sum(1 for client in await redis.client_list() if client.get("name") == name)


@contextlib.asynccontextmanager
async def fleet(server: Server, token: str, count: int) -> AsyncIterator[list[RawStream]]:
    runners = []
    alice = {"Authorization": f"Bearer {token}"}
    for _ in range(count):
        runners.append(await register_runner(server.http, alice))
    streams: list[RawStream] = []
    try:
        for start in range(0, count, 50):
            streams += await asyncio.gather(
                *(
                    open_raw(str(server.http.base_url), token, runner, f"s-{runner}")
                    for runner in runners[start : start + 50]
                )
            )
        yield streams
    finally:
        for stream in streams:
            stream.close()


@pytest.mark.timeout(120)
async def test_many_streams_share_a_bounded_set_of_redis_connections(
    settings: Settings, redis: Redis
) -> None:
    name = f"pwtest-{secrets.token_hex(4)}"
    limit = 6
    tuned = named(
        settings, name, redis_max_connections=limit, max_sse_per_principal=1_000, sse_block_ms=500
    )
    async with serve(tuned) as server:
        token = (await server.headers(ALICE))["Authorization"][7:]
        async with fleet(server, token, 200) as streams:
            reader = server.services.wake_reader
            assert reader.sessions == 200
            await asyncio.wait_for(reader.subscribed.wait(), 5)
            assert 1 <= await connections_named(redis, name) <= limit

            # a wake reaches its runner's session, and nobody else's
            target = streams[137]
            runner = target.session[2:]
            entity = await create_entity(server.http, {"Authorization": f"Bearer {token}"}, runner)
            started = time.monotonic()
            sent = await send(server.http, {"Authorization": f"Bearer {token}"}, entity, "a")
            _entry_id, wake = await asyncio.wait_for(target.wakes.get(), 5)
            assert time.monotonic() - started < 1
            assert wake["wake_id"] == sent["wake"]["id"]
            assert all(s.wakes.empty() for s in streams)

            # a wake for every runner at once: all delivered, still within the bound
            for stream in streams:
                key = stream_key(tuned, stream.session[2:])
                fields = {"v": "1", "wake_id": "wk_" + "0" * 28, "entity": "/t/x", "epoch": "1"}
                await redis.xadd(key, fields)
                await redis.publish(f"{tuned.redis_key_prefix}:wake-notify", stream.session[2:])
            for stream in streams:
                _entry_id, wake = await asyncio.wait_for(stream.wakes.get(), 10)
                assert wake["entity"] == "/t/x"
            assert await connections_named(redis, name) <= limit
            consumers = await redis.xinfo_consumers(stream_key(tuned, runner), GROUP)
            assert {c["name"]: c["pending"] for c in consumers} == {target.session: 2}


async def test_a_lost_notification_is_delivered_by_the_poll(
    api: Any, http: Any, alice: dict[str, str], world: Any, redis: Redis, settings: Settings
) -> None:
    reader = api.services.wake_reader
    key = stream_key(settings, world.runner_id)
    fields = {"v": "1", "wake_id": "wk_" + "1" * 28, "entity": "/t/lost", "epoch": "1"}

    async def add_without_notifying() -> None:
        await wait_for(lambda: _true(bool(reader.sessions_of(world.runner_id))))
        await asyncio.sleep(0.05)
        polled = reader.stats.polled
        await redis.xadd(key, fields)  # XADD only: no PUBLISH
        await wait_for(lambda: _true(reader.stats.polled > polled), timeout=2)

    adding = asyncio.create_task(add_without_notifying())
    wake = await read_wake(http, alice, world.runner_id, "lonely", timeout=5)
    await adding
    assert wake.data["entity"] == "/t/lost"


async def test_pending_entries_come_first_on_reconnect_then_new_ones(
    http: Any, alice: dict[str, str], world: Any
) -> None:
    first = await send(http, alice, world.entity, "a")
    seen = await read_wake(http, alice, world.runner_id, "again")
    assert seen.data["wake_id"] == first["wake"]["id"]
    replayed = await read_wake(http, alice, world.runner_id, "again")
    assert replayed.id == seen.id
    await claim_ok(http, alice, world.runner_id, seen.data["wake_id"], seen.id)
    other = await create_entity(http, alice, world.runner_id)
    second = await send(http, alice, other, "b")
    fresh = await read_wake(http, alice, world.runner_id, "again")
    assert fresh.data["wake_id"] == second["wake"]["id"]


@pytest.mark.timeout(90)
async def test_open_streams_survive_a_redis_restart(
    settings: Settings, private_redis: RedisServer, tmp_path: Path
) -> None:
    name = f"pwtest-{secrets.token_hex(4)}"
    tuned = named(settings, name, redis_url=private_redis.url, redis_max_connections=4)
    async with serve(tuned) as server:
        headers = await server.headers(ALICE)
        token = headers["Authorization"][7:]
        runner = await register_runner(server.http, headers)
        entity = await create_entity(server.http, headers, runner)
        stream = await open_raw(str(server.http.base_url), token, runner, "survivor")
        try:
            reader = server.services.wake_reader
            await asyncio.wait_for(reader.subscribed.wait(), 5)
            before = reader.stats.subscriptions

            private_redis.stop()
            await wait_for(lambda: _true(not reader.subscribed.is_set()), timeout=10)
            private_redis.start()  # empty: the stream, its group and the slots are gone
            await wait_for(lambda: _true(reader.stats.subscriptions > before), timeout=15)

            sent = await send(server.http, headers, entity, "after the restart")
            delivery = await server.services.store.get_wake(sent["wake"]["id"])
            assert delivery is not None
            _entry_id, wake = await asyncio.wait_for(stream.wakes.get(), 10)
            assert wake["wake_id"] == sent["wake"]["id"]
            restarted = Redis.from_url(private_redis.url, decode_responses=True)
            try:
                groups = await restarted.xinfo_groups(stream_key(tuned, runner))
                assert [g["name"] for g in groups] == [GROUP]
                assert 1 <= await connections_named(restarted, name) <= 4
            finally:
                await restarted.aclose()
        finally:
            stream.close()


async def _true(value: bool) -> bool:
    return value


async def test_a_client_going_away_ends_its_session_at_once(
    api: Any, http: Any, alice: dict[str, str], world: Any, redis: Redis, settings: Settings
) -> None:
    """The server notices a closed socket without writing to it: the session leaves the reader
    and frees its slot at once, so the same session reconnecting gets every new wake (a stale
    twin would take its turn at them and leave them pending for nobody)."""
    reader = api.services.wake_reader
    token = alice["Authorization"][7:]
    base = str(http.base_url)
    before = reader.sessions
    first = await open_raw(base, token, world.runner_id, "phoenix")
    assert len(reader.sessions_of(world.runner_id)) == 1
    first.close()
    await wait_for(lambda: _true(not reader.sessions_of(world.runner_id)), timeout=2)
    assert reader.sessions == before
    again = await open_raw(base, token, world.runner_id, "phoenix")
    try:
        for n in range(5):
            entity = await create_entity(http, alice, world.runner_id)
            sent = await send(http, alice, entity, f"m{n}")
            _entry_id, wake = await asyncio.wait_for(again.wakes.get(), 5)
            assert wake["wake_id"] == sent["wake"]["id"]
        consumers = await redis.xinfo_consumers(stream_key(settings, world.runner_id), GROUP)
        assert {c["name"]: c["pending"] for c in consumers} == {"phoenix": 5}
    finally:
        again.close()


async def test_wake_events_use_lf_line_endings(
    http: Any, alice: dict[str, str], world: Any
) -> None:
    """LF only: a shell pipeline cutting the ``id:`` line gets the entry id, no trailing CR."""
    sent = await send(http, alice, world.entity, "a")
    url = urlsplit(str(http.base_url))
    reader, writer = await asyncio.open_connection(url.hostname, url.port)
    try:
        writer.write(
            f"GET /v1/runners/{world.runner_id}/wakes?session=lf HTTP/1.1\r\n"
            f"Host: {url.netloc}\r\nAuthorization: {alice['Authorization']}\r\n\r\n".encode()
        )
        async with asyncio.timeout(5):
            head = await reader.readuntil(b"\r\n\r\n")  # HTTP/1.1 itself is CRLF
            events = b""
            while b"event: wake" not in events or not events.endswith(b"\n\n"):
                size = int(await reader.readuntil(b"\r\n"), 16)  # chunked framing
                events += await reader.readexactly(size)
                await reader.readexactly(2)
    finally:
        writer.close()
    assert b"content-type: text/event-stream" in head.lower()
    text = events.decode()
    assert "\r" not in text
    assert text.startswith(": connected session=lf\nretry: 1000\n\n")
    assert f'"wake_id":"{sent["wake"]["id"]}"' in text
    assert "\nid: " in text
    assert "\nevent: wake\ndata: {" in text


async def test_an_open_stream_keeps_its_token_last_used(
    api: Any, http: Any, alice: dict[str, str], world: Any, db: Any
) -> None:
    """The batched re-check of open streams counts as a use of their tokens: ``last_used_at``
    moves (debounced to once a minute, as for requests), so a runner that only listens does not
    look like a forgotten token."""
    token = alice["Authorization"][7:]
    stream = await open_raw(str(http.base_url), token, world.runner_id, "listener")
    try:
        digest = hash_token(token)
        query = "SELECT last_used_at > now() - interval '1 minute' FROM principals_tokens"
        await db.execute(
            "UPDATE principals_tokens SET last_used_at = now() - interval '1 hour' "
            "WHERE token_hash = $1",
            digest,
        )
        assert not await db.fetchval(f"{query} WHERE token_hash = $1", digest)
        api.services.wake_reader.check_soon()
        await wait_for(lambda: db.fetchval(f"{query} WHERE token_hash = $1", digest), timeout=5)
    finally:
        stream.close()
