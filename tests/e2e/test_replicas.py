"""End to end: two API replicas and two workers on one Postgres and one Redis, one replica
SIGKILLed mid-run.

``pullwake serve`` A and B, ``pullwake worker`` x2, and a pool of two ``pullwake runner``
processes (handler ``pool_handler:handle``). The runners reach the API through a fail-over TCP
proxy (:mod:`.proxy`, the test's load balancer): every connection goes to A while A listens, so
their wake streams, claims and callbacks start on A. Senders post to B directly: every wake
crosses replicas (B writes it to Redis, A's stream forwards it). Half-way through the sends, A is
killed with SIGKILL: no drain, its streams and keep-alive connections just break, and requests
in flight on it get no answer. The runners' own reconnect logic takes them to B through the
proxy (the runner CLI takes one ``--server``; a balancer in front of the replicas is what a
deployment has, and unlike restarting the runners it keeps their in-flight handlers and claims,
whose heartbeats and done then reach B).

At the end: every entity's acked_offset == tail_offset == the messages sent (retried sends
carry idempotency keys, so none is doubled), every message handled, no two handler runs of one
entity overlapping (start/end lines from both processes), no two claims of one entity
overlapping in Postgres, and no stale holder wins: every claim's holder, replayed afterwards with
its saved token and epoch (heartbeat, event, done), is refused and changes nothing.
"""

from __future__ import annotations

import asyncio
import os
import secrets
import sys
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import pytest

from pullwake.testing import free_port

from .harness import Cli, ServerProcess, WorkerProcess
from .harness import retrying as call
from .proxy import FailoverProxy
from .runner_procs import RunnerProcess
from .test_runner_pool import (
    assert_claims_never_overlap,
    assert_no_overlap,
    read_records,
    wait_all_acked,
)

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(150)]

PRINCIPAL = "user:replicas@example.com"
E2E_DIR = Path(__file__).resolve().parent
ENTITIES = 30
MESSAGES = 10
LEASE_MS = 3_000
HANDLE_MS = 40  # per claim, so that claims are in flight when A dies


def log(message: str) -> None:
    """Measurements, shown with ``pytest -s``."""
    print(f"\n[replicas] {message}", flush=True)


