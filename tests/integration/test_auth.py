"""Authentication: API tokens, claim tokens, dev asserted identity and a host hook."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator

import httpx

from pullwake.config import Settings
from pullwake.http import create_app
from pullwake.model import Principal
from pullwake.testing import serve_in_background

from .helpers import (
    ALICE,
    append_event,
    assert_problem,
    bearer,
    claim_ok,
    create_entity,
    done,
    heartbeat,
    release,
    send,
    uid,
)

ASSERTED = "X-Pullwake-Asserted-Email"

API_ENDPOINTS = [
    ("GET", "/v1/runners", None),
    ("POST", "/v1/runners", {"id": "r1"}),
    ("GET", "/v1/runners/r1", None),
    ("GET", "/v1/runners/r1/wakes", None),
    ("POST", "/v1/runners/r1/claim", {"wake_id": "wk_0000000000000000000000000000"}),
    ("PUT", "/v1/entity-types/t", {}),
    ("PUT", "/v1/entities/t/e", {}),
    ("GET", "/v1/entities/t/e", None),
    ("POST", "/v1/entities/t/e/messages", {"payload": 1}),
    ("GET", "/v1/entities/t/e/messages", None),
    ("GET", "/v1/entities/t/e/events", None),
    ("POST", "/v1/entities/t/e/signal", {"signal": "pause"}),
    ("GET", "/v1/wakes/wk_0000000000000000000000000000", None),
]


def _kwargs(body):
    return {} if body is None else {"json": body}


@contextlib.asynccontextmanager
async def _server(settings: Settings, **app_kwargs) -> AsyncIterator[httpx.AsyncClient]:
    app = create_app(settings, **app_kwargs)
    async with (
        serve_in_background(app) as base_url,
        httpx.AsyncClient(base_url=base_url, timeout=10) as client,
    ):
        yield client


async def test_no_credentials_is_unauthorized(http, db):
    for method, path, body in API_ENDPOINTS:
        resp = await http.request(method, path, **_kwargs(body))
        problem = assert_problem(resp, 401, "UNAUTHORIZED", f"{method} {path}")
        assert "credentials" in problem["detail"], problem
    assert await db.fetchval("SELECT count(*) FROM runners") == 0
    assert await db.fetchval("SELECT count(*) FROM entity_types") == 0


async def test_bad_or_unknown_credentials_are_unauthorized(http, db):
    for header in (
        "Basic YWxpY2U6cHc=",
        "Bearer",
        "Bearer pwk_unknown-token",
        "Bearer not-a-pullwake-token",
        "pwk_without-scheme",
    ):
        for method, path, body in API_ENDPOINTS[:2]:
            resp = await http.request(
                method, path, headers={"Authorization": header}, **_kwargs(body)
            )
            assert_problem(resp, 401, "UNAUTHORIZED", f"{header!r} {method} {path}")
    assert await db.fetchval("SELECT count(*) FROM runners") == 0


async def test_revoked_token_is_unauthorized(api, http, db):
    headers = await api.as_(ALICE)
    assert (await http.get("/v1/runners", headers=headers)).status_code == 200
    await db.execute("UPDATE principals_tokens SET revoked_at = now()")
    resp = await http.get("/v1/runners", headers=headers)
    body = assert_problem(resp, 401, "UNAUTHORIZED")
    assert "revoked" in body["detail"]


async def test_token_use_is_recorded(api, http, db):
    headers = await api.as_(ALICE)
    assert await db.fetchval("SELECT last_used_at FROM principals_tokens") is None
    await http.get("/v1/runners", headers=headers)
    assert await db.fetchval("SELECT last_used_at FROM principals_tokens") is not None
    assert (
        await db.fetchval("SELECT count(*) FROM principals_tokens WHERE token_hash LIKE 'pwk_%'")
        == 0
    )


async def test_claim_token_is_refused_on_api_endpoints(http, alice, world, db):
    sent = await send(http, alice, world.entity, "a")
    note = await claim_ok(http, alice, world.runner_id, sent["wake"]["id"])
    token = bearer(note["claim_token"])
    for method, raw_path, body in API_ENDPOINTS:
        path = raw_path.replace("/r1", f"/{world.runner_id}")
        if method == "GET" and path.endswith(("/messages", "/events")):
            continue  # readable with the entity's claim token (see test_auth_matrix)
        resp = await http.request(method, path, headers=token, **_kwargs(body))
        problem = assert_problem(resp, 401, "UNAUTHORIZED", f"{method} {path}")
        assert "claim token" in problem["detail"], problem
    assert await db.fetchval("SELECT count(*) FROM runners") == 1
    assert await db.fetchval("SELECT status FROM entities") == "running"


async def test_api_token_is_refused_on_claim_callbacks(http, alice, world, db):
    sent = await send(http, alice, world.entity, "a")
    note = await claim_ok(http, alice, world.runner_id, sent["wake"]["id"])
    forged = {**note, "claim_token": alice["Authorization"].removeprefix("Bearer ")}

    for resp in (
        await heartbeat(http, forged),
        await done(http, forged, 1),
        await release(http, forged),
        await append_event(http, world.entity, forged["claim_token"], "x"),
    ):
        body = assert_problem(resp, 401, "UNAUTHORIZED")
        assert "pwc_" in body["detail"]
    resp = await http.post(
        f"/v1/claims/{note['claim_id']}/done", json={"epoch": 1, "acked_offset": 1}
    )
    assert_problem(resp, 401, "UNAUTHORIZED")
    assert await db.fetchval("SELECT status FROM claims") == "active"


async def test_unknown_claim_token_on_callbacks(http, alice, world, db):
    sent = await send(http, alice, world.entity, "a")
    note = await claim_ok(http, alice, world.runner_id, sent["wake"]["id"])
    forged = {**note, "claim_token": "pwc_not-a-real-token"}
    assert_problem(await done(http, forged, 1), 403, "FORBIDDEN")
    assert_problem(await heartbeat(http, forged), 403, "FORBIDDEN")
    resp = await append_event(http, world.entity, forged["claim_token"], "x")
    assert_problem(resp, 409, "FENCED")
    missing = {**note, "claim_id": "wk_0000000000000000000000000000"}
    assert_problem(await done(http, missing, 1), 404, "NOT_FOUND")
    assert await db.fetchval("SELECT status FROM claims") == "active"


async def test_another_claims_token_is_forbidden(http, alice, world, db):
    other = await create_entity(http, alice, world.runner_id)
    a = await send(http, alice, world.entity, "a")
    b = await send(http, alice, other, "b")
    mine = await claim_ok(http, alice, world.runner_id, a["wake"]["id"])
    theirs = await claim_ok(http, alice, world.runner_id, b["wake"]["id"])
    crossed = {**mine, "claim_token": theirs["claim_token"]}

    for resp in (
        await done(http, crossed, 1),
        await heartbeat(http, crossed),
        await release(http, crossed),
        await append_event(http, world.entity, theirs["claim_token"], "x"),
    ):
        assert_problem(resp, 403, "FORBIDDEN")
    rows = await db.fetch("SELECT status FROM claims")
    assert [r["status"] for r in rows] == ["active", "active"]
    assert await db.fetchval("SELECT count(*) FROM entity_events") == 0
    assert await db.fetchval("SELECT sum(acked_offset) FROM dispatch_state") == 0


async def test_dev_asserted_identity(settings, db):
    async with _server(settings.with_(dev_asserted_auth=True)) as client:
        bob_runner = uid("bob")
        resp = await client.post(
            "/v1/runners", json={"id": bob_runner}, headers={ASSERTED: "bob@example.com"}
        )
        assert resp.status_code == 201, resp.text
        assert resp.json()["owner_principal"] == "user:bob@example.com"

        local_runner = uid("local")
        resp = await client.post("/v1/runners", json={"id": local_runner})
        assert resp.status_code == 201, resp.text
        assert resp.json()["owner_principal"] == "system:dev-local"

        resp = await client.get("/v1/runners", headers={ASSERTED: "bob@example.com"})
        assert [r["id"] for r in resp.json()["runners"]] == [bob_runner]
        resp = await client.get(f"/v1/runners/{bob_runner}")
        assert_problem(resp, 403, "FORBIDDEN")

        resp = await client.get("/v1/runners", headers={ASSERTED: "not an email/x"})
        assert_problem(resp, 401, "UNAUTHORIZED")

    owners = dict(await db.fetch("SELECT id, owner_principal FROM runners"))
    assert owners == {bob_runner: "user:bob@example.com", local_runner: "system:dev-local"}


async def test_dev_asserted_headers_ignored_outside_dev_mode(http, settings, db):
    assert settings.dev_asserted_auth is False
    headers = {ASSERTED: "bob@example.com", "X-Pullwake-Asserted-Name": "Bob"}
    resp = await http.post("/v1/runners", json={"id": uid("r")}, headers=headers)
    assert_problem(resp, 401, "UNAUTHORIZED")
    resp = await http.get("/v1/runners", headers=headers)
    assert_problem(resp, 401, "UNAUTHORIZED")
    assert await db.fetchval("SELECT count(*) FROM runners") == 0


async def test_host_authenticate_hook(settings, db):
    async def authenticate(request) -> Principal | None:
        user = request.headers.get("x-host-user")
        return Principal("service", user) if user else None

    async with _server(settings, authenticate=authenticate) as client:
        runner_id = uid("hosted")
        resp = await client.post(
            "/v1/runners", json={"id": runner_id}, headers={"X-Host-User": "billing"}
        )
        assert resp.status_code == 201, resp.text
        assert resp.json()["owner_principal"] == "service:billing"
        resp = await client.get(f"/v1/runners/{runner_id}", headers={"X-Host-User": "other"})
        assert_problem(resp, 403, "FORBIDDEN")
        # the hook returned None: normal authentication applies (and finds nothing)
        resp = await client.get("/v1/runners")
        assert_problem(resp, 401, "UNAUTHORIZED")
        resp = await client.get("/v1/runners", headers={ASSERTED: "bob@example.com"})
        assert_problem(resp, 401, "UNAUTHORIZED")
    assert await db.fetchval("SELECT owner_principal FROM runners") == "service:billing"
