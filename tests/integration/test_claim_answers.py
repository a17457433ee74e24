"""Every answer of POST /v1/runners/{id}/claim, and the XACK that follows each of them."""

from __future__ import annotations

from .helpers import (
    assert_problem,
    claim,
    claim_ok,
    create_entity,
    done,
    read_wake,
    read_wakes,
    register_runner,
    send,
    signal,
    xpending_count,
)


async def test_claim_acks_the_entry(http, alice, world, redis, settings, db):
    await send(http, alice, world.entity, "a")
    wake = await read_wake(http, alice, world.runner_id)
    assert await xpending_count(redis, settings, world.runner_id) == 1

    note = await claim_ok(http, alice, world.runner_id, wake.data["wake_id"], wake.id)
    assert await xpending_count(redis, settings, world.runner_id) == 0
    assert note["lease_ms"] == settings.claim_lease_ms
    assert note["entity"]["status"] == "running"
    assert note["entity"]["created_by"] == "user:alice@example.com"
    base = settings.public_url.rstrip("/")
    assert note["callbacks"]["done"] == f"{base}/v1/claims/{note['claim_id']}/done"
    assert note["callbacks"]["events"] == f"{base}/v1{world.entity.path[3:]}/events"
    row = await db.fetchrow(
        "SELECT claim_status, claimed_at FROM wakes WHERE id = $1", note["wake_id"]
    )
    assert row["claim_status"] == "claimed"
    assert row["claimed_at"] is not None


async def test_claim_without_entry_id_acks_the_recorded_entry(http, alice, world, redis, settings):
    await send(http, alice, world.entity, "a")
    wake = await read_wake(http, alice, world.runner_id)
    await claim_ok(http, alice, world.runner_id, wake.data["wake_id"])
    assert await xpending_count(redis, settings, world.runner_id) == 0


async def test_claim_of_a_finished_wake_is_204_and_acked(http, alice, world, redis, settings):
    await send(http, alice, world.entity, "a")
    wake = await read_wake(http, alice, world.runner_id, "s1")
    note = await claim_ok(http, alice, world.runner_id, wake.data["wake_id"], wake.id)
    assert (await done(http, note, 1)).json() == {"ok": True, "next_wake": False}

    # the same wake turns up again (a re-delivery): nothing left to do
    entry = await redis.xadd(
        f"{settings.redis_key_prefix}:{{runner:{world.runner_id}}}:wakes",
        {
            "v": "1",
            "wake_id": wake.data["wake_id"],
            "entity": world.entity.url,
            "epoch": "1",
            "reason": "redelivery",
            "created_at": wake.data["created_at"],
        },
    )
    again = await read_wake(http, alice, world.runner_id, "s1")
    assert again.id == entry
    assert await xpending_count(redis, settings, world.runner_id) == 1
    resp = await claim(http, alice, world.runner_id, wake.data["wake_id"], again.id)
    assert resp.status_code == 204, resp.text
    assert resp.content == b""
    assert await xpending_count(redis, settings, world.runner_id) == 0


async def test_duplicate_delivery_is_already_claimed_and_acked(http, alice, world, redis, settings):
    sent = await send(http, alice, world.entity, "a")
    # disable + enable re-publishes the outstanding wake: two entries for one wake
    assert (
        await http.post(f"/v1/runners/{world.runner_id}/disable", headers=alice)
    ).status_code == 200
    assert (
        await http.post(f"/v1/runners/{world.runner_id}/enable", headers=alice)
    ).status_code == 200
    first, second = await read_wakes(http, alice, world.runner_id, count=2)
    assert first.data["wake_id"] == second.data["wake_id"] == sent["wake"]["id"]
    assert await xpending_count(redis, settings, world.runner_id) == 2

    note = await claim_ok(http, alice, world.runner_id, first.data["wake_id"], first.id)
    assert await xpending_count(redis, settings, world.runner_id) == 1
    resp = await claim(http, alice, world.runner_id, second.data["wake_id"], second.id)
    body = assert_problem(resp, 409, "ALREADY_CLAIMED")
    assert note["claim_id"] in body["detail"]
    assert await xpending_count(redis, settings, world.runner_id) == 0


async def test_stale_wake_of_paused_entity_answers_done(http, alice, world, redis, settings, db):
    sent = await send(http, alice, world.entity, "a")
    wake = await read_wake(http, alice, world.runner_id)
    await signal(http, alice, world.entity, "pause")

    resp = await claim(http, alice, world.runner_id, sent["wake"]["id"], wake.id)
    assert resp.status_code == 200, resp.text
    assert resp.json() == {"done": True, "reason": "paused"}
    assert await xpending_count(redis, settings, world.runner_id) == 0
    assert await db.fetchval("SELECT count(*) FROM claims") == 0
    assert await db.fetchval("SELECT status FROM entities") == "paused"


