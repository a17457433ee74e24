"""End to end: ``pullwake runner`` processes against ``pullwake serve``, including a restart."""

from __future__ import annotations

import asyncio
import json
import os
import re
import secrets
import statistics
import sys
import time
from collections import defaultdict
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import pytest

from .harness import Cli, ServerProcess, retrying
from .runner_procs import RunnerProcess

pytestmark = pytest.mark.e2e

PRINCIPAL = "user:pool@example.com"
E2E_DIR = Path(__file__).resolve().parent
ENTITIES = 50
MESSAGES = 20
BURSTS = 4
FAIL_AT = 7  # offset whose payload fails once, on the first FAILING entities
FAILING = 3


def uid(prefix: str) -> str:
    return f"{prefix}-{secrets.token_hex(4)}"


async def create_token(cli: Cli) -> str:
    result = (await cli("tokens", "create", "--principal", PRINCIPAL, "--label", "pool")).ok()
    token = result.stdout.strip()
    assert token.startswith("pwk_"), result.describe()
    return token


@pytest.fixture
async def db(database_url: str) -> AsyncIterator[asyncpg.Connection]:
    conn = await asyncpg.connect(database_url)
    try:
        yield conn
    finally:
        await conn.close()


@pytest.fixture
def runner_factory(
    pw_env: dict[str, str], tmp_path: Path
) -> Iterator[Callable[..., RunnerProcess]]:
    """Start ``pullwake runner`` processes; each is terminated (then killed) afterwards."""
    procs: list[RunnerProcess] = []

    def start(server: ServerProcess, token: str, *args: str, **env: str) -> RunnerProcess:
        child = {
            **pw_env,
            "PULLWAKE_SERVER_URL": server.base_url,
            "PULLWAKE_TOKEN": token,
            "PYTHONPATH": os.pathsep.join([str(E2E_DIR), *sys.path]),
            **env,
        }
        proc = RunnerProcess(list(args), child, tmp_path / f"runner-{len(procs)}.log", tmp_path)
        procs.append(proc)
        proc.start()
        return proc

    try:
        yield start
    finally:
        for proc in procs:
            proc.cleanup()


async def post(http: httpx.AsyncClient, path: str, body: dict[str, Any]) -> httpx.Response:
    """POST, retrying while the server restarts (callers make retries safe)."""
    return await retrying(http, "POST", path, body, deadline_s=20, pause_s=0.1)


async def setup_entities(
    http: httpx.AsyncClient, runner_id: str, count: int, entity_type: str
) -> list[str]:
    response = await http.post("/v1/runners", json={"id": runner_id, "label": "pool test"})
    assert response.status_code in (200, 201), response.text
    policy = {"targets": [{"type": "runner", "runner_id": runner_id}]}
    ids = [f"e{i:03d}" for i in range(count)]
    for entity_id in ids:
        response = await http.put(
            f"/v1/entities/{entity_type}/{entity_id}", json={"dispatch_policy": policy}
        )
        assert response.status_code == 201, response.text
    return ids


async def send_burst(
    http: httpx.AsyncClient, entity_type: str, ids: list[str], offsets: range
) -> None:
    """Every entity gets ``offsets``; idempotency keys make retried sends harmless."""
    limit = asyncio.Semaphore(16)

    async def send(index: int, entity_id: str, n: int) -> None:
        payload: dict[str, Any] = {"n": n}
        if index < FAILING and n == FAIL_AT:
            payload["fail_once"] = True
        async with limit:
            response = await post(
                http,
                f"/v1/entities/{entity_type}/{entity_id}/messages",
                {"payload": payload, "idempotency_key": f"{entity_id}-{n}"},
            )
        assert response.status_code == 202, response.text
        assert response.json()["offset"] == n, response.text

    # per entity in order (offsets are per entity), entities concurrently
    async def entity_burst(index: int, entity_id: str) -> None:
        for n in offsets:
            await send(index, entity_id, n)

    await asyncio.gather(*(entity_burst(i, e) for i, e in enumerate(ids)))


