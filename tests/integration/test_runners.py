"""Runner registry: registration, ownership, liveness, health, admin status, deletion."""

from __future__ import annotations

import json
from datetime import datetime, timedelta

from .helpers import (
    ALICE,
    assert_problem,
    claim_ok,
    create_entity,
    read_wake,
    register_runner,
    send,
    stream_key,
    uid,
)

OWNER_ROUTES = [
    ("GET", "", None),
    ("POST", "/heartbeat", {}),
    ("GET", "/health", None),
    ("POST", "/enable", None),
    ("POST", "/disable", None),
    ("DELETE", "", None),
    ("POST", "/claim", {"wake_id": "wk_0000000000000000000000000000"}),
    ("GET", "/wakes", None),
]


async def test_register_creates_then_updates(http, alice, db):
    runner_id = uid("runner")
    resp = await http.post("/v1/runners", json={"id": runner_id, "label": "one"}, headers=alice)
    assert resp.status_code == 201, resp.text
    body = resp.json()
    assert body["id"] == runner_id
    assert body["owner_principal"] == ALICE
    assert (body["label"], body["kind"], body["admin_status"]) == ("one", "local", "enabled")
    assert body["liveness"] == "offline"

    resp = await http.post(
        "/v1/runners", json={"id": runner_id, "label": "two", "kind": "ci"}, headers=alice
    )
    assert resp.status_code == 200, resp.text
    assert (resp.json()["label"], resp.json()["kind"]) == ("two", "ci")
    assert await db.fetchval("SELECT count(*) FROM runners") == 1


async def test_another_owner_cannot_take_a_runner_id(http, alice, bob, db):
    runner_id = await register_runner(http, alice, label="mine")
    resp = await http.post("/v1/runners", json={"id": runner_id, "label": "bob's"}, headers=bob)
    body = assert_problem(resp, 403, "FORBIDDEN")
    assert runner_id in body["detail"]
    row = await db.fetchrow("SELECT owner_principal, label FROM runners WHERE id = $1", runner_id)
    assert dict(row) == {"owner_principal": ALICE, "label": "mine"}


async def test_other_owner_is_refused(http, alice, bob, db):
    runner_id = await register_runner(http, alice)
    for method, suffix, body in OWNER_ROUTES:
        kwargs = {} if body is None else {"json": body}
        path = f"/v1/runners/{runner_id}{suffix}"
        resp = await http.request(method, path, headers=bob, **kwargs)
        problem = assert_problem(resp, 403, "FORBIDDEN", f"{method} {path}")
        assert runner_id in problem["detail"]
    row = await db.fetchrow("SELECT owner_principal, admin_status FROM runners")
    assert dict(row) == {"owner_principal": ALICE, "admin_status": "enabled"}
    assert await db.fetchval("SELECT count(*) FROM runner_liveness") == 0


async def test_unknown_runner_is_not_found(http, alice):
    missing = uid("missing")
    for method, suffix, body in OWNER_ROUTES:
        kwargs = {} if body is None else {"json": body}
        path = f"/v1/runners/{missing}{suffix}"
        resp = await http.request(method, path, headers=alice, **kwargs)
        problem = assert_problem(resp, 404, "NOT_FOUND", f"{method} {path}")
        assert missing in problem["detail"]


async def test_reregistration_never_reenables(http, alice, db):
    runner_id = await register_runner(http, alice)
    resp = await http.post(f"/v1/runners/{runner_id}/disable", headers=alice)
    assert resp.status_code == 200
    assert resp.json()["admin_status"] == "disabled"

    resp = await http.post("/v1/runners", json={"id": runner_id, "label": "again"}, headers=alice)
    assert resp.status_code == 200, resp.text
    assert resp.json()["admin_status"] == "disabled"
    assert resp.json()["label"] == "again"
    assert await db.fetchval("SELECT admin_status FROM runners") == "disabled"

    resp = await http.post(f"/v1/runners/{runner_id}/enable", headers=alice)
    assert resp.json()["admin_status"] == "enabled"


