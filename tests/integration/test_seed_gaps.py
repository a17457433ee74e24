"""The gaps the original system left open, one test each, named after the
gap. Each test would fail on the behaviour the gap describes."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import httpx
from redis.asyncio import Redis
from redis.exceptions import ResponseError

from pullwake.config import Settings
from pullwake.testing import serve_in_background
from pullwake.webhooks import WebhookDelivery

from .helpers import (
    ALICE,
    append_event,
    assert_problem,
    bearer,
    claim,
    claim_ok,
    create_entity,
    done,
    get_entity,
    heartbeat,
    read_wake,
    read_wakes,
    register_runner,
    runner_policy,
    send,
    signal,
    stream_key,
    uid,
    xlen,
    xpending_count,
)
from .servers import serve

# --- 1. unauthenticated claim callbacks minted tokens and evicted the holder -----------------


async def test_gap01_claim_needs_the_runner_owner_and_never_evicts_the_holder(
    http, alice, bob, world, db
) -> None:
    wake_id = (await send(http, alice, world.entity, "a"))["wake"]["id"]
    path = f"/v1/runners/{world.runner_id}/claim"

    assert_problem(await http.post(path, json={"wake_id": wake_id}), 401, "UNAUTHORIZED")
    assert_problem(await claim(http, bob, world.runner_id, wake_id), 403, "FORBIDDEN")
    holder = await claim_ok(http, alice, world.runner_id, wake_id)
    # knowing the wake id, even the owner cannot mint a second token for it
    assert_problem(await claim(http, alice, world.runner_id, wake_id), 409, "ALREADY_CLAIMED")
    callback = f"/v1/claims/{holder['claim_id']}/heartbeat"
    assert_problem(await http.post(callback, json={"epoch": 1}), 401, "UNAUTHORIZED")
    assert_problem(await http.post(callback, json={"epoch": 1}, headers=alice), 401)

    assert (await heartbeat(http, holder)).status_code == 200
    resp = await append_event(http, world.entity, holder["claim_token"], "still mine")
    assert resp.status_code == 201, resp.text
    assert await db.fetchval("SELECT count(*) FROM claims") == 1


# --- 2. re-registration by another principal took the runner over (and re-enabled it) --------


async def test_gap02_reregistration_cannot_take_over_or_reenable_a_runner(
    http, alice, bob, db
) -> None:
    runner_id = await register_runner(http, alice, label="alice's")
    assert (await http.post(f"/v1/runners/{runner_id}/disable", headers=alice)).is_success

    resp = await http.post("/v1/runners", json={"id": runner_id, "label": "bob's"}, headers=bob)
    assert_problem(resp, 403, "FORBIDDEN")
    resp = await http.post("/v1/runners", json={"id": runner_id, "label": "again"}, headers=alice)
    assert resp.status_code == 200, resp.text

    row = await db.fetchrow("SELECT owner_principal, admin_status, label FROM runners")
    assert tuple(row) == (ALICE, "disabled", "again")


# --- 3. spawning onto a disabled runner was allowed (then every claim failed) -----------------


async def test_gap03_no_spawn_onto_a_disabled_runner_and_no_failures_counted(
    http, alice, world, db
) -> None:
    wake_id = (await send(http, alice, world.entity, "waits"))["wake"]["id"]
    assert (await http.post(f"/v1/runners/{world.runner_id}/disable", headers=alice)).is_success

    resp = await http.put(
        f"/v1/entities/t/{uid('e')}",
        json={"dispatch_policy": runner_policy(world.runner_id)},
        headers=alice,
    )
    assert_problem(resp, 409, "RUNNER_DISABLED")
    entity_type = uid("t")
    body = {"default_dispatch_policy": runner_policy(world.runner_id)}
    assert (await http.put(f"/v1/entity-types/{entity_type}", json=body, headers=alice)).is_success
    resp = await http.put(f"/v1/entities/{entity_type}/{uid('e')}", headers=alice)
    assert_problem(resp, 409, "RUNNER_DISABLED")

    # a wake that was already waiting is not burnt by claims against the disabled runner
    for _ in range(3):
        assert_problem(await claim(http, alice, world.runner_id, wake_id), 409, "RUNNER_DISABLED")
    dispatch = (await get_entity(http, alice, world.entity))["dispatch"]
    assert (dispatch["outstanding_wake_id"], dispatch["failed_attempts"]) == (wake_id, 0)
    assert await db.fetchval("SELECT count(*) FROM claims") == 0
    assert (await http.post(f"/v1/runners/{world.runner_id}/enable", headers=alice)).is_success
    await claim_ok(http, alice, world.runner_id, wake_id)


# --- 4. a paused (or stopped) entity's claim released and re-woke at once: a hot loop --------


async def test_gap04_paused_or_stopped_entity_claim_answers_done_without_a_hot_loop(
    settings: Settings, redis: Redis
) -> None:
    async with serve(settings) as server:
        http, alice = server.http, await server.headers(ALICE)
        runner = await register_runner(http, alice)
        entity = await create_entity(http, alice, runner)
        sent = await send(http, alice, entity, "pending")
        wake = await read_wake(http, alice, runner, "s1")
        await signal(http, alice, entity, "pause")

        resp = await claim(http, alice, runner, sent["wake"]["id"], wake.id)
        assert resp.status_code == 200, resp.text
        assert resp.json()["done"] is True
        report = await server.services.recovery.run_all()
        await asyncio.sleep(0.2)
        dispatch = (await get_entity(http, alice, entity))["dispatch"]
        assert dispatch["outstanding_wake_id"] is None
        assert dispatch["active_claim"] is None
        assert dispatch["failed_attempts"] == 0
        assert report.rewakes == report.redelivered == 0
        assert await xlen(redis, settings, runner) == 1, "no new wake was published"
        assert await xpending_count(redis, settings, runner) == 0

        await signal(http, alice, entity, "resume")
        resumed = (await get_entity(http, alice, entity))["dispatch"]
        assert resumed["outstanding_wake_id"] is not None
        assert await xlen(redis, settings, runner) == 2, "resume wakes exactly once"

        # stopped while a claim ran: the holder's done stops it; a late wake answers done too
        note = await claim_ok(http, alice, runner, resumed["outstanding_wake_id"])
        await signal(http, alice, entity, "stop")
        assert (await done(http, note, note["tail_offset"])).status_code == 200
        assert (await get_entity(http, alice, entity))["status"] == "stopped"
        resp = await claim(http, alice, runner, resumed["outstanding_wake_id"])
        assert resp.status_code == 200, resp.text
        assert resp.json()["done"] is True
        assert await xlen(redis, settings, runner) == 2


# --- 5. a claim for something that is not an entity 404ed without releasing: a loop ----------


async def test_gap05_claim_of_a_wake_for_no_entity_is_404_and_acked(
    http, alice, world, redis, settings
) -> None:
    key = stream_key(settings, world.runner_id)
    forged = {
        "v": "1",
        "wake_id": "wk_0123456789abcdef0123",
        "entity": "/no/such-entity",
        "epoch": "1",
        "reason": "message",
        "created_at": "2026-01-01T00:00:00Z",
    }
    with contextlib.suppress(ResponseError):  # BUSYGROUP: the group exists already
        await redis.xgroup_create(key, "pullwake", id="0", mkstream=True)
    await redis.xadd(key, forged)
    (wake,) = await read_wakes(http, alice, world.runner_id, "s1")
    assert wake.data["entity"] == "/no/such-entity"
    assert await xpending_count(redis, settings, world.runner_id) == 1

    resp = await claim(http, alice, world.runner_id, wake.data["wake_id"], wake.id)

    assert_problem(resp, 404, "NOT_FOUND")
    assert await xpending_count(redis, settings, world.runner_id) == 0, "the entry was acked"


# --- 6. no reaper: crashed runners' claims stayed active and entities stayed running ---------


async def test_gap06_crashed_holders_claim_is_reaped_and_fenced(settings: Settings, db) -> None:
    async with serve(settings.with_(claim_lease_ms=1_000)) as server:
        http, alice = server.http, await server.headers(ALICE)
        runner = await register_runner(http, alice)
        entity = await create_entity(http, alice, runner)
        sent = await send(http, alice, entity, "work")
        note = await claim_ok(http, alice, runner, sent["wake"]["id"])
        lease = (await get_entity(http, alice, entity))["dispatch"]["active_claim"]
        await asyncio.sleep(0.3)
        assert (await heartbeat(http, note)).status_code == 200
        refreshed = (await get_entity(http, alice, entity))["dispatch"]["active_claim"]
        assert refreshed["lease_expires_at"] > lease["lease_expires_at"], "heartbeats extend it"

        await asyncio.sleep(1.2)  # the holder crashed: no heartbeat within the lease
        report = await server.services.recovery.expire_claims()

        assert (report.expired_claims, report.rewakes) == (1, 1)
        view = await get_entity(http, alice, entity)
        assert view["status"] == "idle"
        assert view["dispatch"]["active_claim"] is None
        assert view["dispatch"]["epoch"] == 2
        assert await db.fetchval("SELECT status FROM claims") == "expired"
        assert_problem(await heartbeat(http, note), 409, "LEASE_EXPIRED")
        assert_problem(await done(http, note, 1), 409, "LEASE_EXPIRED")


# --- 7. registration returned no stream offset: every restart replayed the whole stream ------


async def test_gap07_restarted_runner_gets_no_replay_of_handled_wakes(
    http, alice, world, redis, settings
) -> None:
    first = await send(http, alice, world.entity, "one")
    event = await read_wake(http, alice, world.runner_id, "process-1")
    note = await claim_ok(http, alice, world.runner_id, first["wake"]["id"], event.id)
    assert (await done(http, note, 1)).status_code == 200
    assert await xlen(redis, settings, world.runner_id) == 1

    # the runner process restarts with a new session and registers again: no offset needed
    await register_runner(http, alice, world.runner_id)
    second = await send(http, alice, world.entity, "two")
    (event,) = await read_wakes(http, alice, world.runner_id, "process-2")
    assert event.data["wake_id"] == second["wake"]["id"], "the handled wake was replayed"


# --- 8. heartbeat validation was weak (negative lease, bad values => 500) --------------------


async def test_gap08_heartbeat_bodies_are_validated_strictly(http, alice, world) -> None:
    runner_hb = f"/v1/runners/{world.runner_id}/heartbeat"
    for body in (
        {"lease_ms": -1},
        {"lease_ms": 0},
        {"lease_ms": "60000"},
        {"lease_ms": 60000.5},
        {"lease_ms": True},
        {"lease_ms": 10**30},
        {"diagnostics": "ok"},
        {"diagnostics": {f"k{i}": i for i in range(65)}},
        {"last_seen_at": "not-a-date"},
        [],
    ):
        resp = await http.post(runner_hb, json=body, headers=alice)
        assert_problem(resp, 400, "INVALID_REQUEST")
    resp = await http.post(
        runner_hb,
        json={"lease_ms": 60_000, "diagnostics": {"since": "not-a-date", "n": -1, "x": [1]}},
        headers=alice,
    )
    assert resp.status_code == 200, resp.text
    health = (await http.get(f"/v1/runners/{world.runner_id}/health", headers=alice)).json()
    assert health["liveness"] == "online"

    note = await claim_ok(
        http, alice, world.runner_id, (await send(http, alice, world.entity, 1))["wake"]["id"]
    )
    for body in ({"epoch": "1"}, {"epoch": -1}, {"epoch": 1.0}, {"epoch": None}, {}):
        resp = await http.post(
            f"/v1/claims/{note['claim_id']}/heartbeat",
            json=body,
            headers=bearer(note["claim_token"]),
        )
        assert_problem(resp, 400, "INVALID_REQUEST")


# --- 9. webhook callbacks forwarded every caller header upstream ----------------------------


@dataclass
class Recorder:
    """A webhook target that records the headers of every request."""

    headers: list[dict[str, str]] = field(default_factory=list)
    url: str = ""

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        while (await receive()).get("more_body"):
            pass
        self.headers.append({k.decode().lower(): v.decode() for k, v in scope["headers"]})
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"{}"})


@contextlib.asynccontextmanager
async def _recorder() -> AsyncIterator[Recorder]:
    target = Recorder()
    async with serve_in_background(target) as base_url:
        target.url = f"{base_url}/hook"
        yield target


DELIVERY_HEADERS = {
    "host",
    "accept",
    "accept-encoding",
    "connection",
    "user-agent",
    "content-length",
    "content-type",
    "webhook-id",
    "webhook-timestamp",
    "webhook-signature",
    # The message's trace context (migration 0012): data of the message, like its payload,
    # which the target gets anyway; not a header forwarded from the sender's request.
    "traceparent",
}


async def test_gap09_webhook_deliveries_forward_no_caller_headers(settings: Settings) -> None:
    local = settings.with_(webhook_allow_private=True, webhook_secret="whsec_" + "A" * 44)
    async with serve(local) as server, _recorder() as target:
        alice = await server.headers(ALICE)
        noisy = {
            **alice,
            "Cookie": "session=s3cr3t",
            "X-Forwarded-For": "10.9.8.7",
            "X-Custom": "from-the-sender",
            "traceparent": "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
        }
        path = f"/v1/entities/hook/{uid('e')}"
        policy = {"targets": [{"type": "webhook", "url": target.url}]}
        resp = await server.http.put(path, json={"dispatch_policy": policy}, headers=noisy)
        assert resp.status_code == 201, resp.text
        resp = await server.http.post(f"{path}/messages", json={"payload": 1}, headers=noisy)
        wake_id = resp.json()["wake"]["id"]
        async with httpx.AsyncClient() as client:
            outcome = await WebhookDelivery(
                server.services.webhook_claims, server.services.callbacks, local, client
            ).deliver(wake_id, 1)
        assert outcome.result == "delivered", outcome

    (headers,) = target.headers
    assert set(headers) <= DELIVERY_HEADERS, set(headers) - DELIVERY_HEADERS
    assert headers["traceparent"] == noisy["traceparent"]
    text = json.dumps(headers)
    for leaked in ("s3cr3t", "10.9.8.7", "from-the-sender", "pwk_"):
        assert leaked not in text


# --- 10. a lost subscription stopped sends from waking until a restart ----------------------


async def test_gap10_sends_keep_waking_after_redis_loses_the_stream(
    http, alice, world, redis, settings
) -> None:
    first = await send(http, alice, world.entity, "before")
    note = await claim_ok(http, alice, world.runner_id, first["wake"]["id"])
    assert (await done(http, note, 1)).status_code == 200

    await redis.delete(stream_key(settings, world.runner_id))  # Redis lost the stream and group

    second = await send(http, alice, world.entity, "after")
    assert second["wake"]["status"] == "queued"
    event = await read_wake(http, alice, world.runner_id, "after-loss")
    assert event.data["wake_id"] == second["wake"]["id"]
    await claim_ok(http, alice, world.runner_id, second["wake"]["id"], event.id)


# --- 11. stream identity could differ between the wake and the claim (tenant prefixes) -------


async def test_gap11_one_identity_from_wake_to_claim_and_prefixed_callbacks(
    settings: Settings,
) -> None:
    public_url = "https://wake.example.com/t/tenant-a"
    async with serve(settings.with_(public_url=public_url)) as server:
        http, alice = server.http, await server.headers(ALICE)
        runner = await register_runner(http, alice)
        entity = await create_entity(http, alice, runner)
        sent = await send(http, alice, entity, "x")
        event = await read_wake(http, alice, runner)
        note = await claim_ok(http, alice, runner, sent["wake"]["id"], event.id)

    assert event.data["entity"] == note["entity"]["url"] == entity.url
    assert event.data["wake_id"] == note["wake_id"] == note["claim_id"]
    for name, url in note["callbacks"].items():
        assert url.startswith(f"{public_url}/v1/"), (name, url)


# --- 12. health's outstanding/pending counts were always 0 ----------------------------------


async def test_gap12_health_reports_the_real_backlog(http, alice, world) -> None:
    health_path = f"/v1/runners/{world.runner_id}/health"
    await send(http, alice, world.entity, "a")
    other = await create_entity(http, alice, world.runner_id)
    await send(http, alice, other, "b")
    await read_wakes(http, alice, world.runner_id, "s1", count=2)

    backlog = (await http.get(health_path, headers=alice)).json()["backlog"]
    assert backlog["outstanding_wakes"] == 2
    assert backlog["stream"]["length"] == 2
    assert backlog["stream"]["pending"] == 2
    assert backlog["oldest_outstanding_wake_age_ms"] >= 0

    wake_id = (await get_entity(http, alice, world.entity))["dispatch"]["outstanding_wake_id"]
    await claim_ok(http, alice, world.runner_id, wake_id)
    health = (await http.get(health_path, headers=alice)).json()
    assert health["active_claims"] == 1
    assert health["backlog"]["outstanding_wakes"] == 1
    assert health["backlog"]["stream"]["pending"] == 1


# --- 13. runner ids were not validated nor encoded in stream paths --------------------------


async def test_gap13_runner_ids_are_validated_and_cannot_shape_redis_keys(
    http, alice, redis, settings
) -> None:
    for bad in ("a}:x", "{runner:b}", "x:wakes", "a/b", "a b", "", "é", "-a", "a\n"):
        resp = await http.post("/v1/runners", json={"id": bad}, headers=alice)
        assert_problem(resp, 400, "INVALID_REQUEST")
    runner = await register_runner(http, alice, "Runner_1.prod-eu")
    entity = await create_entity(http, alice, runner)
    await send(http, alice, entity, 1)
    keys = {k async for k in redis.scan_iter(match=f"{settings.redis_key_prefix}:*")}
    assert stream_key(settings, runner) in keys
    assert all(key.count("{") == key.count("}") == 1 for key in keys), keys
