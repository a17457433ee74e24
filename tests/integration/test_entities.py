"""Entity types, entity creation and dispatch policies, the inbox and the wake audit view."""

from __future__ import annotations

import json

from .helpers import (
    ALICE,
    assert_problem,
    bearer,
    claim_ok,
    create_entity,
    done,
    read_wake,
    register_runner,
    runner_policy,
    send,
    uid,
)

SECRET = "s3cr3t-webhook-signing-key"


def _webhook_policy() -> dict:
    return {
        "targets": [{"type": "webhook", "url": "https://hooks.example.com/pw", "secret": SECRET}]
    }


async def test_runner_target_must_exist(http, alice, db):
    missing = uid("missing")
    resp = await http.put(
        f"/v1/entities/t/{uid('e')}",
        json={"dispatch_policy": runner_policy(missing)},
        headers=alice,
    )
    body = assert_problem(resp, 404, "NOT_FOUND")
    assert missing in body["detail"]
    assert await db.fetchval("SELECT count(*) FROM entities") == 0


async def test_runner_target_must_be_owned(http, alice, bob, db):
    runner_id = await register_runner(http, alice)
    resp = await http.put(
        f"/v1/entities/t/{uid('e')}",
        json={"dispatch_policy": runner_policy(runner_id)},
        headers=bob,
    )
    assert_problem(resp, 403, "FORBIDDEN")
    assert await db.fetchval("SELECT count(*) FROM entities") == 0


async def test_runner_target_must_be_enabled(http, alice, db):
    runner_id = await register_runner(http, alice)
    await http.post(f"/v1/runners/{runner_id}/disable", headers=alice)
    resp = await http.put(
        f"/v1/entities/t/{uid('e')}",
        json={"dispatch_policy": runner_policy(runner_id)},
        headers=alice,
    )
    assert_problem(resp, 409, "RUNNER_DISABLED")
    assert await db.fetchval("SELECT count(*) FROM entities") == 0


async def test_entity_type_default_policy_and_explicit_override(http, alice):
    default_runner = await register_runner(http, alice)
    explicit_runner = await register_runner(http, alice)
    type_name = uid("type")
    resp = await http.put(
        f"/v1/entity-types/{type_name}",
        json={"default_dispatch_policy": runner_policy(default_runner)},
        headers=alice,
    )
    assert resp.status_code == 201, resp.text
    assert resp.json()["default_dispatch_policy"] == runner_policy(default_runner)
    resp = await http.put(
        f"/v1/entity-types/{type_name}",
        json={"default_dispatch_policy": runner_policy(default_runner)},
        headers=alice,
    )
    assert resp.status_code == 200, resp.text
    resp = await http.get(f"/v1/entity-types/{type_name}", headers=alice)
    assert resp.json()["name"] == type_name

    by_default = await create_entity(http, alice, entity_type=type_name)
    view = (await http.get(by_default.path, headers=alice)).json()
    assert view["dispatch_policy"] == runner_policy(default_runner)

    explicit = await create_entity(http, alice, explicit_runner, entity_type=type_name)
    view = (await http.get(explicit.path, headers=alice)).json()
    assert view["dispatch_policy"] == runner_policy(explicit_runner)

    # the default's runner gets the default entity's wakes, the explicit one the other's
    await send(http, alice, by_default, "d")
    await send(http, alice, explicit, "e")
    assert (await read_wake(http, alice, default_runner)).data["entity"] == by_default.url
    assert (await read_wake(http, alice, explicit_runner)).data["entity"] == explicit.url


async def test_no_policy_and_no_default_is_invalid(http, alice, db):
    type_name = uid("type")
    resp = await http.put(f"/v1/entities/{type_name}/{uid('e')}", json={}, headers=alice)
    body = assert_problem(resp, 400, "INVALID_REQUEST")
    assert "dispatch_policy" in body["detail"]
    assert body["errors"] == [{"message": "required", "key": "dispatch_policy", "source": "body"}]

    # an entity type without a default does not help either
    await http.put(f"/v1/entity-types/{type_name}", json={}, headers=alice)
    resp = await http.put(f"/v1/entities/{type_name}/{uid('e')}", headers=alice)
    assert_problem(resp, 400, "INVALID_REQUEST")
    assert await db.fetchval("SELECT count(*) FROM entities") == 0


async def test_create_entity_view(http, alice):
    runner_id = await register_runner(http, alice)
    entity = await create_entity(http, alice, runner_id, tags={"team": "core", "env": "test"})
    view = (await http.get(entity.path, headers=alice)).json()
    assert view["url"] == entity.url
    assert (view["type"], view["id"]) == (entity.type, entity.id)
    assert view["status"] == "idle"
    assert view["tags"] == {"team": "core", "env": "test"}
    assert view["created_by"] == ALICE
    assert view["dispatch"] == {
        "tail_offset": 0,
        "acked_offset": 0,
        "epoch": 0,
        "outstanding_wake_id": None,
        "active_claim": None,
        "parked_reason": None,
        "failed_attempts": 0,
    }
    resp = await http.get(f"/v1/entities/{entity.type}/{uid('none')}", headers=alice)
    assert_problem(resp, 404, "NOT_FOUND")


