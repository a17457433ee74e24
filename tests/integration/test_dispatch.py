"""The core wake lifecycle: coalescing, claims, fencing, done/release and the events log."""

from __future__ import annotations

import asyncio

from .helpers import (
    append_event,
    assert_problem,
    claim,
    claim_ok,
    done,
    read_wake,
    release,
    send,
    xlen,
    xpending_count,
)


async def _wake_count(db, url: str) -> int:
    return int(await db.fetchval("SELECT count(*) FROM wakes WHERE entity_url = $1", url))


async def test_three_sends_while_outstanding_make_one_wake(http, alice, world, db, redis, settings):
    results = [await send(http, alice, world.entity, {"n": i}) for i in range(1, 4)]

    assert [r["offset"] for r in results] == [1, 2, 3]
    first = results[0]["wake"]
    assert first["status"] == "queued"
    for r in results[1:]:
        assert r["wake"]["id"] == first["id"]
        assert r["wake"]["status"] == "coalesced"
        assert r["duplicate"] is False
    assert await _wake_count(db, world.entity.url) == 1
    assert await xlen(redis, settings, world.runner_id) == 1

    wake = await read_wake(http, alice, world.runner_id)
    assert wake.data["wake_id"] == first["id"]
    assert wake.data["epoch"] == 1
    assert wake.data["entity"] == world.entity.url
    note = await claim_ok(http, alice, world.runner_id, wake.data["wake_id"], wake.id)
    assert [m["offset"] for m in note["messages"]] == [1, 2, 3]
    assert [m["payload"] for m in note["messages"]] == [{"n": 1}, {"n": 2}, {"n": 3}]
    assert note["more_messages"] is False
    assert (note["acked_offset"], note["tail_offset"]) == (0, 3)
    assert note["claim_token"].startswith("pwc_")


async def test_send_during_claim_gives_exactly_one_follow_up(
    http, alice, world, db, redis, settings
):
    await send(http, alice, world.entity, "first")
    first = await read_wake(http, alice, world.runner_id, "sess-a")
    note = await claim_ok(http, alice, world.runner_id, first.data["wake_id"], first.id)

    for payload in ("second", "third"):
        sent = await send(http, alice, world.entity, payload)
        assert sent["wake"] == {
            "id": note["claim_id"],
            "status": "coalesced",
            "reason": "active-claim",
        }
    assert await _wake_count(db, world.entity.url) == 1
    assert await xlen(redis, settings, world.runner_id) == 1

    resp = await done(http, note, 1)
    assert resp.status_code == 200, resp.text
    assert resp.json() == {"ok": True, "next_wake": True}
    assert await _wake_count(db, world.entity.url) == 2

    follow = await read_wake(http, alice, world.runner_id, "sess-a")
    assert follow.data["epoch"] == note["epoch"] + 1
    assert follow.data["reason"] == "follow_up"
    assert follow.data["wake_id"] != note["wake_id"]
    second = await claim_ok(http, alice, world.runner_id, follow.data["wake_id"], follow.id)
    assert [m["payload"] for m in second["messages"]] == ["second", "third"]
    assert second["acked_offset"] == 1
    resp = await done(http, second, 3)
    assert resp.json() == {"ok": True, "next_wake": False}
    assert await _wake_count(db, world.entity.url) == 2
    assert await xpending_count(redis, settings, world.runner_id) == 0


async def test_concurrent_claims_of_one_wake_grant_exactly_one(http, alice, world, db):
    sent = await send(http, alice, world.entity, "x")
    wake_id = sent["wake"]["id"]

    responses = await asyncio.gather(
        *(claim(http, alice, world.runner_id, wake_id) for _ in range(2))
    )

    statuses = sorted(r.status_code for r in responses)
    assert statuses[0] == 200, [r.text for r in responses]
    loser = next(r for r in responses if r.status_code != 200)
    if loser.status_code == 409:
        body = assert_problem(loser, 409, "ALREADY_CLAIMED")
        winner = next(r for r in responses if r.status_code == 200).json()
        assert winner["claim_id"] in body["detail"]
    else:
        assert loser.status_code == 204, loser.text
    rows = await db.fetch("SELECT status FROM claims WHERE entity_url = $1", world.entity.url)
    assert [r["status"] for r in rows] == ["active"]


async def test_many_concurrent_claims_still_grant_exactly_one(http, alice, world, db):
    sent = await send(http, alice, world.entity, "x")
    responses = await asyncio.gather(
        *(claim(http, alice, world.runner_id, sent["wake"]["id"]) for _ in range(8))
    )
    assert sum(r.status_code == 200 for r in responses) == 1
    for r in responses:
        if r.status_code == 409:
            assert_problem(r, 409, "ALREADY_CLAIMED")
        else:
            assert r.status_code in (200, 204), r.text
    count = await db.fetchval("SELECT count(*) FROM claims WHERE entity_url = $1", world.entity.url)
    assert count == 1


