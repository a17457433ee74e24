"""Fault injection with real processes: ``pullwake serve``, ``pullwake worker`` and
``pullwake runner`` (handler ``fault_handler:handle``) against real Postgres and Redis, with
short leases.

Every scenario sends a few hundred messages to a few dozen entities, injects its fault, and then
checks the invariants: every message acked by a done (acked_offset == tail_offset), every
message handled, no two claims of one entity ever overlapping in the claims history, every
entity idle, nothing parked.

Redis: the processes use a Redis database index of their own (the suite FLUSHDBs it), picked
among 15..8 under a file lock so that concurrent runs never share one; other tests keep db 0.
Run with ``pytest -s -m e2e tests/e2e/test_faults.py`` to see the measurements.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import json
import os
import secrets
import signal
import sys
import time
from collections import defaultdict
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import httpx
import pytest
import redis as redis_sync
from redis.asyncio import Redis

from pullwake.testing import free_port, serve_in_background
from support.wait import wait_for
from support.webhook import Hit, Reply, WebhookTarget

from .harness import (
    ADMIN_DATABASE_URL,
    REDIS_URL,
    Cli,
    ServerProcess,
    WorkerProcess,
    child_env,
)
from .runner_procs import RunnerProcess

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(120)]

PRINCIPAL = "user:faults@example.com"
E2E_DIR = Path(__file__).resolve().parent
LEASE_MS = 2_000
RECOVERY_MS = 1_000
REDELIVER_MS = 2_000
STRANDED_MS = 2_000
WEBHOOK_ATTEMPTS = 3
ENTITIES = 30
MESSAGES = 10
TABLES = (
    "claims, wakes, inbox_messages, entity_events, dispatch_state, entities, entity_types, "
    "runner_liveness, runners, principals_tokens"
)
OWNER_KEY = "pullwake-faults:owner"


def log(message: str) -> None:
    """Measurements, shown with ``pytest -s``."""
    print(f"\n[faults] {message}", flush=True)


# --- a Redis database of our own --------------------------------------------------------------


def _with_db(url: str, db: int) -> str:
    return urlunsplit(urlsplit(url)._replace(path=f"/{db}"))


@pytest.fixture(scope="session")
def fault_redis_url() -> Iterator[str]:
    """A Redis DB index only this run uses (file lock per index), FLUSHDB'd before and after.

    An index is taken when it is empty or marked by an earlier run of this suite;
    PULLWAKE_TEST_FAULT_REDIS_DB forces one.
    """
    forced = os.environ.get("PULLWAKE_TEST_FAULT_REDIS_DB")
    candidates = [int(forced)] if forced else list(range(15, 7, -1))
    host = urlsplit(REDIS_URL).netloc.replace(":", "-")
    for db in candidates:
        url = _with_db(REDIS_URL, db)
        lock = Path(f"/tmp/pullwake-faults-{host}-db{db}.lock").open("w")  # noqa: SIM115
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            lock.close()
            continue
        client = redis_sync.Redis.from_url(url)
        try:
            if not (forced or client.dbsize() == 0 or client.exists(OWNER_KEY)):
                lock.close()
                continue
            client.flushdb()
            client.set(OWNER_KEY, str(os.getpid()))
            try:
                yield url
            finally:
                client.flushdb()
                lock.close()
            return
        finally:
            client.close()
    pytest.skip("no free Redis database index (15..8) for the fault suite")


# --- processes ---------------------------------------------------------------------------------


def kill9(runner: RunnerProcess) -> float:
    """SIGKILL a runner process; the wall-clock time of the kill."""
    assert runner.proc is not None
    runner.proc.send_signal(signal.SIGKILL)
    killed_at = time.time()
    runner.proc.wait(5)
    return killed_at


# --- the harness -------------------------------------------------------------------------------


@dataclass
class Faults:
    """One scenario's processes, client, entities and checks."""

    tmp: Path
    env: dict[str, str]
    database_url: str
    redis: Redis
    entity_type: str
    runner_id: str = field(default_factory=lambda: f"fr-{secrets.token_hex(3)}")
    token: str = ""
    server: ServerProcess | None = None
    workers: list[WorkerProcess] = field(default_factory=list)
    runners: list[RunnerProcess] = field(default_factory=list)
    http: httpx.AsyncClient | None = None
    statuses: list[int] = field(default_factory=list)
    unavailable: list[dict[str, Any]] = field(default_factory=list)
    transport_errors: int = 0

    @property
    def handler_log(self) -> Path:
        return self.tmp / "handler.jsonl"

    @property
    def api(self) -> httpx.AsyncClient:
        assert self.http is not None
        return self.http

    # processes

    async def start(self, *, workers: int = 1) -> None:
        """Token, server and workers (started concurrently)."""
        result = await Cli(self.env)("tokens", "create", "--principal", PRINCIPAL)
        self.token = result.ok().stdout.strip()
        port = free_port()
        self.server = ServerProcess(self.env, port, self.tmp / "serve.log")
        ready = [self.server.start()]
        for _ in range(workers):
            ready.append(self.start_worker(start_only=True))
        await asyncio.gather(*ready)
        for worker in self.workers:
            await worker.wait_ready()
        self.http = httpx.AsyncClient(
            base_url=self.server.base_url,
            headers={"Authorization": f"Bearer {self.token}"},
            timeout=10,
        )

    @property
    def public_url(self) -> str:
        assert self.server is not None
        return self.server.base_url

    async def start_worker(
        self, *, start_only: bool = False, plain_arq: bool = False
    ) -> WorkerProcess:
        """``pullwake worker``, or with ``plain_arq`` ``arq pullwake.tasks.WorkerSettings``."""
        env = {**self.env, "PULLWAKE_PUBLIC_URL": self.public_url}
        worker = WorkerProcess(env, self.tmp / f"worker-{len(self.workers)}.log")
        if plain_arq:
            worker.argv = (
                str(Path(sys.executable).parent / "arq"),
                "pullwake.tasks.WorkerSettings",
            )
            worker.ready_text = "Starting worker for"
        self.workers.append(worker)
        worker.start()
        if not start_only:
            await worker.wait_ready()
        return worker

    async def start_runner(
        self, name: str, handle_ms: int, concurrency: int = 4, runner_id: str | None = None
    ) -> RunnerProcess:
        assert self.server is not None
        env = {
            **self.env,
            "PULLWAKE_SERVER_URL": self.server.base_url,
            "PULLWAKE_TOKEN": self.token,
            "PYTHONPATH": os.pathsep.join([str(E2E_DIR), *sys.path]),
            "FAULT_LOG": str(self.handler_log),
            "FAULT_HANDLE_MS": str(handle_ms),
        }
        args = [
            "--id",
            runner_id or self.runner_id,
            "--handler",
            "fault_handler:handle",
            "--concurrency",
            str(concurrency),
            "--session",
            name,
            "--drain-timeout-ms",
            "500",
        ]
        runner = RunnerProcess(args, env, self.tmp / f"runner-{name}.log", self.tmp)
        self.runners.append(runner)
        runner.start()
        await runner.wait_log("connected: streaming wakes")
        return runner

    def cleanup(self) -> None:
        for runner in self.runners:
            runner.cleanup()
        for worker in self.workers:
            worker.cleanup()
        if self.server is not None:
            self.server.cleanup()

    def logs(self) -> str:
        parts = []
        if self.server is not None:
            parts.append(f"--- serve.log\n{self.server.log()[-4000:]}")
        for w in self.workers:
            parts.append(f"--- {w.log_path.name}\n{w.log()[-3000:]}")
        for r in self.runners:
            parts.append(f"--- {r.log_path.name}\n{r.log()[-3000:]}")
        return "\n".join(parts)

    # HTTP

    async def call(
        self, method: str, path: str, body: Any = None, *, deadline_s: float = 30
    ) -> httpx.Response:
        """One API call, retried through restarts and outages; records every status seen."""
        deadline = time.monotonic() + deadline_s
        while True:
            try:
                response = await self.api.request(method, path, json=body)
            except httpx.TransportError:
                self.transport_errors += 1
            else:
                self.statuses.append(response.status_code)
                if response.status_code == 503:
                    self.unavailable.append(
                        {"content-type": response.headers.get("content-type"), **response.json()}
                    )
                elif response.status_code != 429:
                    return response
            if time.monotonic() > deadline:
                raise AssertionError(f"{method} {path} kept failing\n{self.logs()}")
            await asyncio.sleep(0.05)

    async def setup_entities(
        self,
        target: dict[str, Any] | None = None,
        *,
        runner_id: str | None = None,
        count: int = ENTITIES,
        first: int = 0,
    ) -> list[str]:
        """The runner (pool) and ``count`` entities targeting it (or ``target``); their urls."""
        runner_id = runner_id or self.runner_id
        r = await self.call("POST", "/v1/runners", {"id": runner_id, "label": "faults"})
        assert r.status_code in (200, 201), r.text
        policy = {"targets": [target or {"type": "runner", "runner_id": runner_id}]}
        urls = []
        for i in range(first, first + count):
            r = await self.call(
                "PUT", f"/v1/entities/{self.entity_type}/e{i:02d}", {"dispatch_policy": policy}
            )
            assert r.status_code == 201, r.text
            urls.append(f"/{self.entity_type}/e{i:02d}")
        return urls

    async def send(self, urls: list[str], offsets: range) -> None:
        """Messages ``offsets`` to every entity (in order per entity, entities concurrently);
        idempotency keys make the retries of ``call`` safe."""
        limit = asyncio.Semaphore(16)

        async def one_entity(url: str) -> None:
            for n in offsets:
                async with limit:
                    r = await self.call(
                        "POST",
                        f"/v1/entities{url}/messages",
                        {"payload": {"n": n}, "idempotency_key": f"{url}-{n}"},
                    )
                assert r.status_code == 202, r.text
                assert r.json()["offset"] == n, r.text

        await asyncio.gather(*(one_entity(url) for url in urls))

    # Postgres and the handler log

    async def fetch(self, sql: str, *args: Any) -> list[asyncpg.Record]:
        """A fresh connection each time: the Postgres scenario terminates backends."""
        for attempt in range(50):
            try:
                conn = await asyncpg.connect(self.database_url)
                try:
                    return await conn.fetch(sql, *args)
                finally:
                    await conn.close()
            except (asyncpg.PostgresConnectionError, asyncpg.InterfaceError, OSError):
                if attempt == 49:
                    raise
                await asyncio.sleep(0.1)
        raise AssertionError("unreachable")

    async def dispatch_rows(self) -> list[asyncpg.Record]:
        return await self.fetch(
            "SELECT e.url, e.status, d.tail_offset, d.acked_offset, d.active_claim_id, "
            "d.outstanding_wake_id, d.parked_reason, d.epoch "
            "FROM entities e JOIN dispatch_state d ON d.entity_url = e.url "
            "WHERE e.type = $1 ORDER BY e.url",
            self.entity_type,
        )

    def handled(self) -> list[dict[str, Any]]:
        try:
            lines = self.handler_log.read_text().splitlines()
        except FileNotFoundError:
            return []
        return [json.loads(line) for line in lines if line.strip()]

    async def wait_all_done(self, *, timeout: float = 45) -> float:
        """Until every entity is idle with everything acked; the seconds it took."""
        started = time.monotonic()
        while True:
            rows = await self.dispatch_rows()
            stuck = [
                dict(r)
                for r in rows
                if r["acked_offset"] != r["tail_offset"]
                or r["status"] != "idle"
                or r["active_claim_id"] is not None
            ]
            if rows and not stuck:
                return time.monotonic() - started
            if time.monotonic() - started > timeout:
                wakes = await self.fetch(
                    "SELECT entity_url, epoch, reason, delivery_status, claim_status, attempts, "
                    "last_error FROM wakes WHERE entity_url = ANY($1::text[]) "
                    "ORDER BY entity_url, epoch",
                    [s["url"] for s in stuck[:5]],
                )
                raise AssertionError(
                    f"{len(stuck)} entities not done after {timeout} s: {stuck[:5]}\n"
                    f"wakes: {[dict(w) for w in wakes]}\n{self.logs()}"
                )
            await asyncio.sleep(0.2)

    async def check_invariants(self, urls: list[str]) -> None:
        rows = await self.dispatch_rows()
        assert [r["url"] for r in rows] == sorted(urls)
        for r in rows:
            assert r["tail_offset"] == MESSAGES, dict(r)  # nothing lost, nothing doubled
            assert r["acked_offset"] == r["tail_offset"], dict(r)  # every message acked
            assert r["status"] == "idle", dict(r)
            assert r["active_claim_id"] is None, dict(r)
            assert r["parked_reason"] is None, dict(r)
        overlaps = await self.fetch(
            "SELECT a.entity_url, a.id, a.claimed_at, a.released_at, b.id, b.claimed_at "
            "FROM claims a JOIN claims b ON a.entity_url = b.entity_url AND a.id < b.id "
            "WHERE a.entity_url = ANY($1::text[]) AND "
            "tstzrange(a.claimed_at, coalesce(a.released_at, 'infinity')) && "
            "tstzrange(b.claimed_at, coalesce(b.released_at, 'infinity'))",
            urls,
        )
        assert overlaps == [], f"two claims of one entity overlapped: {overlaps[:5]}"
        active = await self.fetch(
            "SELECT id FROM claims WHERE status = 'active' AND entity_url = ANY($1::text[])", urls
        )
        assert active == []
        outstanding = await self.fetch(
            "SELECT id FROM wakes WHERE claim_status = 'unclaimed' "
            "AND delivery_status IN ('queued', 'delivered') AND entity_url = ANY($1::text[])",
            urls,
        )
        assert outstanding == [], "no wake left outstanding"


