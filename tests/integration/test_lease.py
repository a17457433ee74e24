"""Claim leases: heartbeats extend them; a passed lease fences the holder and re-wakes."""

from __future__ import annotations

import asyncio
from datetime import datetime

import pytest

from pullwake.config import Settings

from .helpers import (
    append_event,
    assert_problem,
    claim,
    claim_ok,
    done,
    heartbeat,
    read_wake,
    send,
    wait_for,
)

LEASE_MS = 600


@pytest.fixture
def server_settings(settings: Settings) -> Settings:
    return settings.with_(claim_lease_ms=LEASE_MS)


def _ts(value: str) -> datetime:
    return datetime.fromisoformat(value.replace("Z", "+00:00"))


async def _lease_passed(db) -> None:
    async def passed() -> bool:
        return bool(
            await db.fetchval("SELECT active_lease_expires_at <= now() FROM dispatch_state")
        )

    await wait_for(passed, timeout=LEASE_MS / 1000 + 3)


async def _claimed(http, alice, world, session: str = "lease") -> dict:
    await send(http, alice, world.entity, "work")
    wake = await read_wake(http, alice, world.runner_id, session)
    return await claim_ok(http, alice, world.runner_id, wake.data["wake_id"], wake.id)


async def test_heartbeat_extends_the_lease(http, alice, world, db):
    note = await _claimed(http, alice, world)
    assert note["lease_ms"] == LEASE_MS
    lease = _ts(note["lease_expires_at"])

    await asyncio.sleep(LEASE_MS / 1000 * 0.6)
    resp = await heartbeat(http, note)
    assert resp.status_code == 200, resp.text
    body = resp.json()
    assert body["ok"] is True
    assert body["entity_status"] == "running"
    extended = _ts(body["lease_expires_at"])
    assert extended > lease
    row = await db.fetchrow(
        "SELECT lease_expires_at, last_heartbeat_at FROM claims WHERE id = $1", note["claim_id"]
    )
    assert row["lease_expires_at"] == extended
    assert row["last_heartbeat_at"] is not None
    assert await db.fetchval("SELECT active_lease_expires_at FROM dispatch_state") == extended

    # past the first lease, but inside the extended one: the claim is still held
    await asyncio.sleep(LEASE_MS / 1000 * 0.6)
    assert await db.fetchval("SELECT now() > $1::timestamptz", lease)
    resp = await heartbeat(http, note)
    assert resp.status_code == 200, resp.text
    assert (await done(http, note, 1)).json() == {"ok": True, "next_wake": False}


async def test_heartbeat_after_lease_is_expired_and_rewakes(http, alice, world, db):
    note = await _claimed(http, alice, world)
    await _lease_passed(db)

    body = assert_problem(await heartbeat(http, note), 409, "LEASE_EXPIRED")
    assert note["claim_id"] in body["detail"]
    row = await db.fetchrow("SELECT status, end_reason FROM claims WHERE id = $1", note["claim_id"])
    assert dict(row) == {"status": "expired", "end_reason": "lease_expired"}
    state = await db.fetchrow(
        "SELECT acked_offset, active_claim_id, outstanding_wake_id, epoch FROM dispatch_state"
    )
    assert state["acked_offset"] == 0
    assert state["active_claim_id"] is None
    assert state["epoch"] == note["epoch"] + 1
    assert await db.fetchval("SELECT status FROM entities") == "idle"

    wake = await read_wake(http, alice, world.runner_id, "lease")
    assert wake.data["wake_id"] == state["outstanding_wake_id"]
    assert wake.data["epoch"] == note["epoch"] + 1
    assert wake.data["reason"] == "lease_expired"

    # the old holder stays fenced out
    assert_problem(await done(http, note, 1), 409, "LEASE_EXPIRED")
    assert_problem(await heartbeat(http, note), 409, "LEASE_EXPIRED")
    resp = await append_event(http, world.entity, note["claim_token"], "late")
    assert_problem(resp, 409, "LEASE_EXPIRED")
    assert await db.fetchval("SELECT count(*) FROM entity_events") == 0

    second = await claim_ok(http, alice, world.runner_id, wake.data["wake_id"], wake.id)
    assert [m["payload"] for m in second["messages"]] == ["work"]
    assert (await done(http, second, 1)).json() == {"ok": True, "next_wake": False}
    assert await db.fetchval("SELECT acked_offset FROM dispatch_state") == 1


async def test_done_after_lease_is_expired_and_rewakes(http, alice, world, db):
    note = await _claimed(http, alice, world)
    await _lease_passed(db)

    assert_problem(await done(http, note, 1), 409, "LEASE_EXPIRED")
    assert await db.fetchval("SELECT acked_offset FROM dispatch_state") == 0
    assert await db.fetchval("SELECT status FROM claims") == "expired"
    wake = await read_wake(http, alice, world.runner_id, "lease")
    assert wake.data["epoch"] == note["epoch"] + 1
    # a retry of the same done is still refused
    assert_problem(await done(http, note, 1), 409, "LEASE_EXPIRED")


async def test_send_after_lease_hands_the_work_on(http, alice, world, db):
    note = await _claimed(http, alice, world)
    await _lease_passed(db)

    sent = await send(http, alice, world.entity, "more")
    assert sent["wake"]["status"] == "queued"
    assert sent["wake"]["id"] != note["claim_id"]
    assert await db.fetchval("SELECT status FROM claims") == "expired"
    assert_problem(await done(http, note, 2), 409, "LEASE_EXPIRED")
    second = await claim_ok(http, alice, world.runner_id, sent["wake"]["id"])
    assert second["epoch"] == note["epoch"] + 1
    assert [m["payload"] for m in second["messages"]] == ["work", "more"]


async def test_claim_after_lease_expires_the_dead_holder(http, alice, world, db):
    note = await _claimed(http, alice, world)
    await _lease_passed(db)

    # a late claim of the old wake finds the lease passed: 204, and the work is re-woken
    resp = await claim(http, alice, world.runner_id, note["wake_id"])
    assert resp.status_code == 204, resp.text
    assert await db.fetchval("SELECT status FROM claims") == "expired"
    new_wake = await db.fetchval("SELECT outstanding_wake_id FROM dispatch_state")
    assert new_wake is not None
    second = await claim_ok(http, alice, world.runner_id, new_wake)
    assert second["epoch"] == note["epoch"] + 1