async def test_active_claim_shows_in_entity_view(http, alice, world):
    sent = await send(http, alice, world.entity, "a")
    note = await claim_ok(http, alice, world.runner_id, sent["wake"]["id"])
    view = (await http.get(world.entity.path, headers=alice)).json()
    assert view["status"] == "running"
    active = view["dispatch"]["active_claim"]
    assert active["claim_id"] == note["claim_id"]
    assert active["runner_id"] == world.runner_id
    assert active["epoch"] == note["epoch"]
    assert active["lease_expires_at"] == note["lease_expires_at"]


async def test_initial_message_is_sent_once_and_wakes(http, alice, db):
    runner_id = await register_runner(http, alice)
    entity_type, entity_id = uid("type"), uid("ent")
    body = {"dispatch_policy": runner_policy(runner_id), "initial_message": {"payload": {"hi": 1}}}
    resp = await http.put(f"/v1/entities/{entity_type}/{entity_id}", json=body, headers=alice)
    assert resp.status_code == 201, resp.text
    view = resp.json()
    assert view["send_result"]["offset"] == 1
    assert view["send_result"]["wake"]["status"] == "queued"
    assert view["dispatch"]["tail_offset"] == 1
    wake_id = view["send_result"]["wake"]["id"]

    wake = await read_wake(http, alice, runner_id)
    assert wake.data["wake_id"] == wake_id
    assert wake.data["entity"] == f"/{entity_type}/{entity_id}"

    resp = await http.put(f"/v1/entities/{entity_type}/{entity_id}", json=body, headers=alice)
    assert resp.status_code == 200, resp.text
    assert resp.json()["dispatch"]["tail_offset"] == 1
    assert resp.json()["send_result"] is None
    assert await db.fetchval("SELECT count(*) FROM inbox_messages") == 1
    assert await db.fetchval("SELECT count(*) FROM wakes") == 1

    note = await claim_ok(http, alice, runner_id, wake_id, wake.id)
    assert [m["payload"] for m in note["messages"]] == [{"hi": 1}]


async def test_webhook_secret_is_never_returned(http, alice, db):
    type_name = uid("hook")
    resp = await http.put(
        f"/v1/entity-types/{type_name}",
        json={"default_dispatch_policy": _webhook_policy()},
        headers=alice,
    )
    assert resp.status_code == 201, resp.text
    assert SECRET not in resp.text
    assert "secret" not in resp.json()["default_dispatch_policy"]["targets"][0]
    resp = await http.get(f"/v1/entity-types/{type_name}", headers=alice)
    assert SECRET not in resp.text

    entity_id = uid("e")
    resp = await http.put(
        f"/v1/entities/{type_name}/{entity_id}",
        json={"dispatch_policy": _webhook_policy(), "initial_message": {"payload": 1}},
        headers=alice,
    )
    assert resp.status_code == 201, resp.text
    assert SECRET not in resp.text
    assert resp.json()["dispatch_policy"] == {
        "targets": [{"type": "webhook", "url": "https://hooks.example.com/pw"}]
    }
    wake_id = resp.json()["send_result"]["wake"]["id"]
    resp = await http.get(f"/v1/entities/{type_name}/{entity_id}", headers=alice)
    assert SECRET not in resp.text
    resp = await http.get(f"/v1/wakes/{wake_id}", headers=alice)
    assert resp.status_code == 200, resp.text
    assert SECRET not in resp.text
    assert resp.json()["target"] == {"type": "webhook", "url": "https://hooks.example.com/pw"}
    # entity created from the type default: the secret is stored, still not shown
    by_default = await create_entity(http, alice, entity_type=type_name)
    resp = await http.get(by_default.path, headers=alice)
    assert SECRET not in resp.text
    stored = await db.fetchval(
        "SELECT dispatch_policy FROM entities WHERE url = $1", by_default.url
    )
    assert json.loads(stored)["targets"][0]["secret"] == SECRET


