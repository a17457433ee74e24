"""pullwake benchmark, side by side with its floor and with arq.

One invocation measures, on this machine and on loopback only, bounded in count and time:

- floor: one asyncpg ``INSERT ... RETURNING`` into a fresh table plus an ``XADD``, read by a
  blocked ``XREADGROUP``, from this process (1, then 32 in flight);
- arq: enqueue → job start through a real arq worker process, with arq's default polling
  (``poll_delay`` 0.5 s) and with ``poll_delay=0.01``, on arq's own Redis database;
- pullwake, with ``pullwake serve`` as its own process: send → wake on a runner's SSE stream
  (then claim and done); 32 sends in flight to one entity with an outstanding wake (coalesced;
  ``wrk`` when installed, else client processes); batch sends (``POST /v1/messages``); full
  cycles send → wake → claim → done through N ``pullwake runner`` processes; recovery after
  ``kill -9`` of a runner process holding a claim (with a ``pullwake worker`` process).

For each: latency percentiles, throughput, CPU per operation of the server process tree, of
the runner processes and of the Postgres backends serving the bench database (all from
``/proc``), and Postgres transactions per operation (``pg_stat_database``). Results go to
``bench-results/``: ``results.json``, ``results.md`` and ``results.png``.

Postgres publishes a backend's transaction counts at most once a second, when the backend goes
idle; an idle backend keeps the last second's counts to itself. Before every reading the bench
makes each of the server's pooled connections finish one more transaction more than a second
after its last one (``settle``), and subtracts what that costs (measured at the start).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import importlib.metadata
import json
import os
import platform
import resource
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, cast
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import httpx
from bench_load import Client, HttpError, cpu_self_s
from bench_report import Result, summarize, write_results
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
CLK_TCK = os.sysconf("SC_CLK_TCK")


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
)


# --- CPU from /proc ---------------------------------------------------------------------------


def process_tree(pid: int) -> list[int]:
    """``pid`` and its descendants (Linux ``/proc``)."""
    tree, todo = [], [pid]
    while todo:
        current = todo.pop()
        tree.append(current)
        with (
            contextlib.suppress(OSError),
            open(f"/proc/{current}/task/{current}/children") as f,
        ):
            todo.extend(int(child) for child in f.read().split())
    return tree


def proc_cpu_s(pid: int) -> float | None:
    """CPU seconds of one process: the nanosecond on-CPU time of its threads
    (``/proc/PID/task/*/schedstat``), else utime + stime from ``/proc/PID/stat`` (clock ticks,
    10 ms: too coarse for a Postgres backend's share of a short window; a zombie keeps only
    these). None when the process is gone."""
    total, threads = 0, 0
    with contextlib.suppress(OSError):
        for task in os.listdir(f"/proc/{pid}/task"):
            with (
                contextlib.suppress(OSError, ValueError),
                open(f"/proc/{pid}/task/{task}/schedstat") as f,
            ):
                total += int(f.read().split()[0])
                threads += 1
    if threads:
        return total / 1e9
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def tree_cpu_s(pid: int) -> float:
    """CPU seconds of ``pid`` and its living descendants."""
    return sum(proc_cpu_s(member) or 0.0 for member in process_tree(pid))


def children_cpu_s() -> float:
    """CPU seconds of this process's children that have been waited for."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


# --- processes ----------------------------------------------------------------------------------


@dataclass
class Proc:
    """A child process whose output goes to a log file."""

    name: str
    popen: subprocess.Popen[bytes]
    log_path: Path

    @property
    def pid(self) -> int:
        return self.popen.pid

    @property
    def alive(self) -> bool:
        return self.popen.poll() is None

    def cpu_s(self) -> float:
        return tree_cpu_s(self.pid)

    def log_tail(self, lines: int = 30) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])

    async def stop(self, sig: int = signal.SIGTERM, timeout: float = 15) -> None:
        """Send ``sig``, wait up to ``timeout`` s, then SIGKILL."""
        if self.alive:
            with contextlib.suppress(ProcessLookupError):
                self.popen.send_signal(sig)
            deadline = time.monotonic() + timeout
            while self.alive and time.monotonic() < deadline:
                await asyncio.sleep(0.02)
        if self.alive:
            with contextlib.suppress(ProcessLookupError):
                self.popen.kill()
        await asyncio.to_thread(self.popen.wait)


def spawn(name: str, argv: list[str], env: dict[str, str], logs: Path) -> Proc:
    log_path = logs / f"{name}.log"
    with log_path.open("ab") as log:
        popen = subprocess.Popen(
            argv, env=env, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT
        )
    return Proc(name, popen, log_path)


# --- statistics -----------------------------------------------------------------------------------


def percentile(values: list[float], q: float) -> float:
    """Linear interpolation between the closest ranks."""
    ordered = sorted(values)
    if len(ordered) == 1:
        return ordered[0]
    position = q * (len(ordered) - 1)
    low = int(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


def dist(values_ms: list[float]) -> dict[str, float]:
    """p50/p95/p99/mean/max of latencies in ms (empty dict without values)."""
    if not values_ms:
        return {}
    return {
        "n": len(values_ms),
        "p50": percentile(values_ms, 0.50),
        "p95": percentile(values_ms, 0.95),
        "p99": percentile(values_ms, 0.99),
        "mean": sum(values_ms) / len(values_ms),
        "max": max(values_ms),
    }


# --- measuring a window -------------------------------------------------------------------------


@dataclass
class Usage:
    """What one measured window cost."""

    wall_s: float
    server_cpu_s: float | None
    runner_cpu_s: float | None
    bench_cpu_s: float
    pg_cpu_s: float | None
    redis_cpu_s: float | None
    xacts: int | None
    rollbacks: int | None
    settled: bool


@dataclass
class CpuSnapshot:
    t: float
    server: float | None
    runners: float | None
    bench: float
    pg: dict[int, float] | None
    redis: float | None


@dataclass
class Mark:
    server: list[Proc]
    runners: list[Proc]
    cpu: CpuSnapshot
    xacts: tuple[int, int] | None
    settled: bool


class Meter:
    """CPU of the processes involved, and the bench database's settled transaction count."""

    def __init__(self, bench: Bench) -> None:
        self.bench = bench
        self.poke_cost = (0, 0)
        self.dirty = True
        self._last: tuple[tuple[int, int] | None, bool] | None = None

    async def pg_backends(self) -> dict[int, float] | None:
        """CPU seconds of each backend connected to the bench database (None when the backends
        are not visible in this machine's /proc, as with Postgres in a container)."""
        rows = await self.bench.admin.fetch(
            "SELECT pid FROM pg_stat_activity WHERE datname = $1", self.bench.db_name
        )
        seen: dict[int, float] = {}
        for row in rows:
            cpu = proc_cpu_s(row["pid"])
            if cpu is not None and _comm(row["pid"]).startswith("postgres"):
                seen[row["pid"]] = cpu
        return seen if seen or not rows else None

    async def redis_cpu(self) -> float | None:
        try:
            info = await self.bench.redis.info("cpu")
        except Exception:
            return None
        return float(info["used_cpu_sys"]) + float(info["used_cpu_user"])

    async def snapshot(self, server: list[Proc], runners: list[Proc]) -> CpuSnapshot:
        return CpuSnapshot(
            t=time.perf_counter(),
            server=sum(p.cpu_s() for p in server) if server else None,
            runners=sum(p.cpu_s() for p in runners) if runners else None,
            bench=cpu_self_s(),
            pg=await self.pg_backends(),
            redis=await self.redis_cpu(),
        )

    async def xacts(self) -> tuple[int, int]:
        """(transactions, of which rolled back) of the bench database so far."""
        row = await self.bench.admin.fetchrow(
            "SELECT xact_commit, xact_rollback FROM pg_stat_database WHERE datname = $1",
            self.bench.db_name,
        )
        assert row is not None
        return int(row["xact_commit"]) + int(row["xact_rollback"]), int(row["xact_rollback"])

    async def settled_xacts(self) -> tuple[tuple[int, int] | None, bool]:
        settled = await self.bench.settle()
        return await self.xacts(), settled

    async def begin(self, server: Iterable[Proc] = (), runners: Iterable[Proc] = ()) -> Mark:
        """Start a window (settling Postgres statistics first unless nothing touched them)."""
        if self.dirty or self._last is None:
            self._last = await self.settled_xacts()
        self.dirty = False
        server, runners = list(server), list(runners)
        xacts, settled = self._last
        return Mark(server, runners, await self.snapshot(server, runners), xacts, settled)

    async def cpu(self, mark: Mark) -> CpuSnapshot:
        return await self.snapshot(mark.server, mark.runners)

    async def end(
        self,
        mark: Mark,
        cpu: CpuSnapshot | None = None,
        *,
        own_xacts: int = 0,
        before_settle: Callable[[], Any] | None = None,
    ) -> Usage:
        """Close a window: CPU at ``cpu`` (now by default); transactions once settled, less the
        settle's own and ``own_xacts`` (the bench's own queries in the window)."""
        end = cpu or await self.cpu(mark)
        if before_settle is not None:
            await before_settle()
        self._last = await self.settled_xacts()
        self.dirty = False
        xacts, settled = self._last
        start = mark.cpu
        total = rollbacks = None
        if xacts is not None and mark.xacts is not None:
            total = xacts[0] - mark.xacts[0] - self.poke_cost[0] - own_xacts
            rollbacks = xacts[1] - mark.xacts[1] - self.poke_cost[1]
        pg: float | None = None
        if start.pg is not None and end.pg is not None:
            pg = sum(cpu - start.pg.get(pid, 0.0) for pid, cpu in end.pg.items())
        return Usage(
            wall_s=end.t - start.t,
            server_cpu_s=_delta(start.server, end.server),
            runner_cpu_s=_delta(start.runners, end.runners),
            bench_cpu_s=end.bench - start.bench,
            pg_cpu_s=pg,
            redis_cpu_s=_delta(start.redis, end.redis),
            xacts=total,
            rollbacks=rollbacks,
            settled=settled and mark.settled,
        )


def _delta(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None else b - a


def _comm(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/comm") as f:
            return f.read().strip()
    except OSError:
        return ""


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

    async def start_server(self) -> Server:
        port = free_port()
        base = f"http://127.0.0.1:{port}"
        argv = [*PULLWAKE, "serve", "--no-migrate", "--host", "127.0.0.1", "--port", str(port)]
        proc = spawn("serve", argv, self.env(PULLWAKE_PUBLIC_URL=base), self.logs)
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

    async def start_worker(self) -> Proc:
        # named, so that the bench can wait for its backends to exit after stopping it
        env = self.env(PULLWAKE_DATABASE_URL=f"{self.db_url}?application_name=pullwake-worker")
        proc = spawn("worker", [*PULLWAKE, "worker"], env, self.logs)
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
        if self.server is None:
            await asyncio.sleep(1.05)
            return False
        conn = await asyncpg.connect(
            self.db_url, server_settings={"application_name": "bench-settle"}
        )
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
            await conn.close()
        await self.backends_gone("bench-settle")
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


# --- floor --------------------------------------------------------------------------------------


async def _no_reset(conn: asyncpg.Connection) -> None:
    if conn.is_in_transaction():
        await conn.execute("ROLLBACK")


class Floor:
    """One INSERT ... RETURNING + XADD per operation, read by a blocked XREADGROUP."""

    INSERT = "INSERT INTO bench_floor (entity, payload) VALUES ($1, $2) RETURNING id"

    def __init__(self, bench: Bench) -> None:
        self.bench = bench
        self.stream = f"{bench.prefix}:floor"
        self.writer: Redis = Redis.from_url(REDIS_URL)
        self.reader: Redis = Redis.from_url(REDIS_URL)
        self.pool: asyncpg.Pool | None = None
        self.arrived: dict[int, asyncio.Future[float]] = {}

    async def open_pool(self) -> None:
        # No reset query per release (asyncpg's default is one more round trip and one more
        # transaction); pullwake's pool skips it the same way.
        self.pool = await asyncpg.create_pool(
            self.bench.db_url,
            min_size=POOL,
            max_size=POOL,
            reset=_no_reset,
            server_settings={"application_name": "bench-floor"},
        )

    async def close_pool(self) -> None:
        if self.pool is not None:
            await self.pool.close()
            self.pool = None
            self.bench.meter.dirty = True
            await self.bench.backends_gone("bench-floor")

    async def read(self) -> None:
        while True:
            reply = await self.reader.xreadgroup(
                "g", "c", {self.stream: ">"}, count=100, block=5000
            )
            now = time.perf_counter()
            for _, entries in reply or []:
                for _, fields in entries:
                    waiter = self.arrived.get(int(fields[b"n"]))
                    if waiter is not None and not waiter.done():
                        waiter.set_result(now)

    async def op(self, n: int) -> float:
        """One operation; its latency in ms (start of the INSERT to the reader's wake-up)."""
        assert self.pool is not None
        arrival: asyncio.Future[float] = asyncio.get_running_loop().create_future()
        self.arrived[n] = arrival
        t0 = time.perf_counter()
        try:
            row_id = await self.pool.fetchval(self.INSERT, f"/floor/e{n % 50}", f'{{"n": {n}}}')
            await self.writer.xadd(self.stream, {"n": n, "id": row_id})
            t1 = await asyncio.wait_for(arrival, 10)
        finally:
            del self.arrived[n]
        return (t1 - t0) * 1000

    async def window(self, in_flight: int, count: int, key: str) -> None:
        bench = self.bench
        base = 1_000_000 * in_flight
        # A backend keeps up to a second of counts until it closes: start with fresh ones
        # (opening one costs a transaction: at most POOL in the window).
        await self.close_pool()
        await self.open_pool()
        mark = await bench.meter.begin()
        latencies: list[float] = []
        sem = asyncio.Semaphore(in_flight)

        async def one(n: int) -> None:
            async with sem:
                latencies.append(await self.op(n))

        t0 = time.perf_counter()
        await asyncio.gather(*(one(base + n) for n in range(count)))
        elapsed = time.perf_counter() - t0
        cpu = await bench.meter.cpu(mark)
        await self.close_pool()  # its backends publish their counts as they exit
        usage = await bench.meter.end(mark, cpu)
        fields = usage_fields(usage, count, runner=False)
        # No server here: the bench process itself does what a server's send would.
        fields["server_cpu_us"] = fields["bench_cpu_us"]
        bench.record(
            Result(
                key=key,
                name=f"floor, {in_flight} in flight",
                title=f"floor: INSERT + XADD → XREADGROUP, {in_flight} in flight",
                unit="op",
                latency=dist(latencies),
                throughput=count / elapsed,
                **fields,
                notes=[
                    "server CPU = this Python process (asyncpg + redis-py + the reader)",
                    f"asyncpg pool of {POOL}, one redis-py client; reader XREADGROUP BLOCK",
                ],
            )
        )

    async def run(self) -> None:
        await self.open_pool()
        assert self.pool is not None
        await self.pool.execute(
            "CREATE TABLE bench_floor (id bigserial PRIMARY KEY, entity text NOT NULL, "
            "payload jsonb NOT NULL, created_at timestamptz NOT NULL DEFAULT now())"
        )
        await self.writer.xgroup_create(self.stream, "g", id="$", mkstream=True)
        reading = asyncio.create_task(self.read())
        try:
            if self.bench.profile.warmup:
                for n in range(100):
                    await self.op(-1 - n)
            self.bench.meter.dirty = True
            await self.window(1, self.bench.profile.floor_sequential, "floor")
            await self.window(IN_FLIGHT, self.bench.profile.floor_concurrent, "floor_32")
        finally:
            reading.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await reading
            await self.close_pool()
            await self.writer.delete(self.stream)
            await self.writer.aclose()
            await self.reader.aclose()


async def floor(bench: Bench) -> None:
    await Floor(bench).run()


# --- arq ----------------------------------------------------------------------------------------


def arq_redis_url() -> str:
    """Redis URL of arq's own database: the next index after the bench's."""
    parts = urlsplit(REDIS_URL)
    db = int(parts.path.strip("/") or 0)
    return urlunsplit(parts._replace(path=f"/{(db + 1) % 16}"))


class ArqMode:
    """A real arq worker process with one ``poll_delay``; jobs push their start time."""

    def __init__(self, bench: Bench, redis: Redis, delay: str) -> None:
        self.bench = bench
        self.redis = redis
        self.delay = delay
        self.queue = f"{bench.prefix}:arq:{delay}"
        self.started_key = f"{self.queue}:started"
        self.counter = 0
        self.worker: Proc | None = None
        self.pool: Any = None

    async def enqueue(self, n: int) -> None:
        await self.pool.enqueue_job("started", n, _job_id=f"{self.queue}:{n}")

    async def started(self) -> tuple[int, float]:
        """The next job's (number, start time)."""
        reply: Any = await cast(Awaitable[Any], self.redis.blpop([self.started_key], timeout=30))
        if reply is None:
            tail = self.worker.log_tail() if self.worker else ""
            raise RuntimeError(f"arq job did not start in 30 s:\n{tail}")
        n, at = reply[1].decode().split()
        return int(n), float(at)

    async def run(self, sequential: int, burst: int) -> None:
        from arq import create_pool
        from arq.connections import RedisSettings

        bench = self.bench
        url = arq_redis_url()
        env = {
            **bench.env(),
            "BENCH_ARQ_REDIS_URL": url,
            "BENCH_ARQ_QUEUE": self.queue,
            "BENCH_ARQ_POLL_DELAY": self.delay,
            "BENCH_ARQ_STARTED_KEY": self.started_key,
        }
        argv = [sys.executable, str(SCRIPTS / "bench_arq.py")]
        self.worker = worker = spawn(f"arq-{self.delay}", argv, env, bench.logs)
        bench.procs.append(worker)
        self.pool = await create_pool(RedisSettings.from_dsn(url), default_queue_name=self.queue)
        try:
            await self.measure(worker, sequential, burst)
        finally:
            await self.pool.aclose()
            await worker.stop(timeout=10)
            keys = [k async for k in self.redis.scan_iter(match=f"*{self.queue}*", count=1000)]
            if keys:
                await self.redis.delete(*keys)

    async def measure(self, worker: Proc, sequential: int, burst: int) -> None:
        bench = self.bench
        for _ in range(2 if bench.profile.warmup else 1):  # the worker is up once a job runs
            self.counter += 1
            await self.enqueue(self.counter)
            await self.started()
        idle_mark = await bench.meter.begin(server=[worker])
        await asyncio.sleep(1.0 if bench.profile.warmup else 0.5)
        idle = await bench.meter.cpu(idle_mark)
        idle_cpu = _delta(idle_mark.cpu.server, idle.server) or 0.0
        idle_share = idle_cpu / (idle.t - idle_mark.cpu.t)
        mark = await bench.meter.begin(server=[worker])
        latencies: list[float] = []
        for _ in range(sequential):
            self.counter += 1
            t0 = time.time()
            await self.enqueue(self.counter)
            _, at = await self.started()
            latencies.append((at - t0) * 1000)
        burst_start = await bench.meter.cpu(mark)
        first = self.counter + 1
        sent: dict[int, float] = {}
        sem = asyncio.Semaphore(IN_FLIGHT)

        async def one(n: int) -> None:
            async with sem:
                sent[n] = time.time()
                await self.enqueue(n)

        t0 = time.perf_counter()
        producing = asyncio.gather(*(one(first + i) for i in range(burst)))
        burst_latencies: list[float] = []
        for _ in range(burst):
            n, at = await self.started()
            burst_latencies.append((at - sent.get(n, at)) * 1000)
        await producing
        elapsed = time.perf_counter() - t0
        self.counter += burst
        end_cpu = await bench.meter.cpu(mark)
        usage = await bench.meter.end(mark, end_cpu)
        label = "0.5 s" if self.delay == "0.5" else "10 ms"
        fields = usage_fields(usage, sequential + burst, runner=False)
        burst_cpu = _delta(burst_start.server, end_cpu.server)
        fields["server_cpu_us"] = None if burst_cpu is None else burst_cpu / burst * 1e6
        sequential_cpu = _delta(mark.cpu.server, burst_start.server)
        bench.record(
            Result(
                key="arq_default" if self.delay == "0.5" else "arq_10ms",
                name=f"arq, poll_delay {label}",
                title=f"arq: enqueue → job start, poll_delay {label}",
                unit="job",
                latency=dist(latencies),
                throughput=burst / elapsed,
                **fields,
                extra={
                    "burst_latency_ms": dist(burst_latencies),
                    "burst_jobs": burst,
                    "idle_worker_cpu_percent": idle_share * 100,
                    "sequential_worker_cpu_us_per_job": (
                        None if sequential_cpu is None else sequential_cpu / sequential * 1e6
                    ),
                },
                notes=[
                    f"latency: {sequential} jobs one at a time; throughput and server CPU "
                    f"(the arq worker process): {burst} jobs enqueued {IN_FLIGHT} at a time",
                    f"idle worker: {idle_share * 100:.1f}% of a core spent polling",
                ],
            )
        )


async def arq_scenarios(bench: Bench) -> None:
    redis = Redis.from_url(arq_redis_url())
    try:
        for delay, (sequential, burst) in bench.profile.arq.items():
            await ArqMode(bench, redis, delay).run(sequential, burst)
    finally:
        await redis.aclose()


# --- pullwake: send → wake ----------------------------------------------------------------------


async def wake_rounds(bench: Bench) -> None:
    """Sequential rounds on one entity: send, wake on the bench's own SSE stream, claim, done."""
    assert bench.server is not None
    arrivals: asyncio.Queue[tuple[float, str, Any]] = asyncio.Queue()
    headers = {"Authorization": f"Bearer {bench.token}"}
    http = httpx.AsyncClient(base_url=bench.server.base, headers=headers, timeout=30)
    async with (
        http,
        http.stream("GET", "/v1/runners/bench/wakes", params={"session": "bench"}) as sse,
    ):

        async def read() -> None:
            entry = ""
            async for line in sse.aiter_lines():
                if line.startswith("id:"):
                    entry = line[3:].strip()
                elif line.startswith("data:"):
                    await arrivals.put((time.perf_counter(), entry, json.loads(line[5:])))

        reader = asyncio.create_task(read())
        bench.meter.dirty = True
        path = "/v1/entities/bench/wake/messages"

        async def round_trip(n: int) -> tuple[float, float, float, float, float]:
            t0 = time.perf_counter()
            await bench.client.json("POST", path, {"payload": {"n": n}})
            t1 = time.perf_counter()
            at, entry, wake = await asyncio.wait_for(arrivals.get(), 10)
            note = await bench.client.json(
                "POST",
                "/v1/runners/bench/claim",
                {"wake_id": wake["wake_id"], "entry_id": entry},
            )
            t3 = time.perf_counter()
            await bench.client.json(
                "POST",
                f"/v1/claims/{note['claim_id']}/done",
                {"epoch": note["epoch"], "acked_offset": note["tail_offset"]},
                token=note["claim_token"],
            )
            t4 = time.perf_counter()
            return t1 - t0, at - t0, t3 - at, t4 - t3, t4 - t0

        try:
            if bench.profile.warmup:
                for n in range(30):
                    await round_trip(n)
            bench.meter.dirty = True
            mark = await bench.meter.begin(server=[bench.server.proc])
            rows = [await round_trip(n) for n in range(bench.profile.wake_rounds)]
            usage = await bench.meter.end(mark)
        finally:
            reader.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await reader
    columns = list(zip(*rows, strict=True))
    send, wake, claim, done, total = ([v * 1000 for v in col] for col in columns)
    n = len(rows)
    bench.record(
        Result(
            key="wake",
            name="pullwake send → wake (SSE), 1 in flight",
            title="pullwake: send → wake on SSE (round: + claim + done), 1 in flight",
            unit="round",
            latency=dist(wake),
            throughput=n / usage.wall_s,
            **usage_fields(usage, n, runner=False),
            extra={
                "send_202_ms": dist(send),
                "claim_ms": dist(claim),
                "done_ms": dist(done),
                "round_ms": dist(total),
            },
            notes=[
                "latency: from the start of the POST to the wake on the runner's SSE stream",
                "costs per round: send, wake, claim (with its first messages) and done",
            ],
        )
    )


# --- pullwake: coalesced sends --------------------------------------------------------------------


async def coalesced(bench: Bench) -> None:
    """IN_FLIGHT sends at a time to one entity whose wake is outstanding: every one coalesces."""
    assert bench.server is not None
    path = "/v1/entities/bench/hot/messages"
    first = await bench.api("POST", path, {"payload": {"n": 0}})
    body = json.dumps({"payload": {"text": "coalesce me"}})
    if bench.profile.warmup:
        await asyncio.gather(*(bench.client.json("POST", path, {"payload": {}}) for _ in range(64)))
    entity0 = await bench.api("GET", "/v1/entities/bench/hot")
    use_wrk = bench.args.load in ("auto", "wrk") and shutil.which("wrk") is not None
    if bench.args.load == "wrk" and not use_wrk:
        raise RuntimeError("--load wrk: wrk is not installed")
    if not use_wrk and bench.args.load == "auto":
        bench.note(
            "wrk is not installed (Debian: apt-get install wrk): coalesced sends come from "
            f"{bench.args.client_processes} Python client processes instead"
        )
    mark = await bench.meter.begin(server=[bench.server.proc])
    if use_wrk:
        load = await run_wrk(bench, mark, path, body, bench.profile.coalesce_s)
        generator = load.pop("generator")
    else:
        load = await run_client_processes(bench, mark, path, body, bench.profile.coalesce_s)
        generator = load.pop("generator")
    cpu = load.pop("cpu")
    usage = await bench.meter.end(mark, cpu)
    entity1 = await bench.api("GET", "/v1/entities/bench/hot")
    accepted = entity1["dispatch"]["tail_offset"] - entity0["dispatch"]["tail_offset"]
    wake_id = first["wake"]["id"]
    same_wake = entity1["dispatch"]["outstanding_wake_id"] == wake_id
    requests = load["requests"]
    # wrk and the client processes stop counting at the deadline, with up to IN_FLIGHT sends
    # still being served: the server's costs are per message it stored.
    if load["non_2xx"] or not requests <= accepted <= requests + IN_FLIGHT or not same_wake:
        bench.note(
            f"coalesced sends: {load['non_2xx']} non-2xx answers, {accepted} messages stored "
            f"for {requests} requests, outstanding wake unchanged: {same_wake}"
        )
    bench.record(
        Result(
            key="coalesced",
            name=f"pullwake coalesced sends, {IN_FLIGHT} in flight",
            title=f"pullwake: coalesced sends, {IN_FLIGHT} in flight to one entity",
            unit="send",
            latency=load["latency"],
            throughput=requests / load["elapsed_s"],
            **usage_fields(usage, accepted, runner=False),
            extra={
                "generator": generator,
                "generator_cpu_us": load["generator_cpu_s"] / max(1, requests) * 1e6,
                "non_2xx": load["non_2xx"],
                "messages_stored": accepted,
                "outstanding_wake_unchanged": same_wake,
            },
            notes=[
                f"load: {generator}; the entity's one outstanding wake covers every send",
            ],
        )
    )


async def run_wrk(
    bench: Bench, mark: Mark, path: str, body: str, duration_s: int
) -> dict[str, Any]:
    assert bench.server is not None
    env = {**os.environ, "PULLWAKE_BENCH_TOKEN": bench.token, "PULLWAKE_BENCH_BODY": body}
    children0 = children_cpu_s()
    t0 = time.perf_counter()
    proc = await asyncio.create_subprocess_exec(
        "wrk",
        "-t1",
        f"-c{IN_FLIGHT}",
        f"-d{duration_s}s",
        "--timeout",
        "10s",
        "-s",
        str(SCRIPTS / "bench_post.lua"),
        bench.server.base + path,
        env=env,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await proc.communicate()
    elapsed = time.perf_counter() - t0
    cpu = await bench.meter.cpu(mark)
    if proc.returncode:
        raise RuntimeError(f"wrk failed ({proc.returncode}): {err.decode()}{out.decode()}")
    summary = json.loads(out.decode().strip().splitlines()[-1])
    errors = summary["errors"]
    return {
        "generator": f"wrk -t1 -c{IN_FLIGHT} -d{duration_s}s ({bench.wrk_version})",
        "cpu": cpu,
        "requests": summary["requests"],
        "elapsed_s": summary["duration_us"] / 1e6 or elapsed,
        "non_2xx": summary["non_2xx"] + errors,
        "generator_cpu_s": children_cpu_s() - children0,
        "latency": {
            "n": summary["requests"],
            "p50": summary["p50_us"] / 1000,
            "p95": summary["p95_us"] / 1000,
            "p99": summary["p99_us"] / 1000,
            "mean": summary["mean_us"] / 1000,
            "max": summary["max_us"] / 1000,
        },
    }


async def run_client_processes(
    bench: Bench, mark: Mark, path: str, body: str, duration_s: int
) -> dict[str, Any]:
    """The fallback load: ``--client-processes`` Python processes share IN_FLIGHT connections."""
    assert bench.server is not None
    processes = bench.args.client_processes
    start_at = time.time() + 2.0  # Python starts in well under that
    procs = []
    for i in range(processes):
        spec = {
            "host": "127.0.0.1",
            "port": bench.server.port,
            "token": bench.token,
            "path": path,
            "body": body,
            "connections": IN_FLIGHT // processes + (1 if i < IN_FLIGHT % processes else 0),
            "start_at": start_at,
            "duration_s": duration_s,
        }
        procs.append(
            await asyncio.create_subprocess_exec(
                sys.executable,
                str(SCRIPTS / "bench_load.py"),
                json.dumps(spec),
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.PIPE,
            )
        )
    await asyncio.sleep(max(0.0, start_at - time.time()))
    begin = await bench.meter.cpu(mark)
    mark.cpu = begin  # the window starts when the clients do
    await asyncio.sleep(duration_s)
    cpu = await bench.meter.cpu(mark)
    outputs = [await proc.communicate() for proc in procs]
    reports = []
    for proc, (out, err) in zip(procs, outputs, strict=True):
        if proc.returncode:
            raise RuntimeError(f"client process failed: {err.decode()}")
        reports.append(json.loads(out))
    latencies = [v / 1000 for report in reports for v in report["latencies_us"]]
    return {
        "generator": f"{processes} Python client processes (bench_load.py), "
        f"{IN_FLIGHT} keep-alive connections",
        "cpu": cpu,
        "requests": sum(r["requests"] for r in reports),
        "elapsed_s": max(r["elapsed_s"] for r in reports),
        "non_2xx": sum(r["non_2xx"] for r in reports),
        "generator_cpu_s": sum(r["cpu_s"] for r in reports),
        "latency": dist(latencies),
    }


# --- pullwake: batch sends ------------------------------------------------------------------------


async def batch_sends(bench: Bench) -> None:
    assert bench.server is not None
    size = bench.args.batch_size
    entities = bench.args.batch_entities
    total = bench.profile.batch_messages
    bodies = [
        json.dumps(
            {
                "messages": [
                    {"entity": f"/batch/e{n % entities}", "payload": {"n": n}}
                    for n in range(start, min(start + size, total))
                ]
            }
        ).encode()
        for start in range(0, total, size)
    ]
    if bench.profile.warmup:
        warm = json.dumps(
            {"messages": [{"entity": f"/batch/e{n % entities}", "payload": {}} for n in range(50)]}
        ).encode()
        for _ in range(5):
            status, data = await bench.client.call("POST", "/v1/messages", warm)
            if status != 200:
                raise HttpError(status, data)
        bench.meter.dirty = True
    in_flight = bench.args.batch_in_flight
    sem = asyncio.Semaphore(in_flight)
    latencies: list[float] = []
    problems = 0

    async def one(body: bytes) -> None:
        nonlocal problems
        async with sem:
            t0 = time.perf_counter()
            status, data = await bench.client.call("POST", "/v1/messages", body)
            latencies.append((time.perf_counter() - t0) * 1000)
            if status != 200:
                raise HttpError(status, data)
            problems += sum(1 for item in json.loads(data)["results"] if "problem" in item)

    mark = await bench.meter.begin(server=[bench.server.proc])
    t0 = time.perf_counter()
    await asyncio.gather(*(one(body) for body in bodies))
    elapsed = time.perf_counter() - t0
    usage = await bench.meter.end(mark)
    if problems:
        bench.note(f"batch sends: {problems} items answered a problem")
    fields = usage_fields(usage, total, runner=False)
    bench.record(
        Result(
            key="batch",
            name=f"pullwake batch sends, {size} per POST",
            title=f"pullwake: batch sends, {size} per POST /v1/messages, {in_flight} in flight",
            unit="message",
            latency=dist(latencies),
            throughput=total / elapsed,
            **fields,
            extra={
                "batches": len(bodies),
                "pg_xacts_per_batch": (
                    None if usage.xacts is None else usage.xacts / max(1, len(bodies))
                ),
                "item_problems": problems,
            },
            notes=[
                f"latency: one POST of {size} messages to {entities} entities; costs per message",
            ],
        )
    )


# --- pullwake: full cycles ------------------------------------------------------------------------


@dataclass
class Sent:
    t0: float
    t_ack: float
    wake_id: str | None
    status: str


class CycleLoop:
    """One closed loop per entity: send, wait until a runner's handler has the message, send
    the next one ``--requeue-delay-ms`` later (so that the done has committed)."""

    def __init__(self, bench: Bench, urls: list[str]) -> None:
        self.bench = bench
        self.urls = set(urls)
        self.sent: dict[tuple[str, int], Sent] = {}
        self.handled: dict[tuple[str, int], asyncio.Future[float]] = {}
        self.stop = 0.0

    def _handled(self, key: tuple[str, int]) -> asyncio.Future[float]:
        future = self.handled.get(key)
        if future is None:
            future = self.handled[key] = asyncio.get_running_loop().create_future()
        return future

    def on_note(self, note: tuple[str, int, float, int]) -> None:
        if note[0] in self.urls:
            future = self._handled((note[0], note[1]))
            if not future.done():
                future.set_result(note[2])

    async def entity_loop(self, url: str) -> None:
        delay = self.bench.args.requeue_delay_ms / 1000
        path = f"/v1/entities{url}/messages"
        while time.monotonic() < self.stop:
            t0 = time.time()
            answer = await self.bench.client.json("POST", path, {"payload": {"n": 1}})
            wake = answer["wake"]
            key = (url, answer["offset"])
            self.sent[key] = Sent(t0, time.time(), wake.get("id"), wake["status"])
            await asyncio.wait_for(self._handled(key), 30)
            await asyncio.sleep(delay)

    async def run(self, duration_s: float) -> None:
        """Loop for ``duration_s``; returns once the last messages reached a handler."""
        self.stop = time.monotonic() + duration_s
        self.bench.notes.listeners.append(self.on_note)
        try:
            await asyncio.gather(*(self.entity_loop(url) for url in sorted(self.urls)))
        finally:
            self.bench.notes.listeners.remove(self.on_note)

    def handler_times(self) -> dict[tuple[str, int], float]:
        return {k: f.result() for k, f in self.handled.items() if f.done()}


async def cycles(bench: Bench) -> None:
    """Full cycles through ``--runners`` runner processes, ``--cycle-entities`` closed loops."""
    assert bench.server is not None
    runners = await bench.start_runners("cycle", bench.args.runners)
    urls = [f"/cycle/e{i}" for i in range(bench.args.cycle_entities)]

    loop_ = CycleLoop(bench, urls)
    try:
        if bench.profile.warmup:
            await loop_.run(1.5)
        bench.meter.dirty = True
        loop_ = CycleLoop(bench, urls)
        mark = await bench.meter.begin(server=[bench.server.proc], runners=runners)
        since = datetime.fromtimestamp(time.time(), UTC)
        duration = bench.profile.cycle_s
        await asyncio.wait_for(loop_.run(duration), duration + 60)
        cpu_end = await bench.meter.cpu(mark)
        sent = loop_.sent
        conn = await asyncpg.connect(
            bench.db_url, server_settings={"application_name": "bench-cycles"}
        )
        own = 1  # a new session's start is a transaction
        try:
            # The window's wakes: one per send to an idle entity, plus the follow-up wakes of
            # dones that found a message coalesced into their claim. Every one ends with a done.
            deadline = time.monotonic() + 30
            while True:
                own += 1
                rows = await conn.fetch(
                    "SELECT id, resolved_at, claim_status FROM wakes "
                    "WHERE entity_url = ANY($1::text[]) AND created_at >= $2",
                    urls,
                    since,
                )
                if all(r["claim_status"] == "completed" for r in rows):
                    break
                if time.monotonic() > deadline:
                    raise RuntimeError("cycles: wakes not completed within 30 s")
                await asyncio.sleep(0.05)
        finally:
            await conn.close()
            await bench.backends_gone("bench-cycles")
        usage = await bench.meter.end(mark, cpu_end, own_xacts=own)
    finally:
        for proc in runners:
            await proc.stop(timeout=15)
    resolved = {r["id"]: r["resolved_at"].timestamp() for r in rows}
    handled_at = loop_.handler_times()
    queued = [(k, s) for k, s in sent.items() if s.status == "queued" and s.wake_id]
    coalesced_n = sum(1 for s in sent.values() if s.status != "queued")
    to_done = [(resolved[s.wake_id] - s.t0) * 1000 for _, s in queued if s.wake_id in resolved]
    to_handler = [(handled_at[k] - s.t0) * 1000 for k, s in queued if k in handled_at]
    send_202 = [(s.t_ack - s.t0) * 1000 for s in sent.values()]
    ops = len(rows)
    if coalesced_n:
        bench.note(
            f"cycles: {coalesced_n} of {len(sent)} sends found the entity's claim still live "
            f"and coalesced (the done then woke it again): {ops} cycles for {len(sent)} messages"
        )
    fields = usage_fields(usage, ops)
    bench.record(
        Result(
            key="cycle",
            name=f"pullwake full cycles, {bench.args.runners} runner processes",
            title=(
                f"pullwake: full cycles send → wake → claim → done, "
                f"{bench.args.runners} runner processes"
            ),
            unit="cycle",
            latency=dist(to_done),
            throughput=ops / usage.wall_s,
            **fields,
            extra={
                "send_202_ms": dist(send_202),
                "send_to_handler_ms": dist(to_handler),
                "messages": len(sent),
                "messages_per_s": len(sent) / usage.wall_s,
                "coalesced_sends": coalesced_n,
                "runner_concurrency": bench.args.runner_concurrency,
                "entities": len(urls),
            },
            notes=[
                "latency: start of the POST to the wake's resolved_at (Postgres clock, same "
                "machine), for sends that woke the entity; costs per wake completed",
                f"{len(urls)} entities, each in its own closed loop (the next send once a "
                f"handler has the last message); runner CPU: the sum of the "
                f"{bench.args.runners} runner processes (--concurrency "
                f"{bench.args.runner_concurrency} each)",
            ],
        )
    )


# --- pullwake: recovery ------------------------------------------------------------------------


async def recovery(bench: Bench) -> None:
    """kill -9 the runner process holding a claim; time until another process claims it."""
    assert bench.server is not None
    repeats = bench.profile.recoveries
    worker, runners = await asyncio.gather(
        bench.start_worker(), bench.start_runners("recover", repeats + 1, drain_ms=500)
    )
    bench.worker = worker
    by_pid = {proc.pid: proc for proc in runners}
    url = "/recover/r"
    times: list[float] = []
    try:
        mark = await bench.meter.begin(server=[bench.server.proc, worker], runners=runners)
        await bench.client.json("POST", f"/v1/entities{url}/messages", {"payload": {"hold": True}})
        holder = await bench.notes.wait(lambda n: n[0] == url, timeout=30)
        for _ in range(repeats):
            victim = by_pid[holder[3]]
            killed_at = time.time()
            os.kill(victim.pid, signal.SIGKILL)
            timeout = bench.profile.lease_ms / 1000 + 30

            def recovered(
                note: tuple[str, int, float, int], dead: int = victim.pid, since: float = killed_at
            ) -> bool:
                return note[0] == url and note[3] != dead and note[2] >= since

            holder = await bench.notes.wait(recovered, timeout=timeout)
            times.append((holder[2] - killed_at) * 1000)
        cpu = await bench.meter.cpu(mark)

        async def quiet() -> None:
            for proc in runners:
                await proc.stop(timeout=10)
            assert bench.worker is not None
            await bench.worker.stop(timeout=15)  # its backends publish their counts as they exit
            await bench.backends_gone("pullwake-worker")

        usage = await bench.meter.end(mark, cpu, before_settle=quiet)
    finally:
        for proc in runners:
            await proc.stop(timeout=10)
        if bench.worker is not None:
            await bench.worker.stop(timeout=15)
    lease = bench.profile.lease_ms
    bench.record(
        Result(
            key="recovery",
            name="pullwake recovery after kill -9",
            title=f"pullwake: recovery after kill -9 of the claim holder, lease {lease} ms",
            unit="recovery",
            latency=dist(times),
            throughput=None,
            **usage_fields(usage, repeats),
            extra={
                "lease_ms": lease,
                "recovery_interval_ms": 1000,
                "expected_ms": f"about {lease} + up to 1000 (the worker's expiry pass)",
            },
            notes=[
                "latency: SIGKILL → another runner process's handler starts on the same message",
                "server CPU includes the pullwake worker process; both run their loops meanwhile",
            ],
        )
    )


# --- main -----------------------------------------------------------------------------------------


SCENARIOS: dict[str, Callable[[Bench], Any]] = {
    "floor": floor,
    "arq": arq_scenarios,
    "wake": wake_rounds,
    "coalesced": coalesced,
    "batch": batch_sends,
    "cycle": cycles,
    "recovery": recovery,
}


def wrk_version() -> str | None:
    """``wrk``'s version word, or None when it is not installed."""
    if shutil.which("wrk") is None:
        return None
    out = subprocess.run(["wrk", "--version"], capture_output=True, text=True, check=False)
    words = (out.stdout or out.stderr).split()
    return words[1] if len(words) > 1 else "?"


def calibrate_cpu() -> float:
    """CPU milliseconds of a fixed pure-Python loop (5 million additions): how fast this
    machine's cores are right now (about 250 ms on an idle modern 2.8 GHz core)."""
    start = time.process_time()
    total = 0
    for i in range(5_000_000):
        total += i
    return (time.process_time() - start) * 1000


def machine_info() -> dict[str, Any]:
    model = ""
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    installed = [m for m in ("uvloop", "httptools") if importlib.util.find_spec(m)]
    return {
        "host": platform.node(),
        "cpu": model or platform.processor() or platform.machine(),
        "cores": os.cpu_count(),
        "kernel": f"{platform.system()} {platform.release()}",
        "python": platform.python_version(),
        "arq": importlib.metadata.version("arq"),
        "accelerators": installed,
        "wrk": wrk_version(),
        "load_average_before": os.getloadavg(),
        "cpu_calibration_ms_before": calibrate_cpu(),
    }


async def run(args: argparse.Namespace) -> dict[str, Any]:
    profile = SMOKE if args.smoke else FULL
    if args.cycle_seconds:
        profile = Profile(**{**asdict(profile), "cycle_s": args.cycle_seconds})
    info = machine_info()
    wanted = [name for name in SCENARIOS if not args.only or name in args.only]
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="pullwake-bench-") as tmp:
        logs = Path(args.logs) if args.logs else Path(tmp)
        logs.mkdir(parents=True, exist_ok=True)
        bench = Bench(args, profile, logs)
        async with bench.running():
            info["postgres"] = await bench.admin.fetchval("SHOW server_version")
            info["redis"] = (await bench.redis.info("server"))["redis_version"]
            print(
                f"pullwake bench ({profile.name}) on {info['host']}: {info['cpu']}, "
                f"{info['cores']} cores, {info['kernel']}, Python {info['python']}, "
                f"PostgreSQL {info['postgres']}, Redis {info['redis']}, arq {info['arq']}, "
                f"accelerators: {', '.join(info['accelerators']) or '-'}, "
                f"wrk: {info['wrk'] or 'not installed'}; load average "
                + " ".join(f"{v:.2f}" for v in info["load_average_before"])
                + f"; CPU calibration {info['cpu_calibration_ms_before']:.0f} ms"
            )
            await bench.prepare()
            for name in wanted:
                print(f"\n== {name}")
                began = time.monotonic()
                try:
                    await SCENARIOS[name](bench)
                    print(f"  ({name}: {time.monotonic() - began:.1f} s)")
                except Exception as exc:
                    if args.keep_going:
                        bench.note(f"{name} failed: {exc!r}")
                        continue
                    for proc in bench.procs:
                        if proc.log_tail():
                            print(f"--- {proc.name} log\n{proc.log_tail()}", file=sys.stderr)
                    raise
        info["load_average_after"] = os.getloadavg()
        info["cpu_calibration_ms_after"] = calibrate_cpu()
        info["duration_s"] = time.monotonic() - started
        return {
            "machine": info,
            "profile": asdict(profile),
            "settings": {
                "pg_pool_max": POOL,
                "in_flight": IN_FLIGHT,
                "runners": args.runners,
                "runner_concurrency": args.runner_concurrency,
                "claim_lease_ms": profile.lease_ms,
            },
            "results": {key: asdict(result) for key, result in bench.results.items()},
            "notes": bench.messages,
        }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--smoke", action="store_true", help="a few seconds of each scenario")
    parser.add_argument(
        "--only", nargs="+", choices=list(SCENARIOS), help="run only these scenarios"
    )
    parser.add_argument("--out", default="bench-results", help="results directory")
    parser.add_argument("--runners", type=int, default=3, help="runner processes for cycles")
    parser.add_argument("--runner-concurrency", type=int, default=4, help="per runner process")
    parser.add_argument(
        "--cycle-entities",
        type=int,
        default=None,
        help="entities in the full-cycle loop (default: 2 per runner slot)",
    )
    parser.add_argument("--cycle-seconds", type=float, default=None)
    parser.add_argument(
        "--requeue-delay-ms",
        type=float,
        default=10,
        help="full cycles: pause between a handler's start and the entity's next send",
    )
    parser.add_argument("--batch-size", type=int, default=500)
    parser.add_argument("--batch-in-flight", type=int, default=2)
    parser.add_argument("--batch-entities", type=int, default=50)
    parser.add_argument(
        "--load",
        choices=["auto", "wrk", "processes"],
        default="auto",
        help="coalesced-send load generator: wrk when installed (auto), or client processes",
    )
    parser.add_argument("--client-processes", type=int, default=2)
    parser.add_argument("--logs", default=None, help="keep the processes' logs in this directory")
    parser.add_argument("--keep-going", action="store_true", help="report a failed scenario")
    args = parser.parse_args()
    if args.cycle_entities is None:
        args.cycle_entities = 2 * args.runners * args.runner_concurrency
    report = asyncio.run(run(args))
    write_results(report, Path(args.out))


if __name__ == "__main__":
    main()
