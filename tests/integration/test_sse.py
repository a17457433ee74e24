"""The runner wake stream (Server-Sent Events over the runner's consumer group)."""

from __future__ import annotations

import time

from .helpers import (
    GROUP,
    assert_problem,
    claim_ok,
    create_entity,
    read_sse,
    read_wake,
    read_wakes,
    send,
    stream_key,
    uid,
    wakes_of,
    xpending_count,
)


async def test_wake_event_shape(http, alice, world, redis, settings):
    sent = await send(http, alice, world.entity, "a")
    wake = await read_wake(http, alice, world.runner_id)

    assert wake.event == "wake"
    entries = await redis.xrange(stream_key(settings, world.runner_id))
    assert len(entries) == 1
    entry_id, fields = entries[0]
    assert wake.id == entry_id
    assert fields["v"] == "1"
    assert fields["wake_id"] == sent["wake"]["id"]
    assert set(wake.data) == {"wake_id", "entity", "epoch", "reason", "created_at"}
    assert wake.data["wake_id"] == sent["wake"]["id"]
    assert wake.data["entity"] == world.entity.url
    assert wake.data["epoch"] == 1
    assert isinstance(wake.data["epoch"], int)
    assert wake.data["reason"] == "message"
    assert wake.data["created_at"].endswith("Z")


async def test_reconnect_resends_own_pending_entries_only(http, alice, world, redis, settings):
    first = await send(http, alice, world.entity, "a")
    seen = await read_wake(http, alice, world.runner_id, "sess-1")
    assert seen.data["wake_id"] == first["wake"]["id"]
    assert await xpending_count(redis, settings, world.runner_id) == 1

    # the same session reconnects: its unclaimed entry comes first, same entry id
    again = await read_wake(http, alice, world.runner_id, "sess-1")
    assert (again.id, again.data) == (seen.id, seen.data)
    consumers = await redis.xinfo_consumers(stream_key(settings, world.runner_id), GROUP)
    assert {c["name"]: c["pending"] for c in consumers} == {"sess-1": 1}

    # another session does not get it: the first wake it sees is a brand-new one
    other_entity = await create_entity(http, alice, world.runner_id)
    second = await send(http, alice, other_entity, "b")
    other = await read_wake(http, alice, world.runner_id, "sess-2")
    assert other.data["wake_id"] == second["wake"]["id"]
    assert other.id != seen.id

    # once claimed, entries are acked: sess-1 reconnecting gets only what is new
    await claim_ok(http, alice, world.runner_id, seen.data["wake_id"], seen.id)
    await claim_ok(http, alice, world.runner_id, other.data["wake_id"], other.id)
    assert await xpending_count(redis, settings, world.runner_id) == 0
    third_entity = await create_entity(http, alice, world.runner_id)
    third = await send(http, alice, third_entity, "c")
    fresh = await read_wake(http, alice, world.runner_id, "sess-1")
    assert fresh.data["wake_id"] == third["wake"]["id"]


async def test_connected_and_keepalive_comments(http, alice, world, settings):
    assert settings.sse_keepalive_ms == 1_000
    started = time.monotonic()
    events = await read_sse(
        http,
        alice,
        world.runner_id,
        uid("s"),
        until=lambda evs: any("keep-alive" in e.comments for e in evs),
        timeout=4,
    )
    elapsed = time.monotonic() - started
    comments = [c for e in events for c in e.comments]
    assert comments[0].startswith("connected session=")
    assert "keep-alive" in comments
    assert 0.5 < elapsed < 3.5
    assert not wakes_of(events)


async def test_session_defaults_to_a_fresh_consumer(http, alice, world):
    events = await read_sse(
        http,
        alice,
        world.runner_id,
        None,
        until=lambda evs: any(c.startswith("connected") for e in evs for c in e.comments),
    )
    comment = events[0].comments[0]
    assert comment.startswith("connected session=s-")


async def test_wake_stream_errors(http, alice, bob, world):
    resp = await http.get(f"/v1/runners/{uid('none')}/wakes", headers=alice)
    assert_problem(resp, 404, "NOT_FOUND")
    resp = await http.get(f"/v1/runners/{world.runner_id}/wakes", headers=bob)
    assert_problem(resp, 403, "FORBIDDEN")
    resp = await http.get(
        f"/v1/runners/{world.runner_id}/wakes", params={"session": "bad session"}, headers=alice
    )
    body = assert_problem(resp, 400, "INVALID_REQUEST")
    assert "session" in body["detail"]
    resp = await http.get(f"/v1/runners/{world.runner_id}/wakes")
    assert_problem(resp, 401, "UNAUTHORIZED")


async def test_reconnect_resends_more_than_one_page_of_own_pending(
    http, alice, world, redis, settings
):
    """Pending entries are re-sent in pages of 100: a session holding 250 gets all 250."""
    key = stream_key(settings, world.runner_id)
    await redis.xgroup_create(key, GROUP, id="0", mkstream=True)
    for n in range(250):
        await redis.xadd(
            key,
            {
                "v": "1",
                "wake_id": f"wk_{n:028x}",
                "entity": "/t/x",
                "epoch": str(n + 1),
                "reason": "message",
                "created_at": "2026-01-01T00:00:00Z",
            },
        )
    # the session reads everything (as if it crashed before claiming any of it)
    delivered = await redis.xreadgroup(GROUP, "sess-big", {key: ">"}, count=1000)
    assert len(delivered[0][1]) == 250

    wakes = await read_wakes(http, alice, world.runner_id, "sess-big", count=250, timeout=10)

    assert [w.data["epoch"] for w in wakes] == list(range(1, 251))
    assert len({w.id for w in wakes}) == 250
