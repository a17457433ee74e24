"""The authorization matrix: every ``/v1`` endpoint x every kind of caller ⇒ status and code.

Read a row left to right: the endpoint, then what each caller gets. A cell is ``"200"`` or
``"403 FORBIDDEN"``; a bare ``401``/``404`` means ``UNAUTHORIZED``/``NOT_FOUND``. To cover a
new endpoint, add a row; to cover a new kind of caller, add a column to ``CALLERS`` and a cell
to every row.

Callers (alice owns the runner and created the entities; her claim ``C`` is active):

=============  =====================================================================
owner          alice's API token (``pwk_``)
other          bob's API token
none           no credentials
revoked        a revoked token of alice's
claim          the token of claim ``C`` (``pwc_``): right on C's callbacks, wrong elsewhere
other_claim    the token of another live claim of alice's, on another entity
asserted       ``X-Pullwake-Asserted-Email: alice@…`` with dev mode off (ignored ⇒ no creds)
dev_asserted   the same header with dev mode on (⇒ alice)
dev_none       no credentials with dev mode on (⇒ ``system:dev-local``, not the owner)
member         carol's API token: alice's entity grants her (``members``), nothing else does
=============  =====================================================================

Every row runs against a fresh world after any call that succeeded and could change state.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

import asyncpg
import httpx
import pytest

from pullwake.config import Settings
from pullwake.http import create_app
from pullwake.model import hash_token
from pullwake.testing import serve_in_background

from .helpers import (
    ALICE,
    BOB,
    CAROL,
    PROBLEM,
    bearer,
    claim_ok,
    create_entity,
    register_runner,
    runner_policy,
    send,
    uid,
)

CALLERS = (
    "owner",
    "other",
    "none",
    "revoked",
    "claim",
    "other_claim",
    "asserted",
    "dev_asserted",
    "dev_none",
    "member",
)
DEV_MODE_CALLERS = {"dev_asserted", "dev_none"}
DEFAULT_CODES = {401: "UNAUTHORIZED", 404: "NOT_FOUND"}
OWNER = FORBID = "403 FORBIDDEN"  # one code for every refusal on ownership
WEBHOOK = {"targets": [{"type": "webhook", "url": "https://hooks.example.com/pullwake"}]}

# Bodies are functions of the world: ids and epochs differ for every world.
# fmt: off
MATRIX: list[tuple[str, str, Callable[[Any], Any] | None, tuple[str, ...]]] = [
    # method, path, body,
    #   (owner, other, none, revoked, claim, other_claim, asserted, dev_asserted, dev_none,
    #    member)
    ("GET", "/v1/runners", None,
        ("200", "200", "401", "401", "401", "401", "401", "200", "200", "200")),
    ("POST", "/v1/runners", lambda w: {"id": w.runner},
        ("200", OWNER, "401", "401", "401", "401", "401", "200", OWNER, OWNER)),
    ("GET", "/v1/runners/{runner}", None,
        ("200", OWNER, "401", "401", "401", "401", "401", "200", OWNER, OWNER)),
    ("POST", "/v1/runners/{runner}/heartbeat", lambda w: {"lease_ms": 60_000},
        ("200", OWNER, "401", "401", "401", "401", "401", "200", OWNER, OWNER)),
    ("GET", "/v1/runners/{runner}/health", None,
        ("200", OWNER, "401", "401", "401", "401", "401", "200", OWNER, OWNER)),
    ("POST", "/v1/runners/{runner}/enable", None,
        ("200", OWNER, "401", "401", "401", "401", "401", "200", OWNER, OWNER)),
    ("POST", "/v1/runners/{runner}/disable", None,
        ("200", OWNER, "401", "401", "401", "401", "401", "200", OWNER, OWNER)),
    ("DELETE", "/v1/runners/{runner}", None,
        ("204", OWNER, "401", "401", "401", "401", "401", "204", OWNER, OWNER)),
    ("GET", "/v1/runners/{runner}/wakes", None,
        ("200", OWNER, "401", "401", "401", "401", "401", "200", OWNER, OWNER)),
    ("POST", "/v1/runners/{runner}/claim", lambda w: {"wake_id": w.wake},
        ("200", OWNER, "401", "401", "401", "401", "401", "200", OWNER, OWNER)),
    ("PUT", "/v1/entity-types/{new}", lambda w: {},
        ("201", "201", "401", "401", "401", "401", "401", "201", "201", "201")),
    ("PUT", "/v1/entity-types/{type}", lambda w: {},
        ("200", OWNER, "401", "401", "401", "401", "401", "200", OWNER, OWNER)),
    ("GET", "/v1/entity-types/{type}", None,
        ("200", OWNER, "401", "401", "401", "401", "401", "200", OWNER, OWNER)),
    ("PUT", "/v1/entities/{type}/{new}", lambda w: {"dispatch_policy": runner_policy(w.runner)},
        ("201", FORBID, "401", "401", "401", "401", "401", "201", FORBID, FORBID)),
    # an existing entity: only its members learn anything about it
    ("PUT", "/v1/entities/{type}/{entity}", lambda w: {"dispatch_policy": WEBHOOK},
        ("200", FORBID, "401", "401", "401", "401", "401", "200", FORBID, "200")),
    ("GET", "/v1/entities/{type}/{entity}", None,
        ("200", FORBID, "401", "401", "401", "401", "401", "200", FORBID, "200")),
    ("POST", "/v1/entities/{type}/{entity}/messages", lambda w: {"payload": {"n": 1}},
        ("202", FORBID, "401", "401", "401", "401", "401", "202", FORBID, "202")),
    # a batch is never refused for its items: each gets its own answer (see test_batch_send)
    ("POST", "/v1/messages", lambda w: {"messages": [{"entity": w.url, "payload": 1}]},
        ("200", "200", "401", "401", "401", "401", "401", "200", "200", "200")),
    ("GET", "/v1/entities/{type}/{entity}/messages", None,
        ("200", FORBID, "401", "401", "200", FORBID, "401", "200", FORBID, "200")),
    ("POST", "/v1/entities/{type}/{entity}/events", lambda w: {"payload": 1, "epoch": w.epoch},
        ("401", "401", "401", "401", "201", FORBID, "401", "401", "401", "401")),
    ("GET", "/v1/entities/{type}/{entity}/events", None,
        ("200", FORBID, "401", "401", "200", FORBID, "401", "200", FORBID, "200")),
    ("POST", "/v1/entities/{type}/{entity}/signal", lambda w: {"signal": "pause"},
        ("200", FORBID, "401", "401", "401", "401", "401", "200", FORBID, FORBID)),
    ("PUT", "/v1/entities/{type}/{entity}/members", lambda w: {"members": [CAROL, BOB]},
        ("200", FORBID, "401", "401", "401", "401", "401", "200", FORBID, FORBID)),
    ("POST", "/v1/claims/{claim}/heartbeat", lambda w: {"epoch": w.epoch},
        ("401", "401", "401", "401", "200", FORBID, "401", "401", "401", "401")),
    ("POST", "/v1/claims/{claim}/done", lambda w: {"epoch": w.epoch, "acked_offset": 1},
        ("401", "401", "401", "401", "200", FORBID, "401", "401", "401", "401")),
    ("POST", "/v1/claims/{claim}/release", lambda w: {"epoch": w.epoch},
        ("401", "401", "401", "401", "200", FORBID, "401", "401", "401", "401")),
    ("GET", "/v1/wakes/{claim}", None,
        ("200", FORBID, "401", "401", "401", "401", "401", "200", FORBID, "200")),
]
# fmt: on


@dataclass(frozen=True)
class Row:
    """One cell of the matrix: a call and what it must answer."""

    method: str
    path: str
    body: Callable[[Any], Any] | None
    caller: str
    status: int
    code: str | None

    def __str__(self) -> str:
        return f"{self.method} {self.path} as {self.caller}"


def _rows() -> list[Row]:
    rows = []
    for method, path, body, cells in MATRIX:
        assert len(cells) == len(CALLERS), (method, path)
        for caller, cell in zip(CALLERS, cells, strict=True):
            status, _, code = cell.partition(" ")
            rows.append(
                Row(method, path, body, caller, int(status), code or DEFAULT_CODES.get(int(status)))
            )
    return rows


ROWS = _rows()


@dataclass
class World:
    """Alice's runner, entity type and entities: claim C (and another claim) active, and an
    outstanding wake on a third entity. C's entity grants carol."""

    runner: str
    type: str
    entity: str
    claim: str
    epoch: int
    wake: str
    tokens: dict[str, str]

    @property
    def url(self) -> str:
        """Claim C's entity, as a batch item names it."""
        return f"/{self.type}/{self.entity}"