async def test_done_with_stale_epoch_is_fenced_and_changes_nothing(http, alice, world, db):
    await send(http, alice, world.entity, "a")
    await send(http, alice, world.entity, "b")
    wake_id = await db.fetchval("SELECT outstanding_wake_id FROM dispatch_state")
    first = await claim_ok(http, alice, world.runner_id, wake_id)
    assert (await done(http, first, 1)).json() == {"ok": True, "next_wake": True}
    wake_id = await db.fetchval("SELECT outstanding_wake_id FROM dispatch_state")
    second = await claim_ok(http, alice, world.runner_id, wake_id)
    assert second["epoch"] == 2

    for stale in (1, 3):
        resp = await done(http, second, 2, epoch=stale)
        body = assert_problem(resp, 409, "FENCED")
        assert str(stale) in body["detail"]

    state = await db.fetchrow(
        "SELECT acked_offset, active_claim_id, active_epoch FROM dispatch_state"
    )
    assert dict(state) == {
        "acked_offset": 1,
        "active_claim_id": second["claim_id"],
        "active_epoch": 2,
    }
    row = await db.fetchrow(
        "SELECT status, acked_offset, released_at FROM claims WHERE id = $1", second["claim_id"]
    )
    assert dict(row) == {"status": "active", "acked_offset": None, "released_at": None}
    status = await db.fetchval("SELECT status FROM entities")
    assert status == "running"
    # the real holder still finishes normally
    assert (await done(http, second, 2)).json() == {"ok": True, "next_wake": False}


async def test_events_are_fenced_by_the_active_claim(http, alice, world, db):
    await send(http, alice, world.entity, "go")
    wake_id = await db.fetchval("SELECT outstanding_wake_id FROM dispatch_state")
    note = await claim_ok(http, alice, world.runner_id, wake_id)
    token = note["claim_token"]

    offsets = []
    for i in range(3):
        resp = await append_event(http, world.entity, token, {"step": i})
        assert resp.status_code == 201, resp.text
        offsets.append(resp.json()["offset"])
    resp = await append_event(http, world.entity, token, {"step": 3}, epoch=note["epoch"])
    assert resp.status_code == 201, resp.text
    offsets.append(resp.json()["offset"])
    assert offsets == [1, 2, 3, 4]

    # the right token with a wrong epoch is fenced
    resp = await append_event(http, world.entity, token, "bad", epoch=note["epoch"] + 1)
    assert_problem(resp, 409, "FENCED")

    assert (await done(http, note, 1)).status_code == 200
    resp = await append_event(http, world.entity, token, "late")
    assert_problem(resp, 409, "FENCED")
    assert await db.fetchval("SELECT count(*) FROM entity_events") == 4

    page = await http.get(f"{world.entity.path}/events", params={"limit": 3}, headers=alice)
    assert page.status_code == 200, page.text
    body = page.json()
    assert [e["offset"] for e in body["events"]] == [1, 2, 3]
    assert [e["payload"] for e in body["events"]] == [{"step": 0}, {"step": 1}, {"step": 2}]
    assert body["more"] is True
    assert body["next_after"] == 3
    assert body["events"][0]["claim_id"] == note["claim_id"]
    assert body["events"][0]["sender"] == f"claim:{note['claim_id']}"
    page = await http.get(
        f"{world.entity.path}/events", params={"after": body["next_after"]}, headers=alice
    )
    body = page.json()
    assert [e["offset"] for e in body["events"]] == [4]
    assert body["more"] is False


async def test_acked_offset_past_tail_or_behind_acked_is_invalid(http, alice, world, db):
    for payload in ("a", "b", "c"):
        await send(http, alice, world.entity, payload)
    wake_id = await db.fetchval("SELECT outstanding_wake_id FROM dispatch_state")
    note = await claim_ok(http, alice, world.runner_id, wake_id)

    body = assert_problem(await done(http, note, 4), 409, "INVALID_OFFSET")
    assert "4" in body["detail"]
    assert "3" in body["detail"]
    state = await db.fetchrow("SELECT acked_offset, active_claim_id FROM dispatch_state")
    assert (state["acked_offset"], state["active_claim_id"]) == (0, note["claim_id"])
    claim_status = await db.fetchval("SELECT status FROM claims WHERE id = $1", note["claim_id"])
    assert claim_status == "active"

    assert (await done(http, note, 2)).json() == {"ok": True, "next_wake": True}
    wake_id = await db.fetchval("SELECT outstanding_wake_id FROM dispatch_state")
    second = await claim_ok(http, alice, world.runner_id, wake_id)
    body = assert_problem(await done(http, second, 1), 409, "INVALID_OFFSET")
    assert "behind" in body["detail"]
    assert await db.fetchval("SELECT acked_offset FROM dispatch_state") == 2
    assert (await done(http, second, 3)).json() == {"ok": True, "next_wake": False}