async def test_list_returns_only_own_runners(http, alice, bob):
    mine = sorted([await register_runner(http, alice), await register_runner(http, alice)])
    theirs = await register_runner(http, bob)

    resp = await http.get("/v1/runners", headers=alice)
    assert resp.status_code == 200, resp.text
    assert [r["id"] for r in resp.json()["runners"]] == mine
    resp = await http.get("/v1/runners", headers=bob)
    assert [r["id"] for r in resp.json()["runners"]] == [theirs]


async def test_heartbeat_sanitizes_diagnostics_and_goes_online(http, alice, db):
    runner_id = await register_runner(http, alice)
    diagnostics = {
        "version": "1.2.3",
        "uptime_s": 12.5,
        "stream_connected": True,
        "bad key!": "dropped",
        "$where": "dropped",
        "note": "x" * 2_000,
        "nested": {"ok": 1, "bad key": 2, "text": "dropped"},
        "objects": [{"x": 1}],
        "too_long_list": list(range(100)),
        "nothing": None,
    }
    resp = await http.post(
        f"/v1/runners/{runner_id}/heartbeat",
        json={"lease_ms": 60_000, "diagnostics": diagnostics},
        headers=alice,
    )
    assert resp.status_code == 200, resp.text
    body = resp.json()
    assert (body["ok"], body["liveness"]) == (True, "online")

    row = await db.fetchrow(
        "SELECT diagnostics, lease_expires_at - last_seen_at AS lease FROM runner_liveness"
        " WHERE runner_id = $1",
        runner_id,
    )
    assert json.loads(row["diagnostics"]) == {
        "version": "1.2.3",
        "uptime_s": 12.5,
        "stream_connected": True,
        "note": "x" * 500,
        "nested": {"ok": 1},
        "nothing": None,
    }
    assert abs(row["lease"] - timedelta(seconds=60)) < timedelta(seconds=1)

    view = (await http.get(f"/v1/runners/{runner_id}", headers=alice)).json()
    assert view["liveness"] == "online"
    assert view["last_seen_at"] is not None
    assert datetime.fromisoformat(view["lease_expires_at"].replace("Z", "+00:00")) > (
        datetime.fromisoformat(view["last_seen_at"].replace("Z", "+00:00"))
    )

    # a heartbeat without diagnostics keeps the stored ones; without a body it is fine too
    resp = await http.post(f"/v1/runners/{runner_id}/heartbeat", headers=alice)
    assert resp.status_code == 200, resp.text
    health = (await http.get(f"/v1/runners/{runner_id}/health", headers=alice)).json()
    assert health["diagnostics"]["version"] == "1.2.3"


async def test_heartbeat_rejects_bad_lease(http, alice):
    runner_id = await register_runner(http, alice)
    resp = await http.post(
        f"/v1/runners/{runner_id}/heartbeat", json={"lease_ms": 5}, headers=alice
    )
    body = assert_problem(resp, 400, "INVALID_REQUEST")
    assert "lease_ms" in body["detail"]


