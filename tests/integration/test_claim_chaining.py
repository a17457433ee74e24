"""``done`` with ``claim_next``: the holder gets the follow-up claim itself, fenced and leased
like any claim, and no wake goes through the runner's stream."""

from __future__ import annotations

import asyncpg
from redis.asyncio import Redis

from pullwake.config import Settings

from .helpers import (
    ALICE,
    assert_problem,
    claim_ok,
    create_entity,
    done,
    heartbeat,
    register_runner,
    send,
    xlen,
)


async def _claimed_with_more_pending(api, db: asyncpg.Connection):
    http = api.http
    alice = await api.as_(ALICE)
    runner = await register_runner(http, alice)
    entity = await create_entity(http, alice, runner)
    await api.services.streams.ensure_group(runner)
    wake_id = (await send(http, alice, entity, "first"))["wake"]["id"]
    note = await claim_ok(http, alice, runner, wake_id)
    await send(http, alice, entity, "second")
    await send(http, alice, entity, "third")
    return http, runner, entity, note


async def test_done_with_claim_next_answers_the_follow_up_claim(
    api, db: asyncpg.Connection, redis: Redis, settings: Settings
):
    http, runner, entity, first = await _claimed_with_more_pending(api, db)
    entries_before = await xlen(redis, settings, runner)

    resp = await done(http, first, 1, claim_next=True)

    assert resp.status_code == 200, resp.text
    body = resp.json()
    assert (body["ok"], body["next_wake"]) == (True, True)
    chained = body["next_claim"]
    assert chained["epoch"] == first["epoch"] + 1
    assert chained["claim_token"] != first["claim_token"]
    assert [m["payload"] for m in chained["messages"]] == ["second", "third"]
    assert chained["acked_offset"] == 1
    assert await xlen(redis, settings, runner) == entries_before  # nothing published
    row = await db.fetchrow(
        "SELECT reason, claim_status FROM wakes WHERE id = $1", chained["wake_id"]
    )
    assert dict(row) == {"reason": "chained", "claim_status": "claimed"}
    dispatch = (await http.get(entity.path, headers=await api.as_(ALICE))).json()["dispatch"]
    assert dispatch["active_claim"]["claim_id"] == chained["claim_id"]
    assert dispatch["active_claim"]["runner_id"] == runner
    assert dispatch["outstanding_wake_id"] is None

    # Fenced and leased like any claim: the old holder is out, the new token works.
    assert_problem(await heartbeat(http, first), 409, "FENCED")
    assert (await heartbeat(http, chained)).status_code == 200
    last = await done(http, chained, 3, claim_next=True)
    assert last.json() == {"ok": True, "next_wake": False}  # nothing pending: no next claim
    assert await db.fetchval("SELECT acked_offset FROM dispatch_state") == 3
    assert await db.fetchval("SELECT count(*) FROM claims WHERE status = 'active'") == 0


async def test_a_retried_chaining_done_gets_the_chained_claim_again(api, db: asyncpg.Connection):
    """The first answer was lost: the retry returns the same claim with a fresh token, and the
    lost answer's token stops working (nobody holds the entity for a whole lease unseen)."""
    http, _runner, _entity, first = await _claimed_with_more_pending(api, db)
    lost = (await done(http, first, 1, claim_next=True)).json()["next_claim"]

    retried = await done(http, first, 1, claim_next=True)

    assert retried.status_code == 200, retried.text
    again = retried.json()["next_claim"]
    assert (again["claim_id"], again["epoch"]) == (lost["claim_id"], lost["epoch"])
    assert again["claim_token"] != lost["claim_token"]
    assert again["lease_expires_at"] == lost["lease_expires_at"]  # the same lease, not a new one
    assert_problem(await heartbeat(http, lost), 403, "FORBIDDEN")
    assert (await heartbeat(http, again)).status_code == 200
    assert await db.fetchval("SELECT count(*) FROM claims") == 2


async def test_a_retried_done_without_claim_next_chains_nothing(api, db: asyncpg.Connection):
    http, _runner, _entity, first = await _claimed_with_more_pending(api, db)
    assert (await done(http, first, 1)).json() == {"ok": True, "next_wake": True}
    retried = await done(http, first, 1, claim_next=True)
    assert retried.json() == {"ok": True, "next_wake": True}  # the wake went to the stream
    assert await db.fetchval("SELECT count(*) FROM claims WHERE status = 'active'") == 0


async def test_a_disabled_runner_gets_no_chained_claim(
    api, db: asyncpg.Connection, redis: Redis, settings: Settings
):
    """Chaining checks what a runner claim checks: a disabled runner's entities go through a
    wake (which waits for the runner to be enabled again)."""
    http, runner, _entity, first = await _claimed_with_more_pending(api, db)
    alice = await api.as_(ALICE)
    assert (await http.post(f"/v1/runners/{runner}/disable", headers=alice)).status_code == 200

    resp = await done(http, first, 1, claim_next=True)

    assert resp.json() == {"ok": True, "next_wake": True}
    assert await db.fetchval("SELECT count(*) FROM claims WHERE status = 'active'") == 0
    reason = await db.fetchval("SELECT reason FROM wakes ORDER BY epoch DESC LIMIT 1")
    assert reason == "follow_up"


async def test_a_chained_claim_in_use_is_not_handed_over_again(api, db: asyncpg.Connection):
    """Once its holder used the chained claim (a heartbeat), a late retry of the old done gets
    nothing: the holder's token keeps working."""
    http, _runner, _entity, first = await _claimed_with_more_pending(api, db)
    chained = (await done(http, first, 1, claim_next=True)).json()["next_claim"]
    assert (await heartbeat(http, chained)).status_code == 200

    retried = await done(http, first, 1, claim_next=True)

    assert retried.json() == {"ok": True, "next_wake": True}
    assert (await heartbeat(http, chained)).status_code == 200


async def test_a_chained_claim_whose_lease_passed_is_not_revived(api, db: asyncpg.Connection):
    http, _runner, _entity, first = await _claimed_with_more_pending(api, db)
    chained = (await done(http, first, 1, claim_next=True)).json()["next_claim"]
    await db.execute("UPDATE claims SET lease_expires_at = now() - interval '1 s'")
    await db.execute("UPDATE dispatch_state SET active_lease_expires_at = now() - interval '1 s'")

    retried = await done(http, first, 1, claim_next=True)

    assert "next_claim" not in retried.json()
    assert_problem(await heartbeat(http, chained), 409, "LEASE_EXPIRED")
