"""One shape for every ``errors[]`` item, whichever part of the server produced it; a bad
enum value names the valid ones; a reused idempotency key is 409 IDEMPOTENCY_MISMATCH on every
send path (single, batch, combined, an entity's initial message)."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from pullwake.config import Settings

from .helpers import assert_problem, create_entity, register_runner, runner_policy, uid

FIELD_ERROR_KEYS = {"message", "key", "source"}
SOURCES = {"body", "query", "path", "header", "cookie"}


@pytest.fixture
def server_settings(settings: Settings) -> Settings:
    return settings.with_(page_limit_max=50)


def _cases(world: Any) -> list[tuple[str, str, dict[str, Any], str, str]]:
    """(method, path, request kwargs, expected key, expected source): one per producer."""
    e = world.entity.path
    too_many = [{"entity": world.entity.url, "payload": n} for n in range(1001)]
    return [
        # the strict body decode (msgspec)
        ("POST", f"{e}/messages", {"json": {"payload": 1, "idempotency_key": 5}},
         "idempotency_key", "body"),
        # text Postgres cannot store
        ("POST", f"{e}/messages", {"json": {"payload": {"a": "x\u0000y"}}}, "payload.a", "body"),
        # a query parameter over the configured maximum
        ("GET", f"{e}/messages", {"params": {"limit": 1000}}, "limit", "query"),
        # Litestar's own parameter validation
        ("GET", f"{e}/messages", {"params": {"after": "soon"}}, "after", "query"),
        ("GET", "/v1/runners/-bad-", {}, "runner_id", "path"),
        # a refused webhook URL, named where the body holds it
        ("PUT", f"/v1/entities/{uid('t')}/{uid('e')}",
         {"json": {"dispatch_policy": {"targets": [{"type": "webhook", "url": "http://10.0.0.1/x"}]}}},
         "dispatch_policy.targets[0].url", "body"),
        ("PUT", f"/v1/entity-types/{uid('t')}",
         {"json": {"default_dispatch_policy": {"targets": [{"type": "webhook",
                                                            "url": "http://localhost/x"}]}}},
         "default_dispatch_policy.targets[0].url", "body"),
        # no dispatch policy to be had
        ("PUT", f"/v1/entities/{uid('t')}/{uid('e')}", {"json": {}}, "dispatch_policy", "body"),
        # a batch over PULLWAKE_MAX_BATCH
        ("POST", "/v1/messages", {"json": {"messages": too_many}}, "messages", "body"),
    ]  # fmt: skip


async def test_every_errors_item_has_one_shape(
    http, alice, world, server_settings: Settings
) -> None:
    assert server_settings.page_limit_max == 50  # so that a limit of 1000 is refused by pullwake
    for method, path, kwargs, key, source in _cases(world):
        where = f"{method} {path} {key}"
        resp = await http.request(method, path, headers=alice, **kwargs)
        body = assert_problem(resp, 400, "INVALID_REQUEST", where)
        assert body.get("errors"), (where, body)
        for item in body["errors"]:
            assert set(item) == FIELD_ERROR_KEYS, (where, item)
            assert item["source"] in SOURCES, (where, item)
            assert isinstance(item["message"], str), (where, item)
            assert item["message"], (where, item)
        assert (body["errors"][0]["key"], body["errors"][0]["source"]) == (key, source), (
            where,
            body,
        )


async def test_the_page_limit_error_has_the_same_shape(http, alice, world) -> None:
    resp = await http.get(f"{world.entity.path}/messages", params={"limit": 51}, headers=alice)
    body = assert_problem(resp, 400, "INVALID_REQUEST")
    assert body["errors"] == [{"message": "too large", "key": "limit", "source": "query"}]


async def test_a_bad_signal_lists_the_valid_ones(http, alice, world) -> None:
    resp = await http.post(f"{world.entity.path}/signal", json={"signal": "halt"}, headers=alice)
    body = assert_problem(resp, 400, "INVALID_REQUEST")
    assert "expected one of kill, pause, resume, stop" in body["detail"]
    assert body["errors"][0]["key"] == "signal"
    assert "kill, pause, resume, stop" in body["errors"][0]["message"]


async def test_a_bad_nested_enum_lists_the_valid_ones_too(http, alice) -> None:
    resp = await http.post("/v1/runners", json={"id": uid("r"), "kind": "laptop"}, headers=alice)
    body = assert_problem(resp, 400, "INVALID_REQUEST")
    assert "expected one of ci, cloud-worker, local, sandbox, server" in body["detail"]


async def _send(http, alice, world, payload: Any, key: str) -> Any:
    return await http.post(
        f"{world.entity.path}/messages",
        json={"payload": payload, "idempotency_key": key},
        headers=alice,
    )


async def test_a_reused_key_is_a_mismatch_on_every_send_path(api, http, alice, world, db) -> None:
    # single send
    assert (await _send(http, alice, world, 1, "k1")).status_code == 202
    assert_problem(await _send(http, alice, world, 2, "k1"), 409, "IDEMPOTENCY_MISMATCH")
    # batch send: against a stored message, and between two items of one batch
    resp = await http.post(
        "/v1/messages",
        json={
            "messages": [
                {"entity": world.entity.url, "payload": 3, "idempotency_key": "k1"},
                {"entity": world.entity.url, "payload": 4, "idempotency_key": "k2"},
                {"entity": world.entity.url, "payload": 5, "idempotency_key": "k2"},
            ]
        },
        headers=alice,
    )
    assert resp.status_code == 200, resp.text
    results = resp.json()["results"]
    assert [r.get("problem", {}).get("code") for r in results] == [
        "IDEMPOTENCY_MISMATCH",
        None,
        "IDEMPOTENCY_MISMATCH",
    ]
    assert {r["problem"]["status"] for r in (results[0], results[2])} == {409}
    # an entity's initial message, then a send reusing its key
    runner_id = await register_runner(http, alice)
    entity = await create_entity(
        http,
        alice,
        dispatch_policy=runner_policy(runner_id),
        initial_message={"payload": "first", "idempotency_key": "k0"},
    )
    resp = await http.post(
        f"{entity.path}/messages", json={"payload": "other", "idempotency_key": "k0"}, headers=alice
    )
    assert_problem(resp, 409, "IDEMPOTENCY_MISMATCH")
    # combined sends: concurrent sends share Postgres calls; one key, many payloads
    combiner = api.services.store.combiner(api.services.settings.max_attempts)
    before = combiner.combined
    answers = await asyncio.gather(*(_send(http, alice, world, n, "k9") for n in range(24)))
    statuses = sorted(a.status_code for a in answers)
    assert statuses == [202] + [409] * 23, statuses
    for answer in answers:
        if answer.status_code == 409:
            assert_problem(answer, 409, "IDEMPOTENCY_MISMATCH")
    assert combiner.combined > before, "no send went in a combined call"
    same = await asyncio.gather(*(_send(http, alice, world, "same", "k10") for _ in range(24)))
    assert {a.status_code for a in same} == {202}
    assert sum(not a.json()["duplicate"] for a in same) == 1
    assert len({a.json()["offset"] for a in same}) == 1
    assert (
        await db.fetchval(
            "SELECT count(*) FROM inbox_messages WHERE idempotency_key IN ('k9', 'k10')"
        )
        == 2
    )
