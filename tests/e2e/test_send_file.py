"""End to end: ``pullwake send --file`` sends a JSON Lines file in batches, as a process."""

from __future__ import annotations

import json
from pathlib import Path

import asyncpg
import httpx
import pytest

from .harness import Cli, ServerProcess, runner_and_entity

pytestmark = pytest.mark.e2e

PRINCIPAL = "user:batch@example.com"


async def _entity(server: ServerProcess, token: str) -> str:
    headers = {"Authorization": f"Bearer {token}"}
    async with httpx.AsyncClient(base_url=server.base_url, headers=headers, timeout=10) as http:
        _runner_id, path = await runner_and_entity(http, "bf")
    return path.removeprefix("/v1/entities")


async def test_send_file_in_batches(
    server: ServerProcess, cli: Cli, db: asyncpg.Connection, tmp_path: Path
) -> None:
    token = (await cli("tokens", "create", "--principal", PRINCIPAL)).ok().stdout.strip()
    url = await _entity(server, token)
    lines = [json.dumps({"entity": url, "payload": {"n": n}}) for n in range(7)]
    lines.insert(3, "")  # blank lines are skipped
    lines.append(json.dumps({"entity": "/job/missing", "payload": 1}))
    path = tmp_path / "messages.jsonl"
    path.write_text("\n".join(lines) + "\n")
    small = Cli({**cli.env, "PULLWAKE_MAX_BATCH": "3"})

    result = await small("send", "--file", str(path))

    assert result.returncode == 1, result.describe()  # one item failed
    assert "line 9: NOT_FOUND entity /job/missing does not exist" in result.stdout
    assert "8 messages: 7 accepted (1 queued, 6 coalesced), 1 failed" in result.stdout
    assert "sent 3/8" in result.stderr
    assert "sent 8/8" in result.stderr
    rows = await db.fetch('SELECT "offset", payload FROM inbox_messages ORDER BY 1')
    assert [json.loads(r["payload"])["n"] for r in rows] == list(range(7))


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