@pytest.fixture
async def faults(
    request: pytest.FixtureRequest, database_url: str, fault_redis_url: str, tmp_path: Path
) -> AsyncIterator[Faults]:
    conn = await asyncpg.connect(database_url)
    await conn.execute(f"TRUNCATE {TABLES} CASCADE")
    await conn.close()
    prefix = f"pwfault{secrets.token_hex(3)}"
    env = child_env(
        PULLWAKE_DATABASE_URL=database_url,
        PULLWAKE_REDIS_URL=fault_redis_url,
        PULLWAKE_REDIS_KEY_PREFIX=prefix,
        PULLWAKE_SSE_BLOCK_MS="200",
        PULLWAKE_SSE_KEEPALIVE_MS="1000",
        PULLWAKE_CLAIM_LEASE_MS=str(LEASE_MS),
        PULLWAKE_REDELIVER_AFTER_MS=str(REDELIVER_MS),
        PULLWAKE_STRANDED_AFTER_MS=str(STRANDED_MS),
        PULLWAKE_RECOVERY_INTERVAL_MS=str(RECOVERY_MS),
        PULLWAKE_HYGIENE_INTERVAL_MS="5000",
        PULLWAKE_WEBHOOK_ALLOW_PRIVATE="1",
        PULLWAKE_WEBHOOK_BACKOFF_MS="100",
        PULLWAKE_WEBHOOK_MAX_ATTEMPTS=str(WEBHOOK_ATTEMPTS),
        PULLWAKE_WEBHOOK_TIMEOUT_MS="2000",
    )
    redis: Redis = Redis.from_url(fault_redis_url, decode_responses=True)
    name = request.node.name.removeprefix("test_").split("_")[0]
    harness = Faults(tmp_path, env, database_url, redis, entity_type=f"fault{name}")
    started = time.monotonic()
    try:
        yield harness
    finally:
        harness.cleanup()
        if harness.http is not None:
            await harness.http.aclose()
        await redis.aclose()
        log(f"{request.node.name}: {time.monotonic() - started:.1f} s")