async def test_two_replicas_two_workers_one_replica_killed_mid_run(
    pw_env: dict[str, str], cli: Cli, db: asyncpg.Connection, tmp_path: Path
) -> None:
    env = {
        **pw_env,
        "PULLWAKE_CLAIM_LEASE_MS": str(LEASE_MS),
        "PULLWAKE_RECOVERY_INTERVAL_MS": "1000",
        "PULLWAKE_REDELIVER_AFTER_MS": "2000",
        "PULLWAKE_STRANDED_AFTER_MS": "2000",
    }
    a_port, b_port = free_port(), free_port()
    proxy = FailoverProxy([a_port, b_port])
    a = ServerProcess(env, a_port, tmp_path / "serve-a.log", public_url=proxy.base_url)
    b = ServerProcess(env, b_port, tmp_path / "serve-b.log", public_url=proxy.base_url)
    worker_env = {**env, "PULLWAKE_PUBLIC_URL": proxy.base_url}
    workers = [WorkerProcess(worker_env, tmp_path / f"worker-{n}.log") for n in range(2)]
    runners: list[RunnerProcess] = []
    records_path = tmp_path / "handler.jsonl"
    entity_type, runner_id = f"rep{secrets.token_hex(3)}", f"rep-{secrets.token_hex(3)}"
    try:
        began = time.monotonic()
        proxy.start()
        for worker in workers:
            worker.start()
        await asyncio.gather(a.start(timeout=40), b.start(timeout=40))
        for worker in workers:
            await worker.wait_ready(timeout=40)
        token = (await cli("tokens", "create", "--principal", PRINCIPAL)).ok().stdout.strip()
        started_s = time.monotonic() - began

        headers = {"Authorization": f"Bearer {token}"}
        async with httpx.AsyncClient(base_url=b.base_url, headers=headers, timeout=10) as http:
            r = await call(http, "POST", "/v1/runners", {"id": runner_id, "label": "replicas"})
            assert r.status_code in (200, 201), r.text
            policy = {"targets": [{"type": "runner", "runner_id": runner_id}]}
            ids = [f"e{i:02d}" for i in range(ENTITIES)]
            for entity_id in ids:
                path = f"/v1/entities/{entity_type}/{entity_id}"
                r = await call(http, "PUT", path, {"dispatch_policy": policy})
                assert r.status_code == 201, r.text

            runner_env = {
                **env,
                "PULLWAKE_SERVER_URL": proxy.base_url,
                "PULLWAKE_TOKEN": token,
                "PYTHONPATH": os.pathsep.join([str(E2E_DIR), *sys.path]),
                "POOL_LOG": str(records_path),
                "POOL_FAIL_DIR": str(tmp_path),
                "POOL_HANDLE_MS": str(HANDLE_MS),
            }
            for n in range(2):
                args = ["--id", runner_id, "--handler", "pool_handler:handle"]
                args += ["--concurrency", "4", "--session", f"r{n}", "--drain-timeout-ms", "1000"]
                runner = RunnerProcess(args, runner_env, tmp_path / f"runner-{n}.log", tmp_path)
                runners.append(runner)
                runner.start()
            for runner in runners:
                await runner.wait_log("connected: streaming wakes", timeout=40)
            routed, _ = proxy.counts()
            assert routed.get(a_port, 0) >= 2, routed  # the runners' streams went to A
            assert b_port not in routed, routed

            # senders post to B: per entity in order, entities concurrently
            sent = 0
            limit = asyncio.Semaphore(12)

            async def send_all(entity_id: str) -> None:
                nonlocal sent
                for n in range(1, MESSAGES + 1):
                    async with limit:
                        r = await call(
                            http,
                            "POST",
                            f"/v1/entities/{entity_type}/{entity_id}/messages",
                            {"payload": {"n": n}, "idempotency_key": f"{entity_id}-{n}"},
                        )
                    assert r.status_code == 202, r.text
                    assert r.json()["offset"] == n, r.text
                    sent += 1

            sending = asyncio.gather(*(send_all(e) for e in ids))

            # kill A half-way through, while handlers are running claims made on A
            def in_flight() -> list[dict[str, Any]]:
                records = read_records(records_path) if records_path.exists() else []
                ended = {r["claim"] for r in records if r["kind"] == "end"}
                return [r for r in records if r["kind"] == "start" and r["claim"] not in ended]

            deadline = time.monotonic() + 40
            while sent < ENTITIES * MESSAGES // 2 or not in_flight():
                if sending.done():
                    await sending  # a send failed: raise it
                assert time.monotonic() < deadline, f"{sent} sent, nothing in flight"
                await asyncio.sleep(0.01)
            running_at_kill = in_flight()
            a.kill()
            killed_at = time.monotonic()
            log(f"A killed after {sent} sends, {len(running_at_kill)} handler runs in flight")

            for runner in runners:  # their own reconnect, through the proxy, to B
                await runner.wait_log("connected: streaming wakes", count=2, timeout=30)
            reconnected_s = time.monotonic() - killed_at
            routed, refused = proxy.counts()
            assert routed.get(b_port, 0) >= 2, routed
            assert refused.get(a_port, 0) >= 1, refused

            await asyncio.wait_for(sending, 60)
            await wait_all_acked(db, entity_type, MESSAGES, timeout=45)
            finished_s = time.monotonic() - killed_at

            # --- invariants
            rows = await db.fetch(
                "SELECT e.url, e.status, d.tail_offset, d.acked_offset, d.active_claim_id, "
                "d.parked_reason FROM entities e JOIN dispatch_state d ON d.entity_url = e.url "
                "WHERE e.type = $1",
                entity_type,
            )
            assert len(rows) == ENTITIES
            for row in rows:
                assert row["tail_offset"] == MESSAGES, dict(row)  # no send lost or doubled
                assert row["acked_offset"] == row["tail_offset"], dict(row)
                assert (row["status"], row["active_claim_id"]) == ("idle", None), dict(row)
                assert row["parked_reason"] is None, dict(row)

            records = read_records(records_path)
            assert_no_overlap(records)  # handler runs of one entity, across both processes
            claims = await assert_claims_never_overlap(db, entity_type)
            handled: dict[str, set[int]] = defaultdict(set)
            for record in records:
                if record["kind"] == "msg":
                    handled[record["entity"]].add(record["offset"])
            missing = {
                e: set(range(1, MESSAGES + 1)) - handled[f"/{entity_type}/{e}"]
                for e in ids
                if handled[f"/{entity_type}/{e}"] != set(range(1, MESSAGES + 1))
            }
            assert not missing, f"acked but never handled: {missing}"

            # --- no stale holder wins: every claim replayed with its own token and epoch
            starts = [r for r in records if r["kind"] == "start"]
            by_id = {c["id"]: c for c in claims}
            snapshot = await _snapshot(db, entity_type)
            replies = await asyncio.gather(*(_replay(http, s) for s in starts))
            for start, (beat, event, done) in zip(starts, replies, strict=True):
                assert beat.status_code == 409, (start, beat.text)
                assert event.status_code == 409, (start, event.text)
                claim = by_id[start["claim"]]
                same_done = (claim["end_reason"], claim["acked_offset"]) == ("done", start["acked"])
                # a retried done that repeats the first one answers it again (and changes nothing)
                assert done.status_code == (200 if same_done else 409), (start, done.text)
            assert await _snapshot(db, entity_type) == snapshot, "a stale holder changed state"

        for worker in workers:  # both workers carried on
            assert worker.proc is not None
            assert worker.proc.poll() is None, worker.log()[-3000:]
        for runner in runners:
            assert "reconnecting in" in runner.log(), runner.log()[-3000:]
            assert await runner.stop() == 0, runner.log()[-3000:]
    finally:
        for runner in runners:
            runner.cleanup()
        for worker in workers:
            worker.cleanup()
        for server in (a, b):
            server.cleanup()
        proxy.stop()

    stats: dict[str, int] = defaultdict(int)
    for claim in claims:
        stats[claim["end_reason"]] += 1
    log(
        f"{ENTITIES * MESSAGES} messages to {ENTITIES} entities; up in {started_s:.1f} s; "
        f"runners back (through B) {reconnected_s:.1f} s after the kill, all acked "
        f"{finished_s:.1f} s after it; {len(claims)} claims {dict(stats)}; "
        f"proxy routed {routed}, refused {refused}; {len(starts)} stale holders refused"
    )
    b_log = b.log()
    assert "Traceback" not in b_log, b_log[-5000:]
    assert "unexpected error" not in b_log, b_log[-5000:]


