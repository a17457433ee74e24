"""Text Postgres cannot store (NUL, lone UTF-16 surrogates) is a 400 naming the field, never a
500; free text the runner itself produces (release ``error``, heartbeat ``diagnostics``) is
cleaned and kept instead."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import asyncpg
import httpx
import pytest
from litestar.testing import AsyncTestClient

from pullwake.http import create_app

from .conftest import World
from .helpers import assert_problem, bearer, claim_ok, runner_policy, send, uid

NUL = "\u0000"
SURROGATE = "\ud800"
REPLACEMENT = "\ufffd"
SECRET = "s" * 20


def _webhook(url: str = "https://hooks.example.com/x", secret: str = SECRET) -> dict[str, Any]:
    return {"targets": [{"type": "webhook", "url": url, "secret": secret}]}


# name: (route kind, body with {bad} where the bad text goes, the field the 400 must name)
REJECTED: dict[str, tuple[str, Any, str]] = {
    "payload value": ("send", {"payload": {"a": {"b": "x{bad}y"}}}, "payload.a.b"),
    "payload key": ("send", {"payload": {"a": {"k{bad}": 1}}}, "payload.a"),
    "payload in a list": ("send", {"payload": {"a": [1, "{bad}"]}}, "payload.a[1]"),
    "initial_message": (
        "create",
        {"initial_message": {"payload": {"m": "{bad}"}}},
        "initial_message.payload.m",
    ),
    "idempotency_key": ("send", {"payload": 1, "idempotency_key": "k{bad}"}, "idempotency_key"),
    "tag key": ("create", {"tags": {"t{bad}": "v"}}, "tags"),
    "tag value": ("create", {"tags": {"t": "v{bad}"}}, "tags.t"),
    "runner label": ("runner", {"label": "lab{bad}el"}, "label"),
    "webhook url": (
        "create",
        {"dispatch_policy": _webhook(url="https://hooks.example.com/{bad}")},
        "dispatch_policy.targets[0].url",
    ),
    "webhook secret": (
        "create",
        {"dispatch_policy": _webhook(secret=SECRET + "{bad}")},
        "dispatch_policy.targets[0].secret",
    ),
    "entity-type policy": (
        "entity_type",
        {"default_dispatch_policy": _webhook(url="https://hooks.example.com/{bad}")},
        "default_dispatch_policy.targets[0].url",
    ),
    "claim wake_id": ("claim", {"wake_id": "wk_{bad}"}, "wake_id"),
    "event payload": ("event", {"payload": {"out": "{bad}"}}, "payload.out"),
}
# Tables whose rows must not change when a request is refused (tokens are touched on use).
WATCHED = [
    "runners",
    "runner_liveness",
    "entity_types",
    "entities",
    "inbox_messages",
    "entity_events",
    "dispatch_state",
    "wakes",
    "claims",
]


@pytest.fixture
def server_settings(settings):
    return settings.with_(webhook_allow_private=True)


@dataclass
class Claimed:
    """A world whose entity has an active claim."""

    world: World
    note: dict[str, Any]

    @property
    def token(self) -> dict[str, str]:
        return bearer(self.note["claim_token"])


@pytest.fixture
async def claimed(http, alice, world) -> Claimed:
    sent = await send(http, alice, world.entity, {"n": 1})
    return Claimed(world, await claim_ok(http, alice, world.runner_id, sent["wake"]["id"]))


def _fill(template: Any, bad: str) -> Any:
    """``template`` with every ``{bad}`` replaced by ``bad`` (keys and values)."""
    if isinstance(template, dict):
        return {_fill(k, bad): _fill(v, bad) for k, v in template.items()}
    if isinstance(template, list):
        return [_fill(v, bad) for v in template]
    return template.replace("{bad}", bad) if isinstance(template, str) else template


def _request(kind: str, c: Claimed, alice: dict[str, str]) -> tuple[str, str, dict[str, str]]:
    w = c.world
    return {
        "send": ("POST", f"{w.entity.path}/messages", alice),
        "create": ("PUT", f"/v1/entities/{uid('t')}/{uid('e')}", alice),
        "runner": ("POST", "/v1/runners", alice),
        "entity_type": ("PUT", f"/v1/entity-types/{uid('t')}", alice),
        "claim": ("POST", f"/v1/runners/{w.runner_id}/claim", alice),
        "event": ("POST", f"{w.entity.path}/events", c.token),
    }[kind]


async def _post_raw(
    http: httpx.AsyncClient, method: str, path: str, headers: dict[str, str], body: Any
) -> httpx.Response:
    # json.dumps escapes as \uXXXX, so a lone surrogate travels as JSON text (httpx would
    # encode it as UTF-8 and fail on the client side).
    content = json.dumps(body).encode()
    headers = {**headers, "Content-Type": "application/json"}
    return await http.request(method, path, content=content, headers=headers)


async def _snapshot(db: asyncpg.Connection) -> dict[str, str]:
    rows = {}
    for table in WATCHED:
        rows[table] = await db.fetchval(
            f"SELECT md5(coalesce(string_agg(t::text, ',' ORDER BY t::text), '')) FROM {table} t"
        )
    return rows


@pytest.mark.parametrize("bad", [NUL, SURROGATE, "\udfff"], ids=["nul", "high", "low"])
@pytest.mark.parametrize("name", list(REJECTED))
async def test_unstorable_text_is_400_naming_the_field(http, alice, claimed, db, name, bad):
    kind, template, field = REJECTED[name]
    body = _fill(template, bad)
    method, path, headers = _request(kind, claimed, alice)
    if kind == "runner":
        body["id"] = claimed.world.runner_id
    if kind == "create" and "dispatch_policy" not in body:
        body["dispatch_policy"] = runner_policy(claimed.world.runner_id)
    before = await _snapshot(db)
    resp = await _post_raw(http, method, path, headers, body)
    problem = assert_problem(resp, 400, "INVALID_REQUEST", where=name)
    assert field in problem["detail"], (name, problem)
    assert {"key": field, "source": "body"}.items() <= problem["errors"][0].items(), problem
    assert problem["errors"][0]["message"], problem
    assert await _snapshot(db) == before, name


@pytest.mark.parametrize("bad", [NUL, SURROGATE], ids=["nul", "surrogate"])
async def test_release_error_is_cleaned_and_kept(http, claimed, db, bad):
    c = claimed
    error = f"command exited with status 1: bad{bad}output"
    path = f"/v1/claims/{c.note['claim_id']}/release"
    resp = await _post_raw(http, "POST", path, c.token, {"epoch": 1, "error": error})
    assert resp.status_code == 200, resp.text
    assert resp.json()["ok"] is True
    stored = await db.fetchval("SELECT last_error FROM claims WHERE id = $1", c.note["claim_id"])
    assert stored == f"command exited with status 1: bad{REPLACEMENT}output"


@pytest.mark.parametrize("bad", [NUL, SURROGATE], ids=["nul", "surrogate"])
async def test_heartbeat_diagnostics_are_cleaned_and_kept(http, alice, world, db, bad):
    diagnostics = {"status": f"ok{bad}", "last_error": f"x{bad}y", "tags": [f"a{bad}"]}
    resp = await _post_raw(
        http,
        "POST",
        f"/v1/runners/{world.runner_id}/heartbeat",
        alice,
        {"diagnostics": diagnostics},
    )
    assert resp.status_code == 200, resp.text
    stored = json.loads(
        await db.fetchval(
            "SELECT diagnostics FROM runner_liveness WHERE runner_id = $1", world.runner_id
        )
    )
    assert stored == {
        "status": f"ok{REPLACEMENT}",
        "last_error": f"x{REPLACEMENT}y",
        "tags": [f"a{REPLACEMENT}"],
    }


async def test_query_and_path_parameters_with_nul_are_400(http, alice, claimed, db):
    w, claim_id = claimed.world, claimed.note["claim_id"]
    cases = [
        ("GET", f"/v1/runners/{w.runner_id}/wakes", {"session": "s\x00"}, "session"),
        ("GET", f"{w.entity.path}/messages", {"after": "\x00"}, "after"),
        ("GET", f"{w.entity.path}/events", {"limit": "1\x00"}, "limit"),
        ("GET", "/v1/runners/r%00x", {}, "runner_id"),
        ("GET", "/v1/entities/t%00/e", {}, "type_name"),
        ("GET", "/v1/wakes/wk_%00", {}, "wake_id"),
        ("POST", f"/v1/claims/{claim_id}%00/heartbeat", {}, "claim_id"),
    ]
    before = await _snapshot(db)
    for method, path, params, field in cases:
        body = {"epoch": 1} if method == "POST" else None
        resp = await http.request(method, path, params=params, json=body, headers=alice)
        problem = assert_problem(resp, 400, "INVALID_REQUEST", where=f"{path} {params}")
        assert field in problem["detail"], (path, problem)
    assert await _snapshot(db) == before


async def test_credentials_with_nul_are_401(settings, db):
    app = create_app(settings.with_(dev_asserted_auth=True))
    # The test client speaks ASGI directly: no HTTP parser drops the NUL before the app sees it.
    async with AsyncTestClient(app) as client:
        for headers in (
            {"Authorization": "Bearer pwk_abc\x00def"},
            {"Authorization": "Bearer pwc_abc\x00def"},
            {"X-Pullwake-Asserted-Email": "eve\x00@example.com"},
        ):
            resp = await client.post("/v1/runners", json={"id": uid("r")}, headers=headers)
            assert resp.status_code == 401, (headers, resp.text)
            assert resp.json()["code"] == "UNAUTHORIZED"
    assert await db.fetchval("SELECT count(*) FROM runners") == 0