async def wait_all_acked(
    db: asyncpg.Connection, entity_type: str, total: int, timeout: float
) -> None:
    deadline = time.monotonic() + timeout
    while True:
        behind = await db.fetchval(
            "SELECT count(*) FROM dispatch_state WHERE entity_url LIKE $1 "
            "AND (acked_offset < $2 OR tail_offset < $2)",
            f"/{entity_type}/%",
            total,
        )
        if behind == 0:
            return
        if time.monotonic() > deadline:
            rows = await db.fetch(
                "SELECT entity_url, tail_offset, acked_offset, active_claim_id, "
                "outstanding_wake_id, parked_reason FROM dispatch_state "
                "WHERE entity_url LIKE $1 AND acked_offset < tail_offset",
                f"/{entity_type}/%",
            )
            raise AssertionError(f"{behind} entities not fully acked: {[dict(r) for r in rows]}")
        await asyncio.sleep(0.2)


def read_records(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def assert_no_overlap(records: list[dict[str, Any]]) -> None:
    """Per entity, handler runs strictly alternate start, end, start, end (across processes)."""
    by_entity: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for record in records:
        if record["kind"] in ("start", "end"):
            by_entity[record["entity"]].append(record)
    for entity, runs in by_entity.items():
        runs.sort(key=lambda r: r["ns"])
        kinds = [r["kind"] for r in runs]
        assert kinds == ["start", "end"] * (len(kinds) // 2), (entity, runs)
        for start, end in zip(runs[::2], runs[1::2], strict=True):
            assert start["claim"] == end["claim"], (entity, start, end)


async def assert_claims_never_overlap(db: asyncpg.Connection, entity_type: str) -> list[Any]:
    claims = await db.fetch(
        "SELECT id, entity_url, status, claimed_at, released_at, start_acked_offset, "
        "acked_offset, end_reason FROM claims WHERE entity_url LIKE $1 "
        "ORDER BY entity_url, claimed_at",
        f"/{entity_type}/%",
    )
    assert not [c for c in claims if c["status"] == "active"]
    previous: Any = None
    for claim in claims:
        if previous is not None and previous["entity_url"] == claim["entity_url"]:
            assert claim["claimed_at"] >= previous["released_at"], (dict(previous), dict(claim))
        previous = claim
    return claims


def percentiles(values_ms: list[float]) -> str:
    values = sorted(values_ms)
    p95 = values[max(0, int(len(values) * 0.95) - 1)]
    return (
        f"n={len(values)} p50={statistics.median(values):.0f} ms "
        f"p95={p95:.0f} ms max={values[-1]:.0f} ms"
    )


async def test_pool_of_three_runner_processes_survives_a_server_restart(
    server_factory: Callable[[], Awaitable[ServerProcess]],
    runner_factory: Callable[..., RunnerProcess],
    cli: Cli,
    db: asyncpg.Connection,
    tmp_path: Path,
) -> None:
    server = await server_factory()
    token = await create_token(cli)
    runner_id, entity_type = uid("pool"), uid("job")
    records, fail_dir = tmp_path / "handler.jsonl", tmp_path / "fails"
    fail_dir.mkdir()
    began = time.monotonic()
    headers = {"Authorization": f"Bearer {token}"}
    async with httpx.AsyncClient(base_url=server.base_url, headers=headers, timeout=10) as http:
        ids = await setup_entities(http, runner_id, ENTITIES, entity_type)
        runners = [
            runner_factory(
                server,
                token,
                "--id",
                runner_id,
                "--handler",
                "pool_handler:handle",
                "--concurrency",
                "8",
                "--label",
                f"pool-{n}",
                POOL_LOG=str(records),
                POOL_FAIL_DIR=str(fail_dir),
            )
            for n in range(3)
        ]
        for runner in runners:
            await runner.wait_log("connected: streaming wakes")
        per_burst = MESSAGES // BURSTS
        for burst in range(BURSTS):
            offsets = range(burst * per_burst + 1, (burst + 1) * per_burst + 1)
            await send_burst(http, entity_type, ids, offsets)
            if burst == 1:
                # Restart while the runners are busy with this burst's wakes.
                assert await server.stop() in (0, -15), server.log()
                await server.start()
        await wait_all_acked(db, entity_type, MESSAGES, timeout=45)
    finished = time.monotonic() - began
    for runner in runners:  # runners reconnected after the restart
        await runner.wait_log("connected: streaming wakes", count=2)
        assert "reconnecting in" in runner.log()

    handler_records = read_records(records)
    assert_no_overlap(handler_records)
    claims = await assert_claims_never_overlap(db, entity_type)

    processed: dict[str, set[int]] = defaultdict(set)
    for record in handler_records:
        if record["kind"] == "msg":
            processed[record["entity"]].add(record["offset"])
    assert all(processed[f"/{entity_type}/{i}"] == set(range(1, 21)) for i in ids)
    assert len({r["pid"] for r in handler_records}) == 3, "the pool did not spread the work"

    # A handler that raised: done was still sent, acking only up to the message before.
    failures = [r for r in handler_records if r["kind"] == "fail"]
    assert sorted(r["entity"] for r in failures) == [f"/{entity_type}/{i}" for i in ids[:FAILING]]
    by_id = {c["id"]: c for c in claims}
    for failure in failures:
        claim = by_id[failure["claim"]]
        assert (claim["end_reason"], claim["acked_offset"]) == ("done", FAIL_AT - 1), dict(claim)

    quiet = await quiet_latencies(http_for(server, token), db, entity_type, ids[:10])

    for runner in runners:
        assert await runner.stop() == 0, runner.log()
        assert re.search(r"runner \S+ stopped", runner.log()), runner.log()

    rows = await db.fetch(
        "SELECT extract(epoch FROM c.claimed_at - w.created_at) * 1000 AS to_claim, "
        "extract(epoch FROM c.released_at - c.claimed_at) * 1000 AS to_done "
        "FROM claims c JOIN wakes w ON w.id = c.id WHERE c.entity_url LIKE $1",
        f"/{entity_type}/%",
    )
    wakes = await db.fetchval(
        "SELECT count(*) FROM wakes WHERE entity_url LIKE $1", f"/{entity_type}/%"
    )
    statuses = await db.fetch(
        "SELECT status, count(*) FROM claims WHERE entity_url LIKE $1 GROUP BY status",
        f"/{entity_type}/%",
    )
    print(
        f"\npool: {ENTITIES * MESSAGES} messages acked in {finished:.1f} s "
        f"(incl. a server restart); {wakes} wakes, claims {dict(statuses)}"
        f"\n  wake→claim  {percentiles([float(r['to_claim']) for r in rows])}"
        f"\n  claim→done  {percentiles([float(r['to_done']) for r in rows])}"
        f"\n  wake→done   {percentiles([float(r['to_claim'] + r['to_done']) for r in rows])}"
        f"\n  one message at a time, idle pool: send→done {percentiles(quiet)}"
    )


def http_for(server: ServerProcess, token: str) -> httpx.AsyncClient:
    headers = {"Authorization": f"Bearer {token}"}
    return httpx.AsyncClient(base_url=server.base_url, headers=headers, timeout=10)


async def quiet_latencies(
    http: httpx.AsyncClient, db: asyncpg.Connection, entity_type: str, ids: list[str]
) -> list[float]:
    """Send one message at a time to an idle pool: message commit to done commit, in ms."""
    async with http:
        for entity_id in ids:
            await post(http, f"/v1/entities/{entity_type}/{entity_id}/messages", {"payload": {}})
            await wait_all_acked_one(db, f"/{entity_type}/{entity_id}", MESSAGES + 1)
    rows = await db.fetch(
        "SELECT extract(epoch FROM c.released_at - m.created_at) * 1000 AS ms "
        "FROM inbox_messages m JOIN claims c ON c.entity_url = m.entity_url "
        "AND c.start_acked_offset < m.offset AND c.acked_offset >= m.offset "
        "WHERE m.entity_url LIKE $1 AND m.offset = $2",
        f"/{entity_type}/%",
        MESSAGES + 1,
    )
    assert len(rows) == len(ids)
    return [float(r["ms"]) for r in rows]


async def test_exec_runner_acks_on_success_and_releases_with_stderr_on_failure(
    server_factory: Callable[[], Awaitable[ServerProcess]],
    runner_factory: Callable[..., RunnerProcess],
    cli: Cli,
    db: asyncpg.Connection,
) -> None:
    server = await server_factory()
    token = await create_token(cli)
    runner_id, entity_type = uid("exec"), uid("cmd")
    command = (
        f"{sys.executable} -c 'import json, sys; n = json.load(sys.stdin); "
        'bad = any(m["payload"].get("bad") for m in n["messages"]); '
        'print("saw", len(n["messages"]), "message(s) for", n["entity"]["url"]); '
        'bad and sys.stderr.write("cannot handle a bad payload\\n"); '
        "sys.exit(3 if bad else 0)'"
    )
    headers = {"Authorization": f"Bearer {token}"}
    async with httpx.AsyncClient(base_url=server.base_url, headers=headers, timeout=10) as http:
        ok, bad = await setup_entities(http, runner_id, 2, entity_type)
        runner = runner_factory(
            server, token, "--id", runner_id, "--exec", command, "--retry-delay-ms", "100"
        )
        await runner.wait_log("connected: streaming wakes")
        for n in range(1, 4):
            await post(http, f"/v1/entities/{entity_type}/{ok}/messages", {"payload": {"n": n}})
        await post(http, f"/v1/entities/{entity_type}/{bad}/messages", {"payload": {"bad": 1}})
        await wait_all_acked_one(db, f"/{entity_type}/{ok}", 3)
        parked = await wait_parked(db, f"/{entity_type}/{bad}")
    assert "saw" in runner.log()
    await runner.wait_log(f"WARNING pullwake.runner: entity /{entity_type}/{bad} parked by the")
    errors = await db.fetch(
        "SELECT end_reason, last_error FROM claims WHERE entity_url = $1",
        f"/{entity_type}/{bad}",
    )
    assert errors, parked
    assert all(e["end_reason"] == "release" for e in errors), [dict(e) for e in errors]
    assert all("cannot handle a bad payload" in e["last_error"] for e in errors)
    assert all("status 3" in e["last_error"] for e in errors)
    acked = await db.fetchval(
        "SELECT acked_offset FROM dispatch_state WHERE entity_url = $1", f"/{entity_type}/{bad}"
    )
    assert acked == 0
    assert await runner.stop() == 0


async def wait_all_acked_one(db: asyncpg.Connection, url: str, total: int) -> None:
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        acked = await db.fetchval(
            "SELECT acked_offset FROM dispatch_state WHERE entity_url = $1", url
        )
        if acked == total:
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"{url} not acked to {total}")


async def wait_parked(db: asyncpg.Connection, url: str) -> str:
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        reason = await db.fetchval(
            "SELECT parked_reason FROM dispatch_state WHERE entity_url = $1", url
        )
        if reason:
            return str(reason)
        await asyncio.sleep(0.1)
    raise AssertionError(f"{url} was never parked")


async def test_disabled_runner_waits_and_registration_never_re_enables(
    server_factory: Callable[[], Awaitable[ServerProcess]],
    runner_factory: Callable[..., RunnerProcess],
    cli: Cli,
    db: asyncpg.Connection,
) -> None:
    server = await server_factory()
    token = await create_token(cli)
    runner_id, entity_type = uid("off"), uid("cmd")
    headers = {"Authorization": f"Bearer {token}"}
    async with httpx.AsyncClient(base_url=server.base_url, headers=headers, timeout=10) as http:
        (entity_id,) = await setup_entities(http, runner_id, 1, entity_type)
        assert (await http.post(f"/v1/runners/{runner_id}/disable")).status_code == 200
        runner = runner_factory(server, token, "--id", runner_id, "--exec", "cat > /dev/null")
        await runner.wait_log("RUNNER_DISABLED")
        await runner.wait_log("registered")
        view = (await http.get(f"/v1/runners/{runner_id}")).json()
        assert view["admin_status"] == "disabled"
        assert (await http.post(f"/v1/runners/{runner_id}/enable")).status_code == 200
        await runner.wait_log("connected: streaming wakes", timeout=20)
        await post(http, f"/v1/entities/{entity_type}/{entity_id}/messages", {"payload": {}})
        await wait_all_acked_one(db, f"/{entity_type}/{entity_id}", 1)
    assert await runner.stop() == 0
