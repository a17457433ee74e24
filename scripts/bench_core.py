"""The benchmark's run: its database, Redis keys, server and other processes, settings.

:class:`Bench` owns everything one run creates (a fresh database, a Redis key prefix, the
``pullwake serve`` process and the processes the scenarios start) and removes it afterwards.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import secrets
import shutil
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import httpx
from bench_load import Client
from bench_measure import Meter, Proc, Usage, spawn
from bench_report import Result, summarize
from redis.asyncio import Redis

from pullwake.store.migrate import apply_migrations
from pullwake.streams.keys import GROUP, Keys
from pullwake.testing import free_port

SCRIPTS = Path(__file__).resolve().parent
ADMIN_DATABASE_URL = os.environ.get(
    "PULLWAKE_TEST_DATABASE_URL", "postgresql://postgres@127.0.0.1:5432/postgres"
)
REDIS_URL = os.environ.get("PULLWAKE_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")
PULLWAKE = (sys.executable, "-m", "pullwake")
PRINCIPAL = "user:bench@example.com"
POOL = 10  # PULLWAKE_PG_POOL_MAX of the server (its default), and the floor's pool
IN_FLIGHT = 32
POKE_RUNNER, POKE_TYPE, POKE_ID = "bench-poke", "bench-poke", "p"


@dataclass(frozen=True)
class Profile:
    """How much of each scenario one run does."""

    name: str
    warmup: bool
    floor_sequential: int
    floor_concurrent: int
    arq: dict[str, tuple[int, int]]  # poll delay label -> (sequential jobs, burst jobs)
    wake_rounds: int
    coalesce_s: int
    batch_messages: int
    cycle_s: float
    recoveries: int
    lease_ms: int
    offline_runners: int  # the offline fleet: registered runners with a waiting wake each
    offline_warmup_s: float  # at least this long before the idle passes are measured
    offline_settle_s: float  # at most this long for the worker's start-up work to end
    offline_window_s: float
    offline_expiries: int


FULL = Profile(
    name="full",
    warmup=True,
    floor_sequential=1000,
    floor_concurrent=5000,
    arq={"0.5": (12, 100), "0.01": (200, 2000)},
    wake_rounds=300,
    coalesce_s=5,
    batch_messages=20_000,
    cycle_s=10,
    recoveries=3,
    lease_ms=2000,
    offline_runners=10_000,
    offline_warmup_s=17,  # re-delivery's first look at the wakes (PULLWAKE_REDELIVER_AFTER_MS)
    offline_settle_s=300,
    offline_window_s=10,
    offline_expiries=3,
)
SMOKE = Profile(
    name="smoke",
    warmup=False,
    floor_sequential=30,
    floor_concurrent=200,
    arq={"0.5": (2, 10), "0.01": (10, 100)},
    wake_rounds=15,
    coalesce_s=1,
    batch_messages=2000,
    cycle_s=1.5,
    recoveries=1,
    lease_ms=1000,
    offline_runners=200,
    offline_warmup_s=1,
    offline_settle_s=5,
    offline_window_s=3,
    offline_expiries=1,
)


def wrk_version() -> str | None:
    """``wrk``'s version word, or None when it is not installed."""
    if shutil.which("wrk") is None:
        return None
    out = subprocess.run(["wrk", "--version"], capture_output=True, text=True, check=False)
    words = (out.stdout or out.stderr).split()
    return words[1] if len(words) > 1 else "?"


# --- the bench ----------------------------------------------------------------------------------


@dataclass
class Server:
    proc: Proc
    port: int

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.port}"


@dataclass
class Notes:
    """Handler reports from the runner processes, over UDP: (entity, offset, time, pid)."""

    port: int = 0
    received: list[tuple[str, int, float, int]] = field(default_factory=list)
    listeners: list[Callable[[tuple[str, int, float, int]], None]] = field(default_factory=list)
    transport: asyncio.DatagramTransport | None = None

    async def open(self) -> None:
        notes = self

        class Protocol(asyncio.DatagramProtocol):
            def datagram_received(self, data: bytes, addr: tuple[str | Any, int]) -> None:
                url, offset, at, pid = json.loads(data)
                note = (str(url), int(offset), float(at), int(pid))
                notes.received.append(note)
                for listener in list(notes.listeners):
                    listener(note)

        loop = asyncio.get_running_loop()
        transport, _ = await loop.create_datagram_endpoint(Protocol, local_addr=("127.0.0.1", 0))
        self.transport = transport
        self.port = transport.get_extra_info("sockname")[1]

    async def wait(
        self, test: Callable[[tuple[str, int, float, int]], bool], timeout: float
    ) -> tuple[str, int, float, int]:
        """The first note (already received or coming) for which ``test`` holds."""
        for note in self.received:
            if test(note):
                return note
        found: asyncio.Future[tuple[str, int, float, int]] = (
            asyncio.get_running_loop().create_future()
        )

        def listener(note: tuple[str, int, float, int]) -> None:
            if test(note) and not found.done():
                found.set_result(note)

        self.listeners.append(listener)
        try:
            return await asyncio.wait_for(found, timeout)
        finally:
            self.listeners.remove(listener)

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()