def starts_by_entity(records: list[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    out: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for r in records:
        if r["kind"] == "start":
            out[r["entity"]].append(r)
    return out


def assert_every_message_handled(faults: Faults, urls: list[str]) -> None:
    handled = {(r["entity"], r["offset"]) for r in faults.handled() if r["kind"] == "msg"}
    missing = [(u, n) for u in urls for n in range(1, MESSAGES + 1) if (u, n) not in handled]
    assert missing == [], f"messages acked but never handled: {missing[:10]}"


async def wait_until(
    check: Callable[[], Awaitable[Any]], *, timeout: float, what: str, faults: Faults
) -> Any:
    return await wait_for(check, timeout=timeout, interval=0.05, what=what, context=faults.logs)


# --- 1. kill -9 of a runner in the middle of a handler ------------------------------------------


async def test_runner_killed_mid_handler_work_redone_after_lease(faults: Faults):
    await faults.start()
    urls = await faults.setup_entities()
    victim = await faults.start_runner("victim", handle_ms=1_500)
    survivor = await faults.start_runner("survivor", handle_ms=20)
    await faults.send(urls, range(1, MESSAGES + 1))
    assert victim.proc is not None
    victim_pid = victim.proc.pid

    async def victim_mid_handler() -> list[dict[str, Any]]:
        records = faults.handled()
        ended = {r["claim"] for r in records if r["kind"] == "end"}
        now = time.time()
        return [
            r
            for r in records
            if r["kind"] == "start"
            and r["pid"] == victim_pid
            and r["claim"] not in ended
            and now - r["t"] > 0.3  # well inside the 1.5 s handler
        ]

    await wait_until(victim_mid_handler, timeout=20, what="victim mid-handler", faults=faults)
    killed_at = kill9(victim)
    records = faults.handled()
    ended = {r["claim"] for r in records if r["kind"] == "end"}
    in_flight = [
        r
        for r in records
        if r["kind"] == "start" and r["pid"] == victim_pid and r["claim"] not in ended
    ]
    assert in_flight

    async def redelivered() -> dict[str, float] | None:
        starts = starts_by_entity(faults.handled())
        found = {}
        for lost in in_flight:
            later = [
                s
                for s in starts[lost["entity"]]
                if s["pid"] != victim_pid and s["epoch"] > lost["epoch"]
            ]
            if not later:
                return None
            found[lost["entity"]] = min(s["t"] for s in later) - killed_at
        return found

    delays = await wait_until(
        redelivered, timeout=LEASE_MS / 1000 + 15, what="redelivery to the survivor", faults=faults
    )
    first, last = min(delays.values()), max(delays.values())
    heartbeat_s = LEASE_MS / 3 / 1000
    message = (
        f"kill -9 -> claimed by another runner: {first:.2f}-{last:.2f} s for "
        f"{len(delays)} in-flight claims; lease {LEASE_MS / 1000:.1f} s, recovery every "
        f"{RECOVERY_MS / 1000:.1f} s, runner heartbeat every ~{heartbeat_s:.2f} s"
    )
    log(message)
    # Not before the lease can have run out (the last heartbeat was at most one interval ago),
    # and no later than the lease plus one recovery interval plus delivery slack.
    assert first >= LEASE_MS / 1000 - heartbeat_s - 0.3, message
    assert last <= (LEASE_MS + RECOVERY_MS) / 1000 + 2.5, message

    # The killed process's late done (replayed with its saved token) is fenced.
    for lost in in_flight:
        r = await faults.api.post(
            f"/v1/claims/{lost['claim']}/done",
            json={"epoch": lost["epoch"], "acked_offset": lost["tail"]},
            headers={"Authorization": f"Bearer {lost['token']}"},
        )
        assert r.status_code == 409, r.text
        assert r.json()["code"] in {"FENCED", "LEASE_EXPIRED"}, r.text
        r = await faults.api.post(
            f"/v1/claims/{lost['claim']}/heartbeat",
            json={"epoch": lost["epoch"]},
            headers={"Authorization": f"Bearer {lost['token']}"},
        )
        assert r.status_code == 409, r.text

    took = await faults.wait_all_done()
    log(f"all done {took:.1f} s after the redelivery check")
    await faults.check_invariants(urls)
    assert_every_message_handled(faults, urls)
    expired = await faults.fetch(
        "SELECT id FROM claims WHERE end_reason = 'lease_expired' AND id = ANY($1::text[])",
        [r["claim"] for r in in_flight],
    )
    assert len(expired) == len(in_flight)
    assert survivor.alive


# --- 2. FLUSHDB of Redis while wakes are outstanding --------------------------------------------


async def test_redis_flushed_with_wakes_outstanding_all_delivered(faults: Faults):
    """Half the entities target a connected pool, half a runner that connects only after the
    flush: its wakes then exist nowhere but in Postgres and must be re-published from there."""
    await faults.start()
    late_runner = f"{faults.runner_id}-late"
    half = ENTITIES // 2
    urls = await faults.setup_entities(count=half)
    late = await faults.setup_entities(runner_id=late_runner, count=ENTITIES - half, first=half)
    urls += late
    await faults.start_runner("a", handle_ms=150, concurrency=2)
    await faults.start_runner("b", handle_ms=150, concurrency=2)
    await faults.send(urls, range(1, MESSAGES // 2 + 1))
    rows = await faults.fetch(
        "SELECT runner_id, count(*) AS n FROM wakes WHERE claim_status = 'unclaimed' "
        "AND delivery_status IN ('queued', 'delivered') GROUP BY runner_id"
    )
    outstanding = {r["runner_id"]: r["n"] for r in rows}
    assert await faults.redis.flushdb()
    flushed_at = time.monotonic()
    log(f"FLUSHDB with wakes outstanding in Postgres: {outstanding}")
    assert outstanding.get(late_runner) == len(late)
    await faults.send(urls, range(MESSAGES // 2 + 1, MESSAGES + 1))  # coalesced for `late`
    await faults.start_runner("late", handle_ms=20, runner_id=late_runner)

    took = await faults.wait_all_done()
    log(f"all delivered and done {time.monotonic() - flushed_at:.1f} s after FLUSHDB")
    await faults.check_invariants(urls)
    assert_every_message_handled(faults, urls)
    assert all(r.alive for r in faults.runners)
    worker_log = faults.workers[0].log()
    assert "rebuilding from Postgres" in worker_log or "missing from the wake stream" in (
        worker_log
    ), worker_log[-3000:]
    assert took < 40


# --- 3. restart of the API while runners are connected ------------------------------------------


async def test_api_restart_runners_reconnect_and_finish(faults: Faults):
    await faults.start()
    urls = await faults.setup_entities()
    runners = [
        await faults.start_runner("a", handle_ms=100),
        await faults.start_runner("b", handle_ms=100),
    ]
    await faults.send(urls, range(1, MESSAGES // 2 + 1))
    assert faults.server is not None
    down_at = time.monotonic()
    await faults.server.stop(signal.SIGTERM)
    await asyncio.sleep(0.5)
    await faults.server.start()
    log(f"API down for {time.monotonic() - down_at:.1f} s (SIGTERM, restart on the same port)")
    for runner in runners:
        await runner.wait_log("connected: streaming wakes", count=2, timeout=20)
    await faults.send(urls, range(MESSAGES // 2 + 1, MESSAGES + 1))

    took = await faults.wait_all_done()
    log(f"all done {took:.1f} s after the last send")
    await faults.check_invariants(urls)
    assert_every_message_handled(faults, urls)
    assert all(r.alive for r in runners)


# --- 4. kill -9 of an arq worker ------------------------------------------------------------------


async def test_worker_killed_second_worker_carries_on(faults: Faults):
    """The second worker is plain ``arq pullwake.tasks.WorkerSettings``: both entry points
    serve the same queue and crons, and it alone expires the killed runner's claims."""
    await faults.start(workers=1)
    first = faults.workers[0]
    second = await faults.start_worker(plain_arq=True)
    urls = await faults.setup_entities()
    victim = await faults.start_runner("victim", handle_ms=1_500)
    await faults.start_runner("survivor", handle_ms=20)
    await faults.send(urls, range(1, MESSAGES + 1))
    assert victim.proc is not None
    victim_pid = victim.proc.pid

    async def victim_in_flight() -> bool:
        records = faults.handled()
        ended = {r["claim"] for r in records if r["kind"] == "end"}
        return any(
            r["kind"] == "start" and r["pid"] == victim_pid and r["claim"] not in ended
            for r in records
        )

    await wait_until(victim_in_flight, timeout=20, what="victim in flight", faults=faults)
    first.kill()
    worker_killed = time.time()
    kill9(victim)  # its claims can only be expired by the surviving worker now
    passes_before = second.log().count("'expired_claims'")

    took = await faults.wait_all_done()
    expired = await faults.fetch(
        "SELECT count(*) AS n FROM claims WHERE end_reason = 'lease_expired' "
        "AND released_at > to_timestamp($1)",
        worker_killed,
    )
    expiring_passes = second.log().count("'expired_claims'") - passes_before
    log(
        f"worker 1 killed; {expired[0]['n']} claims expired afterwards by the plain-arq worker "
        f"({expiring_passes} expiring passes); all done {took:.1f} s later"
    )
    assert expired[0]["n"] >= 1
    assert expiring_passes >= 1, second.log()[-3000:]
    assert second.proc is not None
    assert second.proc.poll() is None
    await faults.check_invariants(urls)
    assert_every_message_handled(faults, urls)


async def test_worker_once_runs_one_recovery_pass(faults: Faults):
    """``pullwake worker --once``: one pass, its counts printed as JSON."""
    await faults.start(workers=0)
    urls = await faults.setup_entities(count=2)
    for url in urls:
        await faults.call("POST", f"/v1/entities{url}/messages", {"payload": {"n": 1}})
    for url in urls:
        r = await faults.call("GET", f"/v1/entities{url}")
        wake_id = r.json()["dispatch"]["outstanding_wake_id"]
        r = await faults.call("POST", f"/v1/runners/{faults.runner_id}/claim", {"wake_id": wake_id})
        assert r.status_code == 200, r.text
    await asyncio.sleep(LEASE_MS / 1000 + 0.2)

    result = (await Cli(faults.env)("worker", "--once")).ok()

    counts = json.loads(result.stdout.strip().splitlines()[-1])
    assert counts["expired_claims"] == 2, result.describe()
    assert counts["rewakes"] == 2, result.describe()
    again = json.loads((await Cli(faults.env)("worker", "--once")).ok().stdout.splitlines()[-1])
    assert "expired_claims" not in again


# --- 5. webhook targets: flaky and always failing ------------------------------------------------


@dataclass
class HookTarget(WebhookTarget):
    """500, 500, then 200 ``{"done": true}`` per wake; ``failing`` entities always 500."""

    failing: set[str] = field(default_factory=set)
    attempts: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    processed: list[tuple[str, int]] = field(default_factory=list)
    answered_ok: list[str] = field(default_factory=list)

    def respond(self, hit: Hit) -> Reply:
        note = hit.json()
        entity = note["entity"]["url"]
        self.attempts[note["wake_id"]] += 1
        if entity in self.failing or self.attempts[note["wake_id"]] < 3:
            return 500, {"error": "injected"}, {}
        self.answered_ok.append(note["wake_id"])
        self.processed += [(entity, m["offset"]) for m in note["messages"]]
        return 200, {"done": True}, {}


async def test_webhook_flaky_target_processed_once_failing_one_parked_and_resumed(
    faults: Faults,
):
    target = HookTarget()
    async with serve_in_background(target) as base_url:
        await faults.start()
        hook = {"type": "webhook", "url": f"{base_url}/hook", "secret": "whsec_" + "A" * 32}
        urls = await faults.setup_entities(target=hook)
        failing = set(urls[:4])
        target.failing |= failing
        await faults.send(urls, range(1, MESSAGES + 1))

        async def failing_parked() -> bool:
            rows = await faults.dispatch_rows()
            return all(r["parked_reason"] for r in rows if r["url"] in failing)

        await wait_until(failing_parked, timeout=30, what="failing targets parked", faults=faults)
        for url in failing:
            r = await faults.call("GET", f"/v1/entities{url}")
            dispatch = r.json()["dispatch"]
            assert dispatch["parked_reason"] == (
                f"webhook delivery failed after {WEBHOOK_ATTEMPTS} attempts: HTTP 500"
            ), dispatch
            assert dispatch["outstanding_wake_id"] is None
            assert dispatch["active_claim"] is None
        failed = await faults.fetch(
            "SELECT entity_url, attempts FROM wakes WHERE delivery_status = 'failed'"
        )
        assert {r["entity_url"] for r in failed} == failing
        assert {r["attempts"] for r in failed} == {WEBHOOK_ATTEMPTS}
        assert not any(e in failing for e, _n in target.processed)

        # The target is fixed: resume makes the parked work deliverable again.
        target.failing.clear()
        for url in failing:
            r = await faults.call("POST", f"/v1/entities{url}/signal", {"signal": "resume"})
            assert r.status_code == 200, r.text
            assert r.json()["dispatch"]["parked_reason"] is None

        took = await faults.wait_all_done()
        log(f"webhooks: all done {took:.1f} s after resume; {len(target.answered_ok)} wakes")
    await faults.check_invariants(urls)
    # Processed once: every message reached the target in exactly one 2xx-answered delivery.
    counts: dict[tuple[str, int], int] = defaultdict(int)
    for item in target.processed:
        counts[item] += 1
    assert sorted(counts) == sorted((u, n) for u in urls for n in range(1, MESSAGES + 1))
    assert set(counts.values()) == {1}, {k: v for k, v in counts.items() if v != 1}
    # Every answered wake took exactly 500, 500, 200.
    delivered = await faults.fetch(
        "SELECT id, attempts FROM wakes WHERE delivery_status = 'delivered' "
        "AND entity_url = ANY($1::text[])",
        urls,
    )
    assert {r["id"] for r in delivered} == set(target.answered_ok)
    assert {r["attempts"] for r in delivered} == {3}


# --- 6. Postgres briefly unavailable ---------------------------------------------------------


async def test_postgres_backends_terminated_api_503_never_500_nothing_lost(faults: Faults):
    await faults.start()
    urls = await faults.setup_entities()
    await faults.start_runner("a", handle_ms=50)
    await faults.start_runner("b", handle_ms=50)
    await faults.send(urls, range(1, MESSAGES // 2 + 1))
    datname = urlsplit(faults.database_url).path.lstrip("/")
    terminated = 0

    async def terminate_for(seconds: float) -> None:
        nonlocal terminated
        admin = await asyncpg.connect(ADMIN_DATABASE_URL)
        try:
            end = time.monotonic() + seconds
            while time.monotonic() < end:
                terminated += await admin.fetchval(
                    "SELECT count(*) FILTER (WHERE pg_terminate_backend(pid)) "
                    "FROM pg_stat_activity WHERE datname = $1 AND pid <> pg_backend_pid()",
                    datname,
                )
                await asyncio.sleep(0.05)
        finally:
            await admin.close()

    async def probe(seconds: float) -> None:
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            with contextlib.suppress(httpx.TransportError):
                r = await faults.api.get(f"/v1/entities{urls[0]}")
                faults.statuses.append(r.status_code)
                if r.status_code == 503:
                    faults.unavailable.append(
                        {"content-type": r.headers.get("content-type"), **r.json()}
                    )
            await asyncio.sleep(0.02)

    outage_started = time.monotonic()
    await asyncio.gather(
        terminate_for(1.2),
        probe(1.5),
        faults.send(urls, range(MESSAGES // 2 + 1, MESSAGES + 1)),
    )

    # Recovers by itself: ready again, and the work completes.
    async def ready() -> bool:
        with contextlib.suppress(httpx.TransportError):
            return (await faults.api.get("/readyz")).status_code == 200
        return False

    await wait_until(ready, timeout=10, what="/readyz after the outage", faults=faults)
    recovered = time.monotonic() - outage_started
    took = await faults.wait_all_done()
    status_counts = {s: faults.statuses.count(s) for s in sorted(set(faults.statuses))}
    log(
        f"terminated {terminated} backends over 1.2 s; API answers {status_counts}; "
        f"ready {recovered:.1f} s after the outage began; all done {took:.1f} s later"
    )
    assert terminated > 0
    assert 500 not in faults.statuses, status_counts
    for problem in faults.unavailable:
        assert problem["content-type"].startswith("application/problem+json"), problem
        assert problem["code"] == "UNAVAILABLE", problem
        assert problem["status"] == 503, problem
    assert faults.server is not None
    server_log = faults.server.log()
    assert '" 500' not in server_log, server_log[-5000:]
    assert "unexpected error" not in server_log, server_log[-5000:]
    await faults.check_invariants(urls)
    assert_every_message_handled(faults, urls)
