"""Malformed requests get a 400/404/405/413 problem+json that names what is wrong, never a 500."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from pullwake.config import Settings

from .helpers import assert_problem, claim_ok, send

MAX_BODY = 4096


@pytest.fixture
def server_settings(settings: Settings) -> Settings:
    return settings.with_(max_body_bytes=MAX_BODY)


async def _check(http, headers, cases, status, code):
    """Each case is (method, path, kwargs, words the detail must mention)."""
    for method, path, kwargs, words in cases:
        where = f"{method} {path} {kwargs}"
        resp = await http.request(method, path, headers=headers, **kwargs)
        assert resp.status_code == status, (where, resp.status_code, resp.text)
        body = assert_problem(resp, status, code)
        for word in words:
            assert word in body["detail"], (where, word, body)


async def test_unknown_fields_are_named(http, alice, world):
    e = world.entity.path
    cases = [
        ("POST", "/v1/runners", {"json": {"id": "r-1", "colour": "red"}}, ["colour"]),
        ("POST", f"{e}/messages", {"json": {"payload": 1, "priority": 9}}, ["priority"]),
        ("PUT", f"{e}", {"json": {"policy": {}}}, ["policy"]),
        ("POST", f"{e}/signal", {"json": {"signal": "pause", "force": True}}, ["force"]),
        ("PUT", "/v1/entity-types/t1", {"json": {"default": None}}, ["default"]),
        (
            "POST",
            f"/v1/runners/{world.runner_id}/heartbeat",
            {"json": {"lease": 1000}},
            ["lease"],
        ),
        (
            "POST",
            f"/v1/runners/{world.runner_id}/claim",
            {"json": {"wake_id": "wk_00", "extra": 1}},
            ["extra"],
        ),
        (
            "PUT",
            "/v1/entities/t/e2",
            {
                "json": {
                    "dispatch_policy": {
                        "targets": [{"type": "runner", "runner_id": "r", "weight": 1}]
                    }
                }
            },
            ["weight"],
        ),
    ]
    await _check(http, alice, cases, 400, "INVALID_REQUEST")


async def test_wrong_types_and_values_are_named(http, alice, world):
    e = world.entity.path
    r = f"/v1/runners/{world.runner_id}"
    cases = [
        ("POST", "/v1/runners", {"json": {"id": 5}}, ["id"]),
        ("POST", "/v1/runners", {"json": {"id": "r-1", "kind": "mainframe"}}, ["kind"]),
        ("POST", "/v1/runners", {"json": {"id": "r-1", "label": "x" * 201}}, ["label"]),
        ("POST", "/v1/runners", {"json": ["r-1"]}, ["object"]),
        (
            "POST",
            f"{e}/messages",
            {"json": {"payload": 1, "idempotency_key": 7}},
            ["idempotency_key"],
        ),
        (
            "POST",
            f"{e}/messages",
            {"json": {"payload": 1, "idempotency_key": ""}},
            ["idempotency_key"],
        ),
        ("POST", f"{e}/signal", {"json": {"signal": "explode"}}, ["signal"]),
        ("POST", f"{e}/signal", {"json": {}}, ["signal"]),
        ("POST", f"{r}/heartbeat", {"json": {"lease_ms": "soon"}}, ["lease_ms"]),
        ("POST", f"{r}/heartbeat", {"json": {"diagnostics": [1, 2]}}, ["diagnostics"]),
        ("POST", f"{r}/claim", {"json": {"wake_id": ""}}, ["wake_id"]),
        ("POST", f"{r}/claim", {"json": {}}, ["wake_id"]),
        ("PUT", e, {"json": {"tags": {"k": 1}}}, ["tags"]),
        ("PUT", e, {"json": {"dispatch_policy": {"targets": []}}}, ["targets"]),
        (
            "PUT",
            "/v1/entities/t/e3",
            {"json": {"dispatch_policy": {"targets": [{"type": "carrier-pigeon"}]}}},
            ["type"],
        ),
        (
            "PUT",
            "/v1/entities/t/e3",
            {"json": {"dispatch_policy": {"targets": [{"type": "webhook", "url": "ftp://x.y/z"}]}}},
            ["url"],
        ),
    ]
    await _check(http, alice, cases, 400, "INVALID_REQUEST")


async def test_claim_callback_bodies_are_validated(http, alice, world):
    sent = await send(http, alice, world.entity, "a")
    note = await claim_ok(http, alice, world.runner_id, sent["wake"]["id"])
    token = {"Authorization": f"Bearer {note['claim_token']}"}
    c = f"/v1/claims/{note['claim_id']}"
    cases = [
        ("POST", f"{c}/done", {"json": {"epoch": "one", "acked_offset": 1}}, ["epoch"]),
        ("POST", f"{c}/done", {"json": {"epoch": "1", "acked_offset": 1}}, ["epoch"]),
        ("POST", f"{c}/done", {"json": {"epoch": 1, "acked_offset": "1"}}, ["acked_offset"]),
        ("POST", f"{c}/done", {"json": {"epoch": 0, "acked_offset": 1}}, ["epoch"]),
        ("POST", f"{c}/done", {"json": {"epoch": 1, "acked_offset": -1}}, ["acked_offset"]),
        ("POST", f"{c}/done", {"json": {"epoch": 1}}, ["acked_offset"]),
        ("POST", f"{c}/heartbeat", {"json": {"epoch": 1, "lease_ms": 5}}, ["lease_ms"]),
        ("POST", f"{c}/release", {"json": {"epoch": 1, "error": "x" * 2001}}, ["error"]),
        ("POST", f"{world.entity.path}/events", {"json": {"payload": 1, "epoch": 0}}, ["epoch"]),
        ("POST", f"{world.entity.path}/events", {"json": {"epoch": 1}}, ["payload"]),
    ]
    await _check(http, token, cases, 400, "INVALID_REQUEST")
    # the claim was untouched by any of them
    resp = await http.post(f"{c}/done", json={"epoch": 1, "acked_offset": 1}, headers=token)
    assert resp.json() == {"ok": True, "next_wake": False}


async def test_bad_ids_in_path_and_body(http, alice, world):
    long_id = "a" * 129
    cases = [
        ("GET", "/v1/runners/-leading-dash", {}, ["runner_id"]),
        ("GET", f"/v1/runners/{long_id}", {}, ["runner_id"]),
        ("GET", "/v1/runners/has%20space", {}, ["runner_id"]),
        ("GET", "/v1/entities/t/bad%21id", {}, ["entity_id"]),
        ("GET", "/v1/entities/.t/e", {}, ["type_name"]),
        ("PUT", "/v1/entity-types/-x", {"json": {}}, ["name"]),
        (
            "POST",
            "/v1/claims/not-a-claim/done",
            {"json": {"epoch": 1, "acked_offset": 0}},
            ["claim_id"],
        ),
        ("GET", "/v1/wakes/wk_XYZ", {}, ["wake_id"]),
        ("POST", "/v1/runners", {"json": {"id": "-x"}}, ["id"]),
        ("POST", "/v1/runners", {"json": {"id": long_id}}, ["id"]),
        ("POST", "/v1/runners", {"json": {"id": "ok\n"}}, ["id"]),
        (
            "PUT",
            "/v1/entities/t/e4",
            {"json": {"dispatch_policy": {"targets": [{"type": "runner", "runner_id": "bad id"}]}}},
            ["runner_id"],
        ),
        (
            "POST",
            f"/v1/runners/{world.runner_id}/claim",
            {"json": {"wake_id": "wk_1", "entry_id": "abc"}},
            ["entry_id"],
        ),
    ]
    await _check(http, alice, cases, 400, "INVALID_REQUEST")


async def test_non_json_and_missing_bodies(http, alice, world):
    json_type = {"Content-Type": "application/json"}
    e = world.entity.path
    cases = [
        ("POST", "/v1/runners", {"content": b"not json", "headers": json_type}, ["JSON"]),
        ("POST", f"{e}/messages", {"content": b'{"payload": ', "headers": json_type}, []),
        ("PUT", e, {"content": b"\xff\xfe", "headers": json_type}, []),
        ("POST", "/v1/runners", {}, []),
        ("POST", f"{e}/messages", {}, []),
        ("POST", f"{e}/signal", {}, []),
        ("POST", f"/v1/runners/{world.runner_id}/claim", {}, []),
    ]
    for method, path, kwargs, words in cases:
        headers = {**alice, **kwargs.pop("headers", {})}
        resp = await http.request(method, path, headers=headers, **kwargs)
        body = assert_problem(resp, 400, "INVALID_REQUEST")
        for word in words:
            assert word in body["detail"], (method, path, body)


async def test_missing_body_detail_names_the_body(http, alice, world):
    resp = await http.post(f"{world.entity.path}/messages", headers=alice)
    body = assert_problem(resp, 400, "INVALID_REQUEST")
    assert "body" in body["detail"].lower(), body


async def test_oversized_bodies_are_413(http, alice, world, db):
    big = {"payload": "x" * (MAX_BODY + 100)}
    resp = await http.post(f"{world.entity.path}/messages", json=big, headers=alice)
    body = assert_problem(resp, 413, "PAYLOAD_TOO_LARGE")
    assert body["detail"]

    resp = await http.put(
        f"/v1/entities/t/{'big'}", json={"tags": {"k": "v"}, "initial_message": big}, headers=alice
    )
    assert_problem(resp, 413, "PAYLOAD_TOO_LARGE")

    async def chunks() -> AsyncIterator[bytes]:
        yield b'{"payload": "'
        for _ in range(10):
            yield b"y" * 1000
        yield b'"}'

    resp = await http.post(
        f"{world.entity.path}/messages",
        content=chunks(),
        headers={**alice, "Content-Type": "application/json"},
    )
    assert_problem(resp, 413, "PAYLOAD_TOO_LARGE")
    assert await db.fetchval("SELECT count(*) FROM inbox_messages") == 0
    # a body just under the limit is fine
    sent = await send(http, alice, world.entity, "z" * (MAX_BODY - 200))
    assert sent["offset"] == 1


async def test_unknown_paths_and_wrong_methods(http, alice, world):
    for path in ("/v1/nope", "/v1/runners/r/x/y", "/nothing", "/v2/runners"):
        resp = await http.get(path, headers=alice)
        assert_problem(resp, 404, "NOT_FOUND")
    for method, path in (
        ("DELETE", "/v1/runners"),
        ("PUT", f"/v1/runners/{world.runner_id}"),
        ("GET", f"/v1/runners/{world.runner_id}/claim"),
        ("POST", world.entity.path),
        ("DELETE", f"{world.entity.path}/messages"),
        ("GET", "/v1/claims/wk_0123456789abcdef/done"),
        ("POST", "/healthz"),
    ):
        resp = await http.request(method, path, headers=alice)
        body = assert_problem(resp, 405)
        assert body["code"] == "METHOD_NOT_ALLOWED", body