async def test_get_wake(http, alice, world):
    sent = await send(http, alice, world.entity, "a")
    wake_id = sent["wake"]["id"]
    wake_event = await read_wake(http, alice, world.runner_id)
    resp = await http.get(f"/v1/wakes/{wake_id}", headers=alice)
    assert resp.status_code == 200, resp.text
    view = resp.json()
    assert view["id"] == wake_id
    assert view["entity_url"] == world.entity.url
    assert view["epoch"] == 1
    assert view["runner_id"] == world.runner_id
    assert view["target"] == {"type": "runner", "runner_id": world.runner_id}
    assert view["delivery_status"] == "delivered"
    assert view["claim_status"] == "unclaimed"
    assert view["stream_entry_id"] == wake_event.id
    assert view["reason"] == "message"

    note = await claim_ok(http, alice, world.runner_id, wake_id, wake_event.id)
    await done(http, note, 1)
    view = (await http.get(f"/v1/wakes/{wake_id}", headers=alice)).json()
    assert view["claim_status"] == "completed"
    assert view["claimed_at"] is not None
    assert view["resolved_at"] is not None

    resp = await http.get("/v1/wakes/wk_0000000000000000000000000000", headers=alice)
    assert_problem(resp, 404, "NOT_FOUND")
    resp = await http.get("/v1/wakes/not-a-wake", headers=alice)
    body = assert_problem(resp, 400, "INVALID_REQUEST")
    assert "wake_id" in body["detail"]
    resp = await http.get(f"/v1/wakes/{wake_id}")
    assert_problem(resp, 401, "UNAUTHORIZED")


async def test_message_paging(http, alice, world):
    for i in range(1, 6):
        await send(http, alice, world.entity, {"i": i})
    path = f"{world.entity.path}/messages"

    resp = await http.get(path, params={"limit": 2}, headers=alice)
    assert resp.status_code == 200, resp.text
    page = resp.json()
    assert [m["offset"] for m in page["messages"]] == [1, 2]
    assert [m["payload"] for m in page["messages"]] == [{"i": 1}, {"i": 2}]
    assert page["messages"][0]["sender"] == ALICE
    assert (page["next_after"], page["tail_offset"], page["more"]) == (2, 5, True)

    page = (await http.get(path, params={"after": 2, "limit": 3}, headers=alice)).json()
    assert [m["offset"] for m in page["messages"]] == [3, 4, 5]
    assert (page["next_after"], page["more"]) == (5, False)

    page = (await http.get(path, params={"after": 5}, headers=alice)).json()
    assert (page["messages"], page["next_after"], page["more"]) == ([], 5, False)
    page = (await http.get(path, headers=alice)).json()
    assert len(page["messages"]) == 5
    assert page["more"] is False


async def test_message_paging_limits(http, alice, world, settings):
    path = f"{world.entity.path}/messages"
    too_big = settings.page_limit_max + 1
    resp = await http.get(path, params={"limit": too_big}, headers=alice)
    body = assert_problem(resp, 400, "INVALID_REQUEST")
    assert "limit" in body["detail"]
    resp = await http.get(f"{world.entity.path}/events", params={"limit": too_big}, headers=alice)
    assert_problem(resp, 400, "INVALID_REQUEST")
    for params in ({"limit": 0}, {"limit": 10**9}, {"after": -1}, {"limit": "ten"}):
        resp = await http.get(path, params=params, headers=alice)
        body = assert_problem(resp, 400, "INVALID_REQUEST")
        assert next(iter(params)) in body["detail"], body
    resp = await http.get(f"/v1/entities/t/{uid('none')}/messages", headers=alice)
    assert_problem(resp, 404, "NOT_FOUND")
    resp = await http.get(f"/v1/entities/t/{uid('none')}/events", headers=alice)
    assert_problem(resp, 404, "NOT_FOUND")


async def test_messages_readable_with_the_claim_token(http, alice, world):
    other = await create_entity(http, alice, world.runner_id)
    for i in range(3):
        await send(http, alice, world.entity, i)
    sent = await send(http, alice, other, "other")
    mine = await claim_ok(
        http, alice, world.runner_id, (await _outstanding(http, alice, world.entity))
    )
    theirs = await claim_ok(http, alice, world.runner_id, sent["wake"]["id"])

    resp = await http.get(
        f"{world.entity.path}/messages",
        params={"after": 1},
        headers=bearer(mine["claim_token"]),
    )
    assert resp.status_code == 200, resp.text
    assert [m["payload"] for m in resp.json()["messages"]] == [1, 2]

    resp = await http.get(f"{world.entity.path}/messages", headers=bearer(theirs["claim_token"]))
    body = assert_problem(resp, 403, "FORBIDDEN")
    assert world.entity.url in body["detail"]

    # once the claim is over its token no longer reads the inbox
    await done(http, mine, 3)
    resp = await http.get(f"{world.entity.path}/messages", headers=bearer(mine["claim_token"]))
    assert_problem(resp, 409, "FENCED")


async def _outstanding(http, headers, entity) -> str:
    view = (await http.get(entity.path, headers=headers)).json()
    return str(view["dispatch"]["outstanding_wake_id"])
