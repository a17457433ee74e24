"""End to end: ``pullwake send`` and ``pullwake.client`` against a ``pullwake serve`` process."""

from __future__ import annotations

import asyncio
import json
import re
from pathlib import Path

import asyncpg
import httpx
import pytest

from pullwake import client as pw

from .harness import Cli, ServerProcess, runner_and_entity

pytestmark = pytest.mark.e2e

PRINCIPAL = "user:batch@example.com"


async def _token(cli: Cli) -> str:
    return (await cli("tokens", "create", "--principal", PRINCIPAL)).ok().stdout.strip()


async def _entity(server: ServerProcess, token: str) -> str:
    headers = {"Authorization": f"Bearer {token}"}
    async with httpx.AsyncClient(base_url=server.base_url, headers=headers, timeout=10) as http:
        _runner_id, path = await runner_and_entity(http, "bf")
    return path.removeprefix("/v1/entities")


async def test_send_file_in_batches(
    server: ServerProcess, cli: Cli, db: asyncpg.Connection, tmp_path: Path
) -> None:
    token = await _token(cli)
    url = await _entity(server, token)
    lines = [json.dumps({"entity": url, "payload": {"n": n}}) for n in range(7)]
    lines.insert(3, "")  # blank lines are skipped
    lines.append(json.dumps({"entity": "/job/missing", "payload": 1}))
    path = tmp_path / "messages.jsonl"
    path.write_text("\n".join(lines) + "\n")
    env = {**cli.env, "PULLWAKE_MAX_BATCH": "3", "PULLWAKE_TOKEN": token}
    small = Cli({**env, "PULLWAKE_SERVER_URL": server.base_url})

    result = await small("send", "--file", str(path))

    assert result.returncode == 1, result.describe()  # one item failed
    assert "line 9: NOT_FOUND entity /job/missing does not exist" in result.stdout
    assert "8 messages: 7 accepted (1 queued, 6 coalesced), 1 failed" in result.stdout
    assert "sent 3/8" in result.stderr
    assert "sent 8/8" in result.stderr
    rows = await db.fetch('SELECT "offset", payload, sender FROM inbox_messages ORDER BY 1')
    assert [json.loads(r["payload"])["n"] for r in rows] == list(range(7))
    assert {r["sender"] for r in rows} == {PRINCIPAL}  # the token's principal

    # --direct: through Postgres and Redis as an operator, whoever the entity's members are
    direct = await Cli(env)("send", "--file", str(path), "--direct", "--as", "service:ops")
    assert direct.returncode == 1, direct.describe()
    assert "8 messages: 7 accepted (7 coalesced), 1 failed" in direct.stdout
    assert (
        await db.fetchval("SELECT count(*) FROM inbox_messages WHERE sender = 'service:ops'") == 7
    )


async def test_send_file_refuses_a_bad_file_and_sends_nothing(
    cli: Cli, db: asyncpg.Connection, tmp_path: Path
) -> None:
    path = tmp_path / "bad.jsonl"
    path.write_text('{"entity": "/job/a", "payload": 1}\nnot json\n{"entity": "nope"}\n')
    result = await cli("send", "--file", str(path))
    assert result.returncode == 2, result.describe()
    assert "line 2:" in result.stderr
    assert "line 3:" in result.stderr
    assert await db.fetchval("SELECT count(*) FROM inbox_messages") == 0


async def test_the_client_and_send_against_pullwake_serve(server: ServerProcess, cli: Cli) -> None:
    token = await _token(cli)
    async with pw.AsyncClient(server.base_url, token) as client:
        runner = await client.register_runner("e2e-client", label="e2e")
        entity = "/job/e2e-client"
        made = await client.create_entity(
            entity,
            dispatch_policy=pw.DispatchPolicy([pw.RunnerTarget(runner.id)]),
            initial_message=pw.InitialMessage({"n": 1}, idempotency_key="one"),
        )
        assert made.send_result is not None
        wake_id = made.send_result.wake.id
        assert wake_id is not None

        sent = (
            await cli("send", entity, '{"n": 2}', "--server", server.base_url, "--token", token)
        ).ok()
        assert re.fullmatch(
            rf"offset 2: wake {wake_id} coalesced \(outstanding-wake\)\n", sent.stdout
        )

        assert [m.payload async for m in client.messages(entity, limit=1)] == [{"n": 1}, {"n": 2}]
        assert (await client.get_wake(wake_id)).entity_url == entity
        with pytest.raises(pw.NotFound) as caught:
            await client.get_entity("/job/none")
        assert caught.value.status == 404

    def blocking() -> int:
        with pw.Client(server.base_url, token) as sync:
            return sync.get_entity(entity).dispatch.tail_offset

    assert await asyncio.to_thread(blocking) == 2
