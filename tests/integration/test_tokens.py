"""Tokens: 32 random bytes behind a typed prefix, stored and looked up only as a SHA-256 hash,
never logged, and a revocation takes effect on the next request (an open wake stream ends
within one keep-alive interval). The CLI side (`pullwake tokens list|revoke`) is in
tests/e2e/test_processes.py."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import logging
import re
from collections.abc import AsyncIterator
from typing import Any

import asyncpg
import httpx
import pytest
import uvicorn

from pullwake.config import Settings
from pullwake.http import create_app
from pullwake.model import Principal, hash_token, new_claim_token
from pullwake.services import Services
from pullwake.testing import free_port

from .helpers import (
    ALICE,
    assert_problem,
    bearer,
    claim_next,
    claim_ok,
    create_entity,
    register_runner,
    send,
)
from .servers import serve

TOKEN_TEXT = re.compile(r"pw[kc]_[A-Za-z0-9_-]{16,}")
TABLES = (
    "principals_tokens",
    "runners",
    "runner_liveness",
    "entity_types",
    "entities",
    "dispatch_state",
    "inbox_messages",
    "entity_events",
    "wakes",
    "claims",
)


def _random_part(token: str, prefix: str) -> bytes:
    assert token.startswith(prefix), token
    body = token.removeprefix(prefix)
    return base64.urlsafe_b64decode(body + "=" * (-len(body) % 4))


async def test_tokens_are_32_random_bytes_with_a_typed_prefix(api) -> None:
    api_tokens = [await api.make_token(ALICE) for _ in range(20)]
    claim_tokens = [new_claim_token() for _ in range(20)]
    for token in api_tokens:
        assert len(_random_part(token, "pwk_")) == 32
    for token in claim_tokens:
        assert len(_random_part(token, "pwc_")) == 32
    assert len(set(api_tokens)) == len(set(claim_tokens)) == 20


async def test_tokens_are_stored_only_as_hashes(http, alice, world, db: asyncpg.Connection) -> None:
    api_token = alice["Authorization"].removeprefix("Bearer ")
    sent = await send(http, alice, world.entity, "x")
    note = await claim_ok(http, alice, world.runner_id, sent["wake"]["id"])
    claim_token = note["claim_token"]

    assert (
        await db.fetchval(
            "SELECT count(*) FROM principals_tokens WHERE token_hash = $1", hash_token(api_token)
        )
        == 1
    )
    assert await db.fetchval(
        "SELECT token_hash FROM claims WHERE id = $1", note["claim_id"]
    ) == hash_token(claim_token)
    assert await db.fetchval(
        "SELECT active_token_hash FROM dispatch_state WHERE entity_url = $1", world.entity.url
    ) == hash_token(claim_token)
    for table in TABLES:
        for row in await db.fetch(f"SELECT t::text AS text FROM {table} t"):
            assert api_token not in row["text"], table
            assert claim_token not in row["text"], table
            assert not TOKEN_TEXT.search(row["text"]), (table, row["text"])


async def test_tokens_are_looked_up_by_hash(api, http, db: asyncpg.Connection) -> None:
    """Whatever row holds the SHA-256 of the presented token authenticates it."""
    raw = "pwk_" + "a" * 43
    await db.execute(
        "INSERT INTO principals_tokens (id, principal, token_hash, label) "
        "VALUES ('tok_handmade', 'user:hand@example.com', $1, 'made by hand')",
        hash_token(raw),
    )
    resp = await http.get("/v1/runners", headers=bearer(raw))
    assert resp.status_code == 200, resp.text
    await db.execute(
        "UPDATE principals_tokens SET token_hash = $1 WHERE id = 'tok_handmade'",
        hash_token(raw + "x"),
    )
    assert_problem(await http.get("/v1/runners", headers=bearer(raw)), 401, "UNAUTHORIZED")
    assert (await http.get("/v1/runners", headers=bearer(raw + "x"))).status_code == 200


async def test_revocation_takes_effect_on_the_next_request(settings: Settings) -> None:
    async with serve(settings) as server:
        tokens = server.services.tokens
        raw, row = await tokens.create(Principal.parse(ALICE), "soon revoked")
        keep, _ = await tokens.create(Principal.parse(ALICE), "kept")
        assert (await server.http.get("/v1/runners", headers=bearer(raw))).status_code == 200

        revoked = await tokens.revoke(row.id)

        assert revoked.revoked_at is not None
        resp = await server.http.get("/v1/runners", headers=bearer(raw))
        assert "revoked" in assert_problem(resp, 401, "UNAUTHORIZED")["detail"]
        assert (await server.http.get("/v1/runners", headers=bearer(keep))).status_code == 200
        listed = {t.id: t for t in await tokens.list_tokens(ALICE)}
        assert listed[row.id].revoked_at is not None


async def test_revocation_ends_an_open_wake_stream(settings: Settings) -> None:
    async with serve(settings.with_(sse_keepalive_ms=200, sse_block_ms=50)) as server:
        tokens = server.services.tokens
        raw, row = await tokens.create(Principal.parse(ALICE), "stream")
        runner = await register_runner(server.http, bearer(raw))
        async with server.http.stream(
            "GET", f"/v1/runners/{runner}/wakes", headers=bearer(raw)
        ) as resp:
            assert resp.status_code == 200
            await tokens.revoke(row.id)
            async with asyncio.timeout(3):  # the stream ends: the loop below finishes
                async for _ in resp.aiter_lines():
                    pass
        assert await server.services.limits.sse_sessions(runner) == 0


# --- never logged ----------------------------------------------------------------------------


@contextlib.asynccontextmanager
async def _chatty_server(settings: Settings) -> AsyncIterator[tuple[str, Services]]:
    """A server that logs everything it can: uvicorn at debug with access logs on."""
    app = create_app(settings)
    config = uvicorn.Config(
        app, host="127.0.0.1", port=free_port(), log_level="debug", access_log=True
    )
    server = uvicorn.Server(config)
    task = asyncio.create_task(server.serve())
    try:
        while not server.started:
            await asyncio.sleep(0.01)
        yield f"http://127.0.0.1:{config.port}", app.state["pullwake"]
    finally:
        server.should_exit = True
        await asyncio.wait_for(task, timeout=10)


async def test_tokens_are_never_logged(
    settings: Settings, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    raw_tokens: list[str] = []
    async with _chatty_server(settings) as (base_url, services):
        # uvicorn's loggers do not propagate to the root logger: listen to them directly.
        for name in ("uvicorn", "uvicorn.error", "uvicorn.access", "pullwake", "litestar"):
            logging.getLogger(name).addHandler(caplog.handler)
        try:
            async with httpx.AsyncClient(base_url=base_url, timeout=10) as http:
                raw_tokens += await _full_flow(http, services)
        finally:
            for name in ("uvicorn", "uvicorn.error", "uvicorn.access", "pullwake", "litestar"):
                logging.getLogger(name).removeHandler(caplog.handler)
    text = "\n".join(record.getMessage() for record in caplog.records)
    assert "GET /v1/runners" in text, "access logs were not captured"
    assert len(raw_tokens) >= 3
    for token in raw_tokens:
        assert token not in text
        assert token[4:] not in text
    assert not TOKEN_TEXT.search(text), TOKEN_TEXT.search(text)


async def _full_flow(http: httpx.AsyncClient, services: Services) -> list[str]:
    """Every kind of call, with good, bad and revoked tokens; returns the raw tokens used."""
    tokens = services.tokens
    raw, _ = await tokens.create(Principal.parse(ALICE), "flow")
    doomed, row = await tokens.create(Principal.parse(ALICE), "revoked")
    await tokens.revoke(row.id)
    alice = bearer(raw)
    runner = await register_runner(http, alice)
    entity = await create_entity(http, alice, runner)
    await send(http, alice, entity, {"text": "hello"})
    note = await claim_next(http, alice, runner)
    claim = bearer(note["claim_token"])
    calls: list[tuple[str, str, dict[str, Any], Any]] = [
        ("POST", f"/v1/claims/{note['claim_id']}/heartbeat", claim, {"epoch": note["epoch"]}),
        ("POST", f"{entity.path}/events", claim, {"payload": 1, "epoch": note["epoch"]}),
        ("GET", f"{entity.path}/messages", claim, None),
        ("GET", "/v1/runners", bearer(doomed), None),
        ("GET", "/v1/runners", claim, None),
        ("POST", f"/v1/claims/{note['claim_id']}/done", alice, {"epoch": 1, "acked_offset": 1}),
        (
            "POST",
            f"/v1/claims/{note['claim_id']}/done",
            bearer("pwc_" + "z" * 43),
            {"epoch": 1, "acked_offset": 1},
        ),
        ("GET", "/v1/runners", bearer("pwk_" + "y" * 43), None),
        (
            "POST",
            f"/v1/claims/{note['claim_id']}/done",
            claim,
            {"epoch": note["epoch"], "acked_offset": 1},
        ),
        ("POST", f"/v1/claims/{note['claim_id']}/heartbeat", claim, {"epoch": note["epoch"]}),
    ]
    for method, path, headers, body in calls:
        await http.request(method, path, headers=headers, json=body)
    return [raw, doomed, note["claim_token"], "pwc_" + "z" * 43, "pwk_" + "y" * 43]