async def _build_world(
    http: httpx.AsyncClient, alice: dict[str, str], tokens: dict[str, str]
) -> World:
    runner = await register_runner(http, alice)
    entity_type = uid("mtype")
    assert (await http.put(f"/v1/entity-types/{entity_type}", json={}, headers=alice)).is_success
    mine = await create_entity(http, alice, runner, entity_type=entity_type, members=[CAROL])
    theirs = await create_entity(http, alice, runner, entity_type=entity_type)
    waiting = await create_entity(http, alice, runner, entity_type=entity_type)
    claim = await claim_ok(http, alice, runner, (await send(http, alice, mine, "m"))["wake"]["id"])
    other = await claim_ok(
        http, alice, runner, (await send(http, alice, theirs, "t"))["wake"]["id"]
    )
    wake = (await send(http, alice, waiting, "w"))["wake"]["id"]
    return World(
        runner=runner,
        type=entity_type,
        entity=mine.id,
        claim=claim["claim_id"],
        epoch=claim["epoch"],
        wake=wake,
        tokens={**tokens, "claim": claim["claim_token"], "other_claim": other["claim_token"]},
    )


def _headers(caller: str, world: World) -> dict[str, str]:
    if caller in ("none", "dev_none"):
        return {}
    if caller in ("asserted", "dev_asserted"):
        return {"X-Pullwake-Asserted-Email": ALICE.removeprefix("user:")}
    return bearer(world.tokens[caller])