async def _replay(
    http: httpx.AsyncClient, start: dict[str, Any]
) -> tuple[httpx.Response, httpx.Response, httpx.Response]:
    """A holder's heartbeat, event and done, sent again with its saved token and epoch."""
    headers = {"Authorization": f"Bearer {start['token']}"}
    claim, epoch = start["claim"], start["epoch"]
    beat = await http.post(f"/v1/claims/{claim}/heartbeat", json={"epoch": epoch}, headers=headers)
    event = await http.post(
        f"/v1/entities{start['entity']}/events",
        json={"payload": {"stale": True}, "epoch": epoch},
        headers=headers,
    )
    done = await http.post(
        f"/v1/claims/{claim}/done",
        json={"epoch": epoch, "acked_offset": start["acked"]},
        headers=headers,
    )
    return beat, event, done


async def _snapshot(db: asyncpg.Connection, entity_type: str) -> list[Any]:
    """Everything a holder's call could change, for the entities of the test."""
    pattern = f"/{entity_type}/%"
    state = await db.fetch(
        "SELECT entity_url, tail_offset, acked_offset, epoch, active_claim_id, "
        "events_tail_offset, outstanding_wake_id FROM dispatch_state "
        "WHERE entity_url LIKE $1 ORDER BY entity_url",
        pattern,
    )
    claims = await db.fetch(
        "SELECT id, status, acked_offset, end_reason, released_at, lease_expires_at "
        "FROM claims WHERE entity_url LIKE $1 ORDER BY id",
        pattern,
    )
    events = await db.fetchval(
        "SELECT count(*) FROM entity_events WHERE entity_url LIKE $1", pattern
    )
    return [[tuple(r) for r in state], [tuple(r) for r in claims], events]