class Bench:
    """One benchmark run: its database, Redis keys, processes and results."""

    def __init__(self, args: argparse.Namespace, profile: Profile, logs: Path) -> None:
        self.args = args
        self.profile = profile
        self.logs = logs
        self.db_name = f"pullwake_bench_{secrets.token_hex(4)}"
        self.db_url = urlunsplit(urlsplit(ADMIN_DATABASE_URL)._replace(path=f"/{self.db_name}"))
        self.prefix = f"pwbench{secrets.token_hex(4)}"
        self.keys = Keys(self.prefix)
        self.admin: asyncpg.Connection = None  # type: ignore[assignment]
        self.redis: Redis = Redis.from_url(REDIS_URL)
        self.meter = Meter(self)
        self.server: Server | None = None
        self.worker: Proc | None = None
        self.client: Client = None  # type: ignore[assignment]
        self.token = ""
        self.results: dict[str, Result] = {}
        self.notes = Notes()
        self.procs: list[Proc] = []
        self.messages: list[str] = []
        self.wrk_version = wrk_version()
        self.settle_broken = False

    # -- environment and processes

    def env(self, **extra: str) -> dict[str, str]:
        """This environment without inherited PULLWAKE_* settings, plus the bench's."""
        env = {k: v for k, v in os.environ.items() if not k.startswith("PULLWAKE_")}
        env.update(
            PYTHONUNBUFFERED="1",
            PULLWAKE_DATABASE_URL=self.db_url,
            PULLWAKE_REDIS_URL=REDIS_URL,
            PULLWAKE_REDIS_KEY_PREFIX=self.prefix,
            PULLWAKE_PG_POOL_MAX=str(POOL),
            PULLWAKE_CLAIM_LEASE_MS=str(self.profile.lease_ms),
            # recovery kills a holder several times in a row; do not park the entity for it
            PULLWAKE_MAX_ATTEMPTS="1000",
        )
        env.update(extra)
        return env

    def note(self, text: str) -> None:
        self.messages.append(text)
        print(f"  note: {text}")

    async def start_server(self, name: str = "serve", **env: str) -> Server:
        port = free_port()
        base = f"http://127.0.0.1:{port}"
        argv = [*PULLWAKE, "serve", "--no-migrate", "--host", "127.0.0.1", "--port", str(port)]
        proc = spawn(name, argv, self.env(PULLWAKE_PUBLIC_URL=base, **env), self.logs)
        self.procs.append(proc)
        deadline = time.monotonic() + 60
        async with httpx.AsyncClient(base_url=base, timeout=2) as http:
            while True:
                if not proc.alive:
                    raise RuntimeError(f"pullwake serve exited:\n{proc.log_tail()}")
                with contextlib.suppress(httpx.TransportError):
                    if (await http.get("/readyz")).status_code == 200:
                        break
                if time.monotonic() > deadline:
                    raise RuntimeError(f"pullwake serve not ready in 60 s:\n{proc.log_tail()}")
                await asyncio.sleep(0.05)
        self.meter.dirty = True
        print(f"  pullwake serve: pid {proc.pid}, {base}")
        return Server(proc, port)

    async def start_worker(self, *options: str, name: str = "worker") -> Proc:
        # named, so that the bench can wait for its backends to exit after stopping it
        env = self.env(PULLWAKE_DATABASE_URL=f"{self.db_url}?application_name=pullwake-worker")
        proc = spawn(name, [*PULLWAKE, "worker", *options], env, self.logs)
        self.procs.append(proc)
        deadline = time.monotonic() + 60
        while "worker: recovery every" not in proc.log_tail(200):
            if not proc.alive or time.monotonic() > deadline:
                raise RuntimeError(f"pullwake worker did not start:\n{proc.log_tail()}")
            await asyncio.sleep(0.05)
        self.meter.dirty = True
        return proc

    async def start_runners(
        self, runner_id: str, count: int, *, drain_ms: int = 2000
    ) -> list[Proc]:
        """``count`` ``pullwake runner`` processes (one pool), connected to their stream."""
        assert self.server is not None
        pythonpath = os.pathsep.join(p for p in (str(SCRIPTS), os.environ.get("PYTHONPATH")) if p)
        env = self.env(
            PULLWAKE_TOKEN=self.token,
            PULLWAKE_BENCH_NOTIFY=f"127.0.0.1:{self.notes.port}",
            PYTHONPATH=pythonpath,
        )
        procs = []
        for n in range(count):
            argv = [
                *PULLWAKE,
                "runner",
                "--id",
                runner_id,
                "--handler",
                "bench_handler:handle",
                "--server",
                self.server.base,
                "--session",
                f"{runner_id}-{n}",
                "--concurrency",
                str(self.args.runner_concurrency),
                "--drain-timeout-ms",
                str(drain_ms),
                "--label",
                "bench",
            ]
            procs.append(spawn(f"runner-{runner_id}-{n}", argv, env, self.logs))
        self.procs.extend(procs)
        sessions = {f"{runner_id}-{n}" for n in range(count)}
        stream = self.keys.runner_wakes(runner_id)
        deadline = time.monotonic() + 60
        while True:
            for proc in procs:
                if not proc.alive:
                    raise RuntimeError(f"{proc.name} exited:\n{proc.log_tail()}")
            try:
                consumers = await self.redis.xinfo_consumers(stream, GROUP)
            except Exception:
                consumers = []
            names = {c["name"].decode() for c in consumers}
            if sessions <= names:
                break
            if time.monotonic() > deadline:
                raise RuntimeError(f"runners did not connect in 60 s:\n{procs[0].log_tail()}")
            await asyncio.sleep(0.05)
        self.meter.dirty = True
        return procs

    # -- API helpers

    async def api(self, method: str, path: str, payload: Any = None) -> Any:
        self.meter.dirty = True
        return await self.client.json(method, path, payload)

    async def entity(self, type_: str, id_: str, runner_id: str) -> None:
        policy = {"targets": [{"type": "runner", "runner_id": runner_id}]}
        await self.api("PUT", f"/v1/entities/{type_}/{id_}", {"dispatch_policy": policy})

    async def create_token(self) -> str:
        proc = await asyncio.create_subprocess_exec(
            *PULLWAKE,
            "tokens",
            "create",
            "--principal",
            PRINCIPAL,
            "--label",
            "bench",
            env=self.env(),
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        out, err = await proc.communicate()
        if proc.returncode:
            raise RuntimeError(f"pullwake tokens create failed: {err.decode()}")
        return out.decode().strip()

    # -- settling Postgres statistics

    async def backends_gone(self, application_name: str, timeout: float = 10) -> None:
        """Wait until no backend of the bench database has ``application_name``: a backend
        publishes its last counts as it exits, a moment after its client closed."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and await self.admin.fetchval(
            "SELECT count(*) FROM pg_stat_activity WHERE datname = $1 AND application_name = $2",
            self.db_name,
            application_name,
        ):
            await asyncio.sleep(0.01)

    async def settle(self) -> bool:
        """Make every pooled connection of the server publish its pending statistics.

        A backend publishes its counts when it goes idle at least a second after it last did.
        The bench holds the poke entity's dispatch row; ``POOL`` sends to it then take one
        pooled connection each and wait on that lock; a second later the lock is released and
        each of them commits, publishing. True when all ``POOL`` were seen waiting.
        """
        if self.server is None or self.settle_broken:
            await asyncio.sleep(1.05)
            return False
        conn = await asyncpg.connect(
            self.db_url, server_settings={"application_name": "bench-settle"}
        )
        try:
            seen = await self._poke(conn)
        except asyncpg.PostgresError as exc:  # the schema moved on: counts stay unsettled
            self.settle_broken = True
            self.note(f"cannot settle Postgres statistics ({exc}): their counts are approximate")
            seen = False
        finally:
            await conn.close()
        await self.backends_gone("bench-settle")
        return seen

    async def _poke(self, conn: asyncpg.Connection) -> bool:
        body = {"payload": {"poke": True}}
        path = f"/v1/entities/{POKE_TYPE}/{POKE_ID}/messages"
        seen = False
        sends: list[asyncio.Future[Any]] = []
        try:
            async with conn.transaction():
                await conn.execute(
                    "SELECT 1 FROM dispatch_state WHERE entity_url = $1 FOR UPDATE",
                    f"/{POKE_TYPE}/{POKE_ID}",
                )
                sends = [
                    asyncio.ensure_future(self.client.json("POST", path, body)) for _ in range(POOL)
                ]
                deadline = time.monotonic() + 5
                while time.monotonic() < deadline:
                    waiting = await self.admin.fetchval(
                        "SELECT count(*) FROM pg_stat_activity WHERE datname = $1 "
                        "AND wait_event_type = 'Lock'",
                        self.db_name,
                    )
                    if waiting >= POOL:
                        seen = True
                        break
                    await asyncio.sleep(0.01)
                await asyncio.sleep(1.05)
            await asyncio.gather(*sends)
        finally:
            for send in sends:
                send.cancel()
        return seen

    # -- set-up and clean-up

    @contextlib.asynccontextmanager
    async def running(self) -> AsyncIterator[None]:
        self.admin = await asyncpg.connect(ADMIN_DATABASE_URL)
        await self.admin.execute(f'CREATE DATABASE "{self.db_name}"')
        try:
            await apply_migrations(self.db_url)
            await self.notes.open()
            self.token = await self.create_token()
            self.server = await self.start_server()
            self.client = Client("127.0.0.1", self.server.port, self.token, size=64)
            yield
        finally:
            self.notes.close()
            if self.client is not None:
                self.client.close()
            for proc in reversed(self.procs):
                await proc.stop(timeout=10)
            keys = [k async for k in self.redis.scan_iter(match=f"{self.prefix}:*", count=1000)]
            if keys:
                await self.redis.delete(*keys)
            await self.redis.aclose()
            await self.admin.execute(f'DROP DATABASE IF EXISTS "{self.db_name}" WITH (FORCE)')
            await self.admin.close()

    async def prepare(self) -> None:
        """Runners and entities every scenario uses; the cost of a settle."""
        for runner_id in (POKE_RUNNER, "bench", "sink", "cycle", "recover"):
            await self.api("POST", "/v1/runners", {"id": runner_id})
        await self.entity(POKE_TYPE, POKE_ID, POKE_RUNNER)
        await self.entity("bench", "wake", "bench")
        await self.entity("bench", "hot", "sink")
        for i in range(self.args.batch_entities):
            await self.entity("batch", f"e{i}", "sink")
        for i in range(self.args.cycle_entities):
            await self.entity("cycle", f"e{i}", "cycle")
        await self.entity("recover", "r", "recover")
        # The first send wakes the poke entity; every poke's sends coalesce: measure one.
        await self.api("POST", f"/v1/entities/{POKE_TYPE}/{POKE_ID}/messages", {"payload": {}})
        first, ok1 = await self.meter.settled_xacts()
        second, ok2 = await self.meter.settled_xacts()
        assert first is not None
        assert second is not None
        cost = (second[0] - first[0], second[1] - first[1])
        self.meter.poke_cost = cost
        self.meter._last = (second, ok1 and ok2)
        self.meter.dirty = False
        print(
            f"  settling Postgres statistics costs {cost[0]} transactions "
            f"({POOL} coalesced sends; all connections seen waiting: {ok1 and ok2})"
        )

    def record(self, result: Result) -> None:
        self.results[result.key] = result
        print(summarize(result))


def usage_fields(usage: Usage, ops: int, *, runner: bool = True) -> dict[str, Any]:
    """Per-operation costs of ``usage`` for a :class:`Result`."""

    def per_op_us(value: float | None) -> float | None:
        return None if value is None or not ops else value / ops * 1e6

    return {
        "server_cpu_us": per_op_us(usage.server_cpu_s),
        "runner_cpu_us": per_op_us(usage.runner_cpu_s) if runner else None,
        "bench_cpu_us": per_op_us(usage.bench_cpu_s),
        "pg_cpu_us": per_op_us(usage.pg_cpu_s),
        "redis_cpu_us": per_op_us(usage.redis_cpu_s),
        "pg_xacts": None if usage.xacts is None or not ops else usage.xacts / ops,
        "pg_rollbacks": None if usage.rollbacks is None or not ops else usage.rollbacks / ops,
        "stats_settled": usage.settled,
        "window_s": usage.wall_s,
    }