async def _call(http: httpx.AsyncClient, row: Row, world: World) -> tuple[int, str | None]:
    path = row.path.format(
        runner=world.runner,
        type=world.type,
        entity=world.entity,
        claim=world.claim,
        new=uid("new"),
    )
    kwargs: dict[str, Any] = {"headers": _headers(row.caller, world)}
    if row.body is not None:
        kwargs["json"] = row.body(world)
    async with http.stream(row.method, path, **kwargs) as resp:
        if resp.status_code == 200 and path.endswith("/wakes"):
            assert resp.headers["content-type"].startswith("text/event-stream")
            return 200, None  # leave the stream at once
        await resp.aread()
    if resp.status_code < 400:
        return resp.status_code, None
    assert resp.headers["content-type"].split(";")[0] == PROBLEM, (str(row), resp.text)
    return resp.status_code, resp.json()["code"]


async def _check(http: httpx.AsyncClient, rows: list[Row], build: Callable[[], Any]) -> list[str]:
    """Run the rows; a fresh world after each call that succeeded and could change state."""
    mismatches = []
    world = await build()
    for row in rows:
        status, code = await _call(http, row, world)
        if (status, code) != (row.status, row.code):
            mismatches.append(f"{row}: expected {row.status} {row.code}, got {status} {code}")
        if status < 400 and row.method != "GET":
            world = await build()
    return mismatches


@pytest.fixture
async def tokens(api, db: asyncpg.Connection) -> dict[str, str]:
    revoked = await api.make_token(ALICE)
    await db.execute(
        "UPDATE principals_tokens SET revoked_at = now() WHERE token_hash = $1",
        hash_token(revoked),
    )
    return {
        "owner": await api.make_token(ALICE),
        "other": await api.make_token(BOB),
        "member": await api.make_token(CAROL),
        "revoked": revoked,
    }


async def test_auth_matrix_dev_mode_off(api, tokens) -> None:
    rows = [row for row in ROWS if row.caller not in DEV_MODE_CALLERS]
    alice = bearer(tokens["owner"])
    mismatches = await _check(api.http, rows, lambda: _build_world(api.http, alice, tokens))
    assert not mismatches, "\n".join(mismatches)


async def test_auth_matrix_dev_mode_on(api, tokens, settings: Settings) -> None:
    rows = [row for row in ROWS if row.caller in DEV_MODE_CALLERS]
    alice = bearer(tokens["owner"])
    async with _dev_server(settings) as dev_http:
        mismatches = await _check(dev_http, rows, lambda: _build_world(api.http, alice, tokens))
    assert not mismatches, "\n".join(mismatches)


def test_matrix_covers_every_v1_route() -> None:
    """A new route without a row here fails this test."""
    app = create_app(Settings(database_url="postgresql://unused", redis_url="redis://unused"))
    routes = {
        (method, route.path)
        for route in app.routes
        if route.path.startswith("/v1/")
        for method in getattr(route, "methods", ())
        if method not in ("OPTIONS", "HEAD")
    }
    covered = {(method, _template(path)) for method, path, _, _ in MATRIX}
    assert {(m, _template(p)) for m, p in routes} == covered


def _template(path: str) -> str:
    """``/v1/runners/{runner_id:str}`` and ``/v1/runners/{runner}`` both: ``/v1/runners/*``."""
    return "/".join("*" if part.startswith("{") else part for part in path.split("/"))


@contextlib.asynccontextmanager
async def _dev_server(settings: Settings) -> AsyncIterator[httpx.AsyncClient]:
    app = create_app(settings.with_(dev_asserted_auth=True))
    async with (
        serve_in_background(app) as base_url,
        httpx.AsyncClient(base_url=base_url, timeout=10) as client,
    ):
        yield client
