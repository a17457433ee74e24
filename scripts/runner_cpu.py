"""Runner CPU per cycle: a real ``pullwake runner`` process against a real server stack.

Starts ``pullwake serve`` and ``pullwake worker`` on a fresh database and a unique Redis key
prefix, registers a runner, starts ``pullwake runner`` with a trivial handler and drives
send → wake → claim → done cycles through it, bounded by the arguments:

- ``spread``: ``--cycles`` sends over ``--entities`` entities, each sent only once its entity is
  idle again, so every send is one full cycle (wake over SSE, claim, done);
- ``hot``: ``--cycles`` sends to one entity with ``--hot-in-flight`` sends outstanding, so the
  runner chains claims (done with ``claim_next``) and claims carry several messages.

CPU is utime + stime from ``/proc/PID/stat`` (Linux only) of the runner process, and of the
server and worker processes, over each measured phase, divided by the claims the runner made
(counted in Postgres). Each phase runs ``--repeat`` times; the median is reported.

Run it with the repository's venv, against local services (``PULLWAKE_TEST_DATABASE_URL`` /
``PULLWAKE_TEST_REDIS_URL`` or the defaults below) or embedded ones::

    .venv/bin/python -m pullwake.dev.embedded run -- .venv/bin/python scripts/runner_cpu.py

``--profile out.svg`` records the runner with py-spy (``pip install py-spy``) during the
measured phases (the CPU numbers of such a run include the sampling's disturbance).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import secrets
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import httpx
from redis.asyncio import Redis

from pullwake.store.migrate import apply_migrations
from pullwake.testing import free_port

SERVER_DB = os.environ.get(
    "PULLWAKE_TEST_DATABASE_URL", "postgresql://postgres@127.0.0.1:5432/postgres"
)
REDIS_URL = os.environ.get("PULLWAKE_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")
PULLWAKE = (sys.executable, "-m", "pullwake")
RUNNER_ID = "cpu"

HANDLER = '''\
"""A handler that does nothing: the runner acks every delivered message."""


async def handle(wake):
    return None
'''


def process_tree(pid: int) -> list[int]:
    """``pid`` and its descendants."""
    tree, todo = [], [pid]
    while todo:
        current = todo.pop()
        tree.append(current)
        with contextlib.suppress(OSError):
            for task in os.listdir(f"/proc/{current}/task"):
                with open(f"/proc/{current}/task/{task}/children") as f:
                    todo.extend(int(child) for child in f.read().split())
    return tree


def cpu_split(pid: int) -> tuple[float, float]:
    """CPU seconds (user, system) of ``pid`` and its live descendants."""
    user = system = 0
    for member in process_tree(pid):
        try:
            with open(f"/proc/{member}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        user += int(fields[11])
        system += int(fields[12])
    tick = os.sysconf("SC_CLK_TCK")
    return user / tick, system / tick


def cpu_s(pid: int) -> float:
    """CPU seconds (user + system) of ``pid`` and its live descendants."""
    return sum(cpu_split(pid))


class Stack:
    """The server, the worker and the runner as child processes, logs in a temp dir."""

    def __init__(self, env: dict[str, str], workdir: Path) -> None:
        self.env = env
        self.workdir = workdir
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        self.procs: dict[str, subprocess.Popen[bytes]] = {}

    def spawn(self, name: str, *args: str, env: dict[str, str] | None = None) -> None:
        with (self.workdir / f"{name}.log").open("ab") as log:
            self.procs[name] = subprocess.Popen(
                [*PULLWAKE, *args],
                env=env or self.env,
                cwd=self.workdir,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
            )

    def log(self, name: str) -> str:
        return (self.workdir / f"{name}.log").read_text(errors="replace")

    def pid(self, name: str) -> int:
        return self.procs[name].pid

    async def wait_log(self, name: str, text: str, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while text not in self.log(name):
            if self.procs[name].poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"{name}: {text!r} not logged:\n{self.log(name)[-3000:]}")
            await asyncio.sleep(0.05)

    async def wait_ready(self) -> None:
        async with httpx.AsyncClient(base_url=self.base) as http:
            for _ in range(1200):  # a minute: the machine may be busy
                with contextlib.suppress(httpx.TransportError):
                    if (await http.get("/readyz")).status_code == 200:
                        return
                await asyncio.sleep(0.05)
        raise RuntimeError(f"server not ready:\n{self.log('serve')[-3000:]}")

    def stop(self) -> None:
        for proc in reversed(self.procs.values()):
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in reversed(self.procs.values()):
            try:
                proc.wait(20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5)


class Acks:
    """Polls Postgres for acked offsets and wakes whoever waits for one."""

    def __init__(self, db: asyncpg.Connection, interval_s: float) -> None:
        self.db = db
        self.interval_s = interval_s
        self.waiting: dict[str, list[tuple[int, asyncio.Future[None]]]] = {}

    async def reached(self, entity: str, offset: int) -> None:
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.waiting.setdefault(entity, []).append((offset, future))
        await future

    async def poll(self) -> None:
        while True:
            if self.waiting:
                rows = await self.db.fetch(
                    "SELECT entity_url, acked_offset FROM dispatch_state"
                    " WHERE entity_url = ANY($1::text[])",
                    list(self.waiting),
                )
                for row in rows:
                    left = []
                    for offset, future in self.waiting.get(row["entity_url"], []):
                        if row["acked_offset"] >= offset:
                            future.set_result(None)
                        else:
                            left.append((offset, future))
                    if left:
                        self.waiting[row["entity_url"]] = left
                    else:
                        self.waiting.pop(row["entity_url"], None)
            await asyncio.sleep(self.interval_s)


async def claims(db: asyncpg.Connection) -> int:
    count: int = await db.fetchval("SELECT count(*) FROM claims WHERE runner_id = $1", RUNNER_ID)
    return count


async def send(http: httpx.AsyncClient, entity: str, n: int) -> int:
    response = await http.post(f"/v1/entities{entity}/messages", json={"payload": {"n": n}})
    response.raise_for_status()
    offset: int = response.json()["offset"]
    return offset


async def spread(http: httpx.AsyncClient, acks: Acks, entities: list[str], cycles: int) -> None:
    """Every send waits for its entity to be idle: one wake, claim and done per send."""
    counter = iter(range(cycles))

    async def lane(entity: str) -> None:
        for n in counter:
            offset = await send(http, entity, n)
            await acks.reached(entity, offset)

    await asyncio.gather(*(lane(e) for e in entities))


async def hot(
    http: httpx.AsyncClient, acks: Acks, entity: str, cycles: int, in_flight: int
) -> None:
    """Sends to one entity with ``in_flight`` outstanding: claims chain and carry batches."""
    sem = asyncio.Semaphore(in_flight)
    last = 0

    async def one(n: int) -> None:
        nonlocal last
        async with sem:
            last = max(last, await send(http, entity, n))

    await asyncio.gather(*(one(n) for n in range(cycles)))
    await acks.reached(entity, last)


class Measure:
    def __init__(self, stack: Stack, db: asyncpg.Connection, timeout_s: float) -> None:
        self.stack = stack
        self.db = db
        self.timeout_s = timeout_s
        self.results: dict[str, list[dict[str, float]]] = {}

    async def phase(self, name: str, run: Any, messages: int) -> None:
        runner = self.stack.pid("runner")
        servers = [self.stack.pid("serve"), self.stack.pid("worker")]
        claims0 = await claims(self.db)
        (u0, k0), s0, t0 = cpu_split(runner), sum(map(cpu_s, servers)), time.perf_counter()
        try:
            await asyncio.wait_for(run(), self.timeout_s)
        except TimeoutError:
            log = self.stack.log("runner")[-3000:]
            late = f"{name}: not done in {self.timeout_s:g} s; runner log:\n{log}"
            raise RuntimeError(late) from None
        (u1, k1), s1, t1 = cpu_split(runner), sum(map(cpu_s, servers)), time.perf_counter()
        cycles = await claims(self.db) - claims0
        row = {
            "cycles": cycles,
            "messages": messages,
            "seconds": t1 - t0,
            "runner_us": (u1 + k1 - u0 - k0) / cycles * 1e6,
            "runner_sys_us": (k1 - k0) / cycles * 1e6,
            "server_us": (s1 - s0) / cycles * 1e6,
        }
        self.results.setdefault(name, []).append(row)
        print(
            f"  {name:<7} {cycles:5d} claims, {messages:5d} messages in {row['seconds']:5.1f} s:"
            f"  runner {row['runner_us']:7,.0f} µs/claim (sys {row['runner_sys_us']:5,.0f})"
            f"   server+worker"
            f" {row['server_us']:7,.0f} µs/claim",
            flush=True,
        )

    def summary(self) -> None:
        print("\nmedians:")
        for name, rows in self.results.items():
            runner = statistics.median(r["runner_us"] for r in rows)
            system = statistics.median(r["runner_sys_us"] for r in rows)
            server = statistics.median(r["server_us"] for r in rows)
            per_msg = statistics.median(r["runner_us"] * r["cycles"] / r["messages"] for r in rows)
            print(
                f"  {name:<7} runner {runner:7,.0f} µs/claim (sys {system:,.0f};"
                f" {per_msg:,.0f} µs/message)"
                f"   server+worker {server:7,.0f} µs/claim   (n={len(rows)})"
            )


async def main_async(args: argparse.Namespace) -> None:
    name = f"pullwake_cpu_{secrets.token_hex(4)}"
    admin = await asyncpg.connect(SERVER_DB)
    await admin.execute(f'CREATE DATABASE "{name}"')
    await admin.close()
    db_url = urlunsplit(urlsplit(SERVER_DB)._replace(path=f"/{name}"))
    prefix = f"pwcpu{secrets.token_hex(4)}"
    workdir = Path(tempfile.mkdtemp(prefix="pullwake-cpu-"))
    stack: Stack | None = None
    try:
        await apply_migrations(db_url)
        env = {k: v for k, v in os.environ.items() if not k.startswith("PULLWAKE_")}
        env.update(
            PULLWAKE_DATABASE_URL=db_url,
            PULLWAKE_REDIS_URL=REDIS_URL,
            PULLWAKE_REDIS_KEY_PREFIX=prefix,
            PYTHONUNBUFFERED="1",
        )
        token = subprocess.run(  # noqa: ASYNC221 (once, before anything runs)
            [*PULLWAKE, "tokens", "create", "--principal", "user:cpu@example.com"],
            env=env,
            capture_output=True,
            check=True,
            text=True,
        ).stdout.strip()
        stack = Stack(env, workdir)
        env["PULLWAKE_PUBLIC_URL"] = stack.base
        stack.spawn("serve", "serve", "--no-migrate", "--port", str(stack.port))
        stack.spawn("worker", "worker")
        await stack.wait_ready()
        await stack.wait_log("worker", "pullwake worker ready")
        await drive(stack, token, db_url, args)
    finally:
        if stack is not None:
            stack.stop()
        redis = Redis.from_url(REDIS_URL)
        keys = [k async for k in redis.scan_iter(match=f"{prefix}:*")]
        if keys:
            await redis.delete(*keys)
        await redis.aclose()
        admin = await asyncpg.connect(SERVER_DB)
        await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        await admin.close()
        if args.keep_logs:
            print(f"logs: {workdir}")


async def drive(stack: Stack, token: str, db_url: str, args: argparse.Namespace) -> None:
    headers = {"Authorization": f"Bearer {token}"}
    limits = httpx.Limits(max_connections=64, max_keepalive_connections=64)
    async with httpx.AsyncClient(
        base_url=stack.base, headers=headers, timeout=30, limits=limits
    ) as http:
        (await http.post("/v1/runners", json={"id": RUNNER_ID})).raise_for_status()
        policy = {"targets": [{"type": "runner", "runner_id": RUNNER_ID}]}
        entities = [f"/c/e{i}" for i in range(args.entities)]
        for entity in [*entities, "/c/hot"]:
            r = await http.put(f"/v1/entities{entity}", json={"dispatch_policy": policy})
            r.raise_for_status()
        (stack.workdir / "cpu_handler.py").write_text(HANDLER)
        runner_args = ["runner", "--id", RUNNER_ID, "--handler", "cpu_handler:handle"]
        runner_args += ["--server", stack.base, "--concurrency", str(args.concurrency)]
        stack.spawn(
            "runner", *args.runner_args, *runner_args, env={**stack.env, "PULLWAKE_TOKEN": token}
        )
        await stack.wait_log("runner", "connected: streaming wakes")
        db = await asyncpg.connect(db_url)
        acks = Acks(db, args.poll_ms / 1000)
        poller = asyncio.create_task(acks.poll())
        measure = Measure(stack, db, args.phase_timeout_s)
        try:
            await spread(http, acks, entities, args.warmup)  # connections, lazy imports
            if args.idle_s:
                pid = stack.pid("runner")
                before = cpu_s(pid)
                await asyncio.sleep(args.idle_s)
                idle = (cpu_s(pid) - before) / args.idle_s * 1e6
                print(f"  idle    runner {idle:7,.0f} µs per second with no wakes", flush=True)
            profiler = start_profiler(stack, args.profile) if args.profile else None
            for _ in range(args.repeat):
                if "spread" in args.phases:
                    await measure.phase(
                        "spread", lambda: spread(http, acks, entities, args.cycles), args.cycles
                    )
                if "hot" in args.phases:
                    await measure.phase(
                        "hot",
                        lambda: hot(http, acks, "/c/hot", args.cycles, args.hot_in_flight),
                        args.cycles,
                    )
            if profiler is not None:
                profiler.send_signal(signal.SIGINT)
                profiler.wait(60)
                print(f"profile: {args.profile}")
        finally:
            poller.cancel()
            await db.close()
        measure.summary()


def start_profiler(stack: Stack, out: str) -> subprocess.Popen[bytes]:
    py_spy = Path(sys.executable).with_name("py-spy")
    rate = os.environ.get("PY_SPY_RATE", "100")  # samples per second
    fmt = "raw" if out.endswith(".txt") else "speedscope" if out.endswith(".json") else "flamegraph"
    proc = subprocess.Popen(
        [
            str(py_spy),
            "record",
            "--rate",
            rate,
            "--pid",
            str(stack.pid("runner")),
            "-o",
            out,
            "-f",
            fmt,
        ],
        stdout=subprocess.DEVNULL,
        stderr=(stack.workdir / "py-spy.log").open("ab"),
    )
    time.sleep(1)
    return proc


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cycles", type=int, default=2000, help="sends per phase run")
    parser.add_argument("--entities", type=int, default=8, help="entities of the spread phase")
    parser.add_argument("--repeat", type=int, default=3, help="runs of each phase")
    parser.add_argument("--warmup", type=int, default=100, help="unmeasured cycles first")
    parser.add_argument("--concurrency", type=int, default=4, help="runner --concurrency")
    parser.add_argument("--hot-in-flight", type=int, default=4, help="hot phase: sends in flight")
    parser.add_argument("--phases", default="spread,hot", help="comma-separated: spread,hot")
    parser.add_argument(
        "--phase-timeout-s", type=float, default=600, help="a phase run taking longer fails"
    )
    parser.add_argument("--idle-s", type=float, default=10, help="idle CPU measured first")
    parser.add_argument("--poll-ms", type=float, default=3, help="ack polling interval")
    parser.add_argument("--profile", default=None, help="py-spy output (.svg, .json, .txt)")
    parser.add_argument("--keep-logs", action="store_true", help="print the log directory")
    parser.add_argument(
        "--runner-args", nargs=argparse.REMAINDER, default=[], help="before `runner` (e.g. -v)"
    )
    args = parser.parse_args()
    args.phases = set(args.phases.split(","))
    print(
        f"runner CPU: {args.cycles} sends per phase, {args.entities} entities (spread), "
        f"runner concurrency {args.concurrency}, {os.cpu_count()} cores, "
        f"Python {sys.version.split()[0]}",
        flush=True,
    )
    asyncio.run(main_async(args))


if __name__ == "__main__":
    main()