async def test_stale_wake_of_stopped_entity_answers_done(http, alice, world, redis, settings):
    sent = await send(http, alice, world.entity, "a")
    wake = await read_wake(http, alice, world.runner_id)
    await signal(http, alice, world.entity, "stop")
    resp = await claim(http, alice, world.runner_id, sent["wake"]["id"], wake.id)
    assert resp.status_code == 200, resp.text
    assert resp.json() == {"done": True, "reason": "stopped"}
    assert await xpending_count(redis, settings, world.runner_id) == 0


async def test_outstanding_wake_of_paused_entity_answers_done(http, alice, world, db):
    # Not reachable through the API (pause supersedes the outstanding wake); the claim must
    # still refuse to run a paused entity whose wake is somehow outstanding.
    sent = await send(http, alice, world.entity, "a")
    await db.execute("UPDATE entities SET status = 'paused'")
    resp = await claim(http, alice, world.runner_id, sent["wake"]["id"])
    assert resp.status_code == 200, resp.text
    assert resp.json() == {"done": True, "reason": "paused"}
    assert await db.fetchval("SELECT outstanding_wake_id FROM dispatch_state") is None
    assert await db.fetchval("SELECT delivery_status FROM wakes") == "superseded"
    assert await db.fetchval("SELECT count(*) FROM claims") == 0


async def test_unknown_wake_is_404_and_acked(http, alice, world, redis, settings):
    await send(http, alice, world.entity, "a")
    wake = await read_wake(http, alice, world.runner_id)
    resp = await claim(http, alice, world.runner_id, "wk_0000000000000000000000000000", wake.id)
    body = assert_problem(resp, 404, "NOT_FOUND")
    assert "wk_0000000000000000000000000000" in body["detail"]
    assert await xpending_count(redis, settings, world.runner_id) == 0


async def test_wake_of_another_runner_is_404(http, alice, world, db):
    sent = await send(http, alice, world.entity, "a")
    other = await register_runner(http, alice)
    resp = await claim(http, alice, other, sent["wake"]["id"])
    assert_problem(resp, 404, "NOT_FOUND")
    assert await db.fetchval("SELECT count(*) FROM claims") == 0


async def test_disabled_runner_cannot_claim_and_entry_is_acked(
    http, alice, world, redis, settings, db
):
    sent = await send(http, alice, world.entity, "a")
    wake = await read_wake(http, alice, world.runner_id)
    resp = await http.post(f"/v1/runners/{world.runner_id}/disable", headers=alice)
    assert resp.json()["admin_status"] == "disabled"

    resp = await claim(http, alice, world.runner_id, sent["wake"]["id"], wake.id)
    assert_problem(resp, 409, "RUNNER_DISABLED")
    assert await xpending_count(redis, settings, world.runner_id) == 0
    assert await db.fetchval("SELECT count(*) FROM claims") == 0
    # the wake stays outstanding for when the runner comes back
    assert await db.fetchval("SELECT outstanding_wake_id FROM dispatch_state") == sent["wake"]["id"]
    resp = await http.get(f"/v1/runners/{world.runner_id}/wakes", headers=alice)
    assert_problem(resp, 409, "RUNNER_DISABLED")

    await http.post(f"/v1/runners/{world.runner_id}/enable", headers=alice)
    again = await read_wake(http, alice, world.runner_id)
    assert again.data["wake_id"] == sent["wake"]["id"]
    await claim_ok(http, alice, world.runner_id, sent["wake"]["id"], again.id)


async def test_claim_for_entity_of_someone_elses_runner_is_owner_mismatch(http, alice, bob, world):
    sent = await send(http, alice, world.entity, "a")
    resp = await claim(http, bob, world.runner_id, sent["wake"]["id"])
    assert_problem(resp, 403, "FORBIDDEN")


async def test_claim_on_second_entity_is_independent(http, alice, world):
    other = await create_entity(http, alice, world.runner_id)
    a = await send(http, alice, world.entity, "a")
    b = await send(http, alice, other, "b")
    first = await claim_ok(http, alice, world.runner_id, a["wake"]["id"])
    second = await claim_ok(http, alice, world.runner_id, b["wake"]["id"])
    assert first["entity"]["url"] != second["entity"]["url"]
    assert first["claim_token"] != second["claim_token"]