async def test_health_shows_backlog_and_issues(http, alice, redis, settings):
    runner_id = await register_runner(http, alice)
    health = (await http.get(f"/v1/runners/{runner_id}/health", headers=alice)).json()
    assert health["runner_id"] == runner_id
    assert health["liveness"] == "offline"
    assert health["active_claims"] == 0
    assert health["backlog"]["outstanding_wakes"] == 0
    assert health["backlog"]["oldest_outstanding_wake_age_ms"] is None
    assert health["health"]["status"] == "degraded"
    assert [i["code"] for i in health["health"]["issues"]] == ["never_seen"]

    entity = await create_entity(http, alice, runner_id)
    other = await create_entity(http, alice, runner_id)
    await send(http, alice, entity, "a")
    await send(http, alice, other, "b")
    wake = await read_wake(http, alice, runner_id)
    await claim_ok(http, alice, runner_id, wake.data["wake_id"], wake.id)
    await http.post(
        f"/v1/runners/{runner_id}/heartbeat",
        json={"diagnostics": {"stream_connected": False, "reconnect_count": 9}},
        headers=alice,
    )

    health = (await http.get(f"/v1/runners/{runner_id}/health", headers=alice)).json()
    assert health["liveness"] == "online"
    assert health["active_claims"] == 1
    backlog = health["backlog"]
    assert backlog["outstanding_wakes"] == 1
    assert backlog["undelivered_wakes"] == 0
    assert backlog["oldest_outstanding_wake_age_ms"] >= 0
    assert backlog["stream"]["length"] == 2
    assert backlog["stream"]["length"] == await redis.xlen(stream_key(settings, runner_id))
    # one wake was read (and claimed) by a session; the other is still pending for it
    assert backlog["stream"]["pending"] == 1
    assert backlog["stream"]["consumers"] == 1
    codes = {i["code"] for i in health["health"]["issues"]}
    assert codes == {"stream_disconnected", "many_reconnects"}
    assert health["health"]["status"] == "degraded"
    assert health["diagnostics"] == {"stream_connected": False, "reconnect_count": 9}

    await http.post(f"/v1/runners/{runner_id}/disable", headers=alice)
    health = (await http.get(f"/v1/runners/{runner_id}/health", headers=alice)).json()
    assert health["admin_status"] == "disabled"
    assert health["liveness"] == "offline"
    assert health["health"]["status"] == "unhealthy"
    assert "disabled" in {i["code"] for i in health["health"]["issues"]}


async def test_delete_releases_claims_and_drops_the_stream(http, alice, db, redis, settings):
    runner_id = await register_runner(http, alice)
    busy = await create_entity(http, alice, runner_id)
    waiting = await create_entity(http, alice, runner_id)
    await send(http, alice, busy, "a")
    wake = await read_wake(http, alice, runner_id)
    note = await claim_ok(http, alice, runner_id, wake.data["wake_id"], wake.id)
    waiting_wake = (await send(http, alice, waiting, "b"))["wake"]["id"]
    assert await redis.exists(stream_key(settings, runner_id)) == 1

    resp = await http.delete(f"/v1/runners/{runner_id}", headers=alice)
    assert resp.status_code == 204, resp.text

    claim_row = await db.fetchrow(
        "SELECT status, end_reason FROM claims WHERE id = $1", note["claim_id"]
    )
    assert dict(claim_row) == {"status": "released", "end_reason": "runner_deleted"}
    state = await db.fetchrow(
        "SELECT e.status, d.active_claim_id, d.acked_offset FROM entities e"
        " JOIN dispatch_state d ON d.entity_url = e.url WHERE e.url = $1",
        busy.url,
    )
    assert dict(state) == {"status": "idle", "active_claim_id": None, "acked_offset": 0}
    assert (
        await db.fetchval("SELECT delivery_status FROM wakes WHERE id = $1", waiting_wake)
        == "superseded"
    )
    assert await redis.exists(stream_key(settings, runner_id)) == 0
    assert await db.fetchval("SELECT count(*) FROM runners") == 0
    resp = await http.get(f"/v1/runners/{runner_id}", headers=alice)
    assert_problem(resp, 404, "NOT_FOUND")
    # the old holder is fenced
    resp = await http.post(
        f"/v1/claims/{note['claim_id']}/done",
        json={"epoch": note["epoch"], "acked_offset": 1},
        headers={"Authorization": f"Bearer {note['claim_token']}"},
    )
    assert_problem(resp, 409, "FENCED")

    # the entities keep their policy: the same runner id coming back gets the waiting work
    await register_runner(http, alice, runner_id)
    urls = set()
    for _ in range(2):
        wake = await read_wake(http, alice, runner_id, "back")
        urls.add(wake.data["entity"])
        await claim_ok(http, alice, runner_id, wake.data["wake_id"], wake.id)
    assert urls == {busy.url, waiting.url}
