"""``POST /v1/messages``: a batch for any entities, one result per item, one round trip."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import asyncpg
from redis.asyncio import Redis

from pullwake.config import Settings

from .helpers import (
    ALICE,
    BOB,
    assert_problem,
    create_entity,
    register_runner,
    send,
    signal,
    xlen,
)
from .servers import serve
from .test_round_trips import Counter


async def _batch(http: Any, headers: dict[str, str], items: list[dict[str, Any]]) -> Any:
    resp = await http.post("/v1/messages", json={"messages": items}, headers=headers)
    assert resp.status_code == 200, resp.text
    return resp.json()["results"]


async def test_every_item_gets_its_own_answer(
    api, db: asyncpg.Connection, redis: Redis, settings: Settings
) -> None:
    http = api.http
    alice, bob = await api.as_(ALICE), await api.as_(BOB)
    runner = await register_runner(http, alice)
    await api.services.streams.ensure_group(runner)
    one, two, stopped = [await create_entity(http, alice, runner) for _ in range(3)]
    bobs = await create_entity(http, bob, await register_runner(http, bob))
    await signal(http, alice, stopped, "stop")
    big = {"x": "y" * (settings.max_payload_bytes + 10)}

    results = await _batch(
        http,
        alice,
        [
            {"entity": one.url, "payload": 1, "idempotency_key": "k"},
            {"entity": two.url, "payload": 2},
            {"entity": one.url, "payload": 3},
            {"entity": one.url, "payload": 1, "idempotency_key": "k"},
            {"entity": one.url, "payload": "other", "idempotency_key": "k"},
            {"entity": bobs.url, "payload": "not mine"},
            {"entity": "/nothing/here", "payload": 4},
            {"entity": stopped.url, "payload": 5},
            {"entity": two.url, "payload": big},
        ],
    )

    first = results[0]
    assert (first["offset"], first["wake"]["status"]) == (1, "queued")
    assert (results[1]["offset"], results[1]["wake"]["status"]) == (1, "queued")
    assert results[2]["offset"] == 2
    assert results[2]["wake"] == {
        "id": first["wake"]["id"],
        "status": "coalesced",
        "reason": "outstanding-wake",
    }
    assert results[3]["duplicate"] is True
    assert results[3]["offset"] == 1
    assert [r.get("problem", {}).get("code") for r in results[4:]] == [
        "IDEMPOTENCY_MISMATCH",
        "FORBIDDEN",
        "NOT_FOUND",
        "ENTITY_NOT_RUNNABLE",
        "PAYLOAD_TOO_LARGE",
    ]
    assert [r["entity"] for r in results] == [
        one.url, two.url, one.url, one.url, one.url, bobs.url, "/nothing/here", stopped.url,
        two.url,
    ]  # fmt: skip
    rows = await db.fetch('SELECT entity_url, "offset", payload FROM inbox_messages ORDER BY 1, 2')
    assert [(r["entity_url"], r["offset"]) for r in rows] == sorted(
        [(one.url, 1), (one.url, 2), (two.url, 1)]
    )
    # The wakes went out like a single send's: one entry per new wake on the runner's stream.
    assert await xlen(redis, settings, runner) == 2
    dispatch = await db.fetchrow(
        "SELECT tail_offset, outstanding_wake_id, epoch FROM dispatch_state WHERE entity_url = $1",
        one.url,
    )
    assert dict(dispatch) == {
        "tail_offset": 2,
        "outstanding_wake_id": first["wake"]["id"],
        "epoch": 1,
    }
    # And a single send afterwards carries on from the batch.
    assert (await send(http, alice, one, "after"))["offset"] == 3


async def test_a_batch_is_one_round_trip(api, db: asyncpg.Connection) -> None:
    http = api.http
    alice = await api.as_(ALICE)
    runner = await register_runner(http, alice)
    entities = [await create_entity(http, alice, runner) for _ in range(5)]
    items = [{"entity": e.url, "payload": n} for n in range(20) for e in entities]
    await _batch(http, alice, items[:5])  # warm the statement caches
    await api.services.publisher.flush()  # the warm-up's deliveries, recorded off the path
    count = Counter()
    api.services.store.observer = count
    try:
        await count.measure("batch", lambda: _batch(http, alice, items))
    finally:
        api.services.store.observer = None
    writes = [q for q in count.statements if "pullwake_send_batch" in q]
    assert len(writes) == 1
    # Nothing else: the API token comes from the auth cache, and every entity already had its
    # outstanding wake from the warm-up (no new wake, no delivery to record).
    assert count.counts["batch"] == 1, count.statements
    assert await db.fetchval("SELECT count(*) FROM inbox_messages") == 105


async def test_concurrent_batches_over_the_same_entities_lose_nothing(api, db: asyncpg.Connection):
    """Entities are locked in one order: overlapping batches never deadlock, offsets stay
    gap-free and each batch keeps its order per entity."""
    http = api.http
    alice = await api.as_(ALICE)
    runner = await register_runner(http, alice)
    entities = [await create_entity(http, alice, runner) for _ in range(4)]

    async def one_batch(n: int) -> Any:
        order = entities if n % 2 else list(reversed(entities))
        return await _batch(
            http, alice, [{"entity": e.url, "payload": [n, k]} for k in range(3) for e in order]
        )

    await asyncio.gather(*(one_batch(n) for n in range(8)))
    for entity in entities:
        rows = await db.fetch(
            'SELECT "offset", payload FROM inbox_messages WHERE entity_url = $1 ORDER BY 1',
            entity.url,
        )
        assert [r["offset"] for r in rows] == list(range(1, 25))
        seen: dict[int, list[int]] = {}
        for r in rows:
            batch, k = json.loads(r["payload"])
            seen.setdefault(batch, []).append(k)
        assert all(ks == [0, 1, 2] for ks in seen.values()), seen


async def test_batch_limits(settings: Settings) -> None:
    async with serve(settings.with_(max_batch=6, send_rate_per_s=1, send_burst=4)) as server:
        alice = await server.headers(ALICE)
        entity = await create_entity(server.http, alice, await register_runner(server.http, alice))
        items = [{"entity": entity.url, "payload": n} for n in range(7)]
        resp = await server.http.post("/v1/messages", json={"messages": items}, headers=alice)
        problem = assert_problem(resp, 400, "INVALID_REQUEST")
        assert "PULLWAKE_MAX_BATCH" in problem["detail"]
        # More than the bucket can ever hold: a 400 that says so, not a 429 forever.
        resp = await server.http.post("/v1/messages", json={"messages": items[:5]}, headers=alice)
        problem = assert_problem(resp, 400, "INVALID_REQUEST")
        assert "PULLWAKE_SEND_BURST" in problem["detail"]
        resp = await server.http.post("/v1/messages", json={"messages": []}, headers=alice)
        assert_problem(resp, 400, "INVALID_REQUEST")
        await _batch(server.http, alice, items[:3])  # 3 of the bucket's 4
        resp = await server.http.post("/v1/messages", json={"messages": items[:2]}, headers=alice)
        assert_problem(resp, 429, "RATE_LIMITED")  # the send rate counts every item
        bad = [{"entity": entity.url, "payload": {"a": "\u0000"}}]
        resp = await server.http.post("/v1/messages", json={"messages": bad}, headers=alice)
        problem = assert_problem(resp, 400, "INVALID_REQUEST")
        assert "messages[0].payload.a" in problem["detail"]
