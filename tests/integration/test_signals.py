"""Entity signals: pause/resume, stop, kill, and who may send them."""

from __future__ import annotations

from .helpers import (
    append_event,
    assert_problem,
    claim,
    claim_ok,
    done,
    heartbeat,
    read_wake,
    send,
    signal,
    xlen,
)


async def _outstanding(db) -> str | None:
    value = await db.fetchval("SELECT outstanding_wake_id FROM dispatch_state")
    return None if value is None else str(value)


async def test_paused_entity_holds_sends_until_resume(http, alice, world, db, redis, settings):
    view = await signal(http, alice, world.entity, "pause")
    assert view["status"] == "paused"

    for payload in ("a", "b"):
        sent = await send(http, alice, world.entity, payload)
        assert sent["wake"]["status"] == "held"
        assert sent["wake"]["id"] is None
    assert await db.fetchval("SELECT count(*) FROM wakes") == 0
    assert await _outstanding(db) is None
    assert await xlen(redis, settings, world.runner_id) == 0

    view = await signal(http, alice, world.entity, "resume")
    assert view["status"] == "idle"
    assert view["dispatch"]["outstanding_wake_id"] is not None

    wake = await read_wake(http, alice, world.runner_id)
    assert wake.data["wake_id"] == view["dispatch"]["outstanding_wake_id"]
    assert wake.data["reason"] == "resume"
    assert wake.data["epoch"] == 1
    note = await claim_ok(http, alice, world.runner_id, wake.data["wake_id"], wake.id)
    assert [m["payload"] for m in note["messages"]] == ["a", "b"]


async def test_pause_supersedes_the_outstanding_wake(http, alice, world, db):
    sent = await send(http, alice, world.entity, "a")
    await signal(http, alice, world.entity, "pause")
    row = await db.fetchrow(
        "SELECT delivery_status, claim_status FROM wakes WHERE id = $1", sent["wake"]["id"]
    )
    assert dict(row) == {"delivery_status": "superseded", "claim_status": "expired"}
    # the stale wake of a paused entity answers "done": nothing to run now
    resp = await claim(http, alice, world.runner_id, sent["wake"]["id"])
    assert resp.status_code == 200, resp.text
    assert resp.json() == {"done": True, "reason": "paused"}
    assert await db.fetchval("SELECT count(*) FROM claims") == 0

    view = await signal(http, alice, world.entity, "resume")
    new_wake = view["dispatch"]["outstanding_wake_id"]
    assert new_wake not in (None, sent["wake"]["id"])
    note = await claim_ok(http, alice, world.runner_id, new_wake)
    assert note["epoch"] == 2


async def test_stop_without_claim_stops_and_refuses_sends(http, alice, world, db):
    sent = await send(http, alice, world.entity, "a")
    view = await signal(http, alice, world.entity, "stop")
    assert view["status"] == "stopped"
    assert view["dispatch"]["outstanding_wake_id"] is None
    assert (
        await db.fetchval("SELECT delivery_status FROM wakes WHERE id = $1", sent["wake"]["id"])
        == "superseded"
    )

    resp = await http.post(f"{world.entity.path}/messages", json={"payload": "b"}, headers=alice)
    body = assert_problem(resp, 409, "ENTITY_NOT_RUNNABLE")
    assert "stopped" in body["detail"]
    assert await db.fetchval("SELECT tail_offset FROM dispatch_state") == 1

    # a stopped entity accepts only kill
    resp = await http.post(f"{world.entity.path}/signal", json={"signal": "resume"}, headers=alice)
    assert_problem(resp, 409, "ENTITY_NOT_RUNNABLE")
    assert (await signal(http, alice, world.entity, "kill"))["status"] == "killed"


async def test_kill_during_claim_fences_the_holder(http, alice, world, db):
    await send(http, alice, world.entity, "a")
    note = await claim_ok(http, alice, world.runner_id, await _outstanding(db))

    view = await signal(http, alice, world.entity, "kill")
    assert view["status"] == "killed"
    assert view["dispatch"]["active_claim"] is None

    assert_problem(await done(http, note, 1), 409, "FENCED")
    assert_problem(await heartbeat(http, note), 409, "FENCED")
    assert_problem(
        await append_event(http, world.entity, note["claim_token"], "late"), 409, "FENCED"
    )
    assert await db.fetchval("SELECT status FROM entities") == "killed"
    assert await db.fetchval("SELECT acked_offset FROM dispatch_state") == 0
    assert await db.fetchval("SELECT status FROM claims") == "failed"
    assert await db.fetchval("SELECT count(*) FROM entity_events") == 0
    resp = await http.post(f"{world.entity.path}/messages", json={"payload": "b"}, headers=alice)
    assert_problem(resp, 409, "ENTITY_NOT_RUNNABLE")


async def test_stop_during_claim_lets_the_holder_finish(http, alice, world, db, redis, settings):
    await send(http, alice, world.entity, "a")
    note = await claim_ok(http, alice, world.runner_id, await _outstanding(db))

    view = await signal(http, alice, world.entity, "stop")
    assert view["status"] == "stopping"
    assert view["dispatch"]["active_claim"]["claim_id"] == note["claim_id"]

    # the holder can still work while stopping
    resp = await heartbeat(http, note)
    assert resp.status_code == 200, resp.text
    assert resp.json()["entity_status"] == "stopping"
    # new sends are still accepted while stopping (only stopped/killed refuse them)
    sent = await send(http, alice, world.entity, "b")
    assert sent["wake"]["status"] == "coalesced"

    resp = await done(http, note, 1)
    assert resp.status_code == 200, resp.text
    assert resp.json() == {"ok": True, "next_wake": False}
    assert await db.fetchval("SELECT status FROM entities") == "stopped"
    assert await _outstanding(db) is None
    assert await db.fetchval("SELECT count(*) FROM wakes") == 1
    assert await xlen(redis, settings, world.runner_id) == 1
    # a retried done answers exactly what the first one did
    again = await done(http, note, 1)
    assert again.status_code == 200, again.text
    assert again.json() == {"ok": True, "next_wake": False}


async def test_paused_during_claim_done_answers_consistently(http, alice, world, db):
    await send(http, alice, world.entity, "a")
    note = await claim_ok(http, alice, world.runner_id, await _outstanding(db))
    await signal(http, alice, world.entity, "pause")
    await send(http, alice, world.entity, "b")

    first = await done(http, note, 1)
    assert first.json() == {"ok": True, "next_wake": False}
    assert await db.fetchval("SELECT status FROM entities") == "paused"
    assert await _outstanding(db) is None
    again = await done(http, note, 1)
    assert again.json() == first.json()

    view = await signal(http, alice, world.entity, "resume")
    assert view["dispatch"]["outstanding_wake_id"] is not None
    follow = await claim_ok(http, alice, world.runner_id, view["dispatch"]["outstanding_wake_id"])
    assert [m["payload"] for m in follow["messages"]] == ["b"]


async def test_only_the_creator_may_signal(http, alice, bob, world, db):
    for name in ("pause", "resume", "stop", "kill"):
        resp = await http.post(f"{world.entity.path}/signal", json={"signal": name}, headers=bob)
        body = assert_problem(resp, 403, "FORBIDDEN")
        assert "creator" in body["detail"]
    assert await db.fetchval("SELECT status FROM entities") == "idle"


async def test_signal_unknown_entity_is_not_found(http, alice):
    resp = await http.post(
        "/v1/entities/nope/nothing/signal", json={"signal": "pause"}, headers=alice
    )
    assert_problem(resp, 404, "NOT_FOUND")
