"""End to end: ``pullwake prune [--dry-run]`` as a process over history made by a real server."""

from __future__ import annotations

import re

import asyncpg
import httpx
import pytest

from .harness import Cli, ServerProcess, child_env, runner_and_entity

pytestmark = pytest.mark.e2e

PRINCIPAL = "user:prune@example.com"
CYCLES = 3
TABLES = ("wakes", "claims", "inbox_messages", "entity_events")


async def run_cycles(server: ServerProcess, token: str) -> str:
    """A runner, an entity and CYCLES send/claim/event/done cycles over HTTP; the entity url."""
    headers = {"Authorization": f"Bearer {token}"}
    async with httpx.AsyncClient(base_url=server.base_url, headers=headers, timeout=10) as http:
        runner_id, path = await runner_and_entity(http, "prune")
        for i in range(CYCLES):
            sent = await http.post(f"{path}/messages", json={"payload": {"i": i}})
            claim = await http.post(
                f"/v1/runners/{runner_id}/claim", json={"wake_id": sent.json()["wake"]["id"]}
            )
            note = claim.json()
            holder = {"Authorization": f"Bearer {note['claim_token']}"}
            event = await http.post(f"{path}/events", json={"payload": i}, headers=holder)
            assert event.status_code == 201, event.text
            body = {"epoch": note["epoch"], "acked_offset": note["tail_offset"]}
            done = await http.post(note["callbacks"]["done"], json=body, headers=holder)
            assert done.json() == {"ok": True, "next_wake": False}, done.text
    return path.removeprefix("/v1/entities")


def table_lines(stdout: str) -> dict[str, int]:
    """``  <table>   <count>`` lines of the prune output."""
    return {m[1]: int(m[2]) for m in re.finditer(r"^  (\w+) +(\d+)$", stdout, re.M)}


async def row_counts(db: asyncpg.Connection) -> dict[str, int]:
    return {t: await db.fetchval(f"SELECT count(*) FROM {t}") for t in TABLES}


async def test_prune_dry_run_then_prune_print_their_counts(
    server: ServerProcess, cli: Cli, db: asyncpg.Connection
) -> None:
    token = (await cli("tokens", "create", "--principal", PRINCIPAL)).ok().stdout.strip()
    url = await run_cycles(server, token)
    for table in ("wakes", "inbox_messages", "entity_events"):
        column = "resolved_at" if table == "wakes" else "created_at"
        await db.execute(f"UPDATE {table} SET {column} = {column} - interval '8 days'")
    before = await row_counts(db)
    expected = {"wakes": CYCLES - 1, "claims": CYCLES - 1, "inbox_messages": CYCLES}
    expected["entity_events"] = CYCLES

    dry = (await cli("prune", "--dry-run")).ok()
    assert dry.stdout.splitlines()[0].startswith("dry run, nothing deleted"), dry.describe()
    assert table_lines(dry.stdout) == {**expected, "total": sum(expected.values())}
    assert await row_counts(db) == before

    off = (await Cli({**cli.env, "PULLWAKE_RETENTION_MS": "0"})("prune")).ok()
    assert off.stdout.startswith("retention is off"), off.describe()
    assert table_lines(off.stdout) == dict.fromkeys([*TABLES, "total"], 0)

    pruned = (await cli("prune")).ok()
    assert pruned.stdout.startswith("rows older than 604800000 ms (7 d) removed:")
    assert table_lines(pruned.stdout) == table_lines(dry.stdout)
    assert await row_counts(db) == {t: before[t] - n for t, n in expected.items()}
    dispatch = await db.fetchrow("SELECT * FROM dispatch_state WHERE entity_url = $1", url)
    assert (dispatch["tail_offset"], dispatch["acked_offset"]) == (CYCLES, CYCLES)
    again = (await cli("prune")).ok()
    assert table_lines(again.stdout)["total"] == 0


async def test_prune_help_says_what_it_keeps() -> None:
    result = (await Cli(child_env())("prune", "--help")).ok()
    assert result.stdout.startswith("usage: pullwake prune [-h] [--dry-run]")
    for words in ("PULLWAKE_RETENTION_MS", "0 keeps everything", "--dry-run", "unacked"):
        assert words in " ".join(result.stdout.split()), result.describe()