async def test_idempotent_send_returns_the_first_result(http, alice, world, db):
    first = await send(http, alice, world.entity, {"v": 1}, idempotency_key="key-1")
    again = await send(http, alice, world.entity, {"v": 1}, idempotency_key="key-1")

    assert first["duplicate"] is False
    assert again["duplicate"] is True
    assert again["offset"] == first["offset"] == 1
    assert again["wake"]["id"] == first["wake"]["id"]
    rows = await db.fetch('SELECT "offset", idempotency_key FROM inbox_messages')
    assert [tuple(r) for r in rows] == [(1, "key-1")]
    assert await db.fetchval("SELECT tail_offset FROM dispatch_state") == 1

    other = await send(http, alice, world.entity, {"v": 2}, idempotency_key="key-2")
    assert (other["offset"], other["duplicate"]) == (2, False)


async def test_a_key_reused_for_another_payload_is_refused(http, alice, world, db):
    await send(http, alice, world.entity, {"v": 1, "w": [1, 2]}, idempotency_key="key-1")
    same = await send(http, alice, world.entity, {"w": [1, 2], "v": 1.0}, idempotency_key="key-1")
    assert same["duplicate"] is True  # the same JSON value, however it is spelled

    resp = await http.post(
        f"{world.entity.path}/messages",
        json={"payload": {"v": 2}, "idempotency_key": "key-1"},
        headers=alice,
    )

    problem = assert_problem(resp, 409, "IDEMPOTENCY_MISMATCH")
    assert "key-1" in problem["detail"]
    assert await db.fetchval("SELECT count(*) FROM inbox_messages") == 1


async def test_repeated_done_answers_the_same(http, alice, world, db):
    await send(http, alice, world.entity, "a")
    await send(http, alice, world.entity, "b")
    wake_id = await db.fetchval("SELECT outstanding_wake_id FROM dispatch_state")
    note = await claim_ok(http, alice, world.runner_id, wake_id)

    first = await done(http, note, 1)
    again = await done(http, note, 1)
    assert first.status_code == again.status_code == 200
    assert first.json() == again.json() == {"ok": True, "next_wake": True}
    # the retry created no second follow-up wake
    assert await db.fetchval("SELECT count(*) FROM wakes") == 2
    assert await db.fetchval("SELECT acked_offset FROM dispatch_state") == 1

    # a done with another offset is not a retry: the claim is over
    assert_problem(await done(http, note, 2), 409, "FENCED")


async def test_repeated_done_without_follow_up_answers_the_same(http, alice, world, db):
    await send(http, alice, world.entity, "a")
    wake_id = await db.fetchval("SELECT outstanding_wake_id FROM dispatch_state")
    note = await claim_ok(http, alice, world.runner_id, wake_id)
    answers = [(await done(http, note, 1)).json() for _ in range(3)]
    assert answers == [{"ok": True, "next_wake": False}] * 3
    assert await db.fetchval("SELECT count(*) FROM wakes") == 1


async def test_release_rewakes_without_acking(http, alice, world, db, redis, settings):
    await send(http, alice, world.entity, "job")
    first_wake = await read_wake(http, alice, world.runner_id, "rel")
    note = await claim_ok(http, alice, world.runner_id, first_wake.data["wake_id"], first_wake.id)

    resp = await release(http, note, error="handler crashed")
    assert resp.status_code == 200, resp.text
    assert resp.json() == {"ok": True, "next_wake": True}
    state = await db.fetchrow("SELECT acked_offset, active_claim_id FROM dispatch_state")
    assert (state["acked_offset"], state["active_claim_id"]) == (0, None)
    row = await db.fetchrow(
        "SELECT status, end_reason, last_error FROM claims WHERE id = $1", note["claim_id"]
    )
    assert dict(row) == {
        "status": "released",
        "end_reason": "release",
        "last_error": "handler crashed",
    }
    assert await db.fetchval("SELECT status FROM entities") == "idle"

    again = await read_wake(http, alice, world.runner_id, "rel")
    assert again.data["epoch"] == 2
    assert again.data["reason"] == "released"
    second = await claim_ok(http, alice, world.runner_id, again.data["wake_id"], again.id)
    assert [m["payload"] for m in second["messages"]] == ["job"]
    assert second["acked_offset"] == 0

    # the released claim can no longer finish
    assert_problem(await done(http, note, 1), 409, "FENCED")
    assert_problem(await release(http, note), 409, "FENCED")
    assert_problem(await done(http, second, 1, epoch=1), 409, "FENCED")
    assert (await done(http, second, 1)).json() == {"ok": True, "next_wake": False}
    assert await xpending_count(redis, settings, world.runner_id) == 0
