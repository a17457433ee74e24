"""The benchmark's scenarios: the floor, arq, and pullwake's send → wake, coalesced sends,
batch sends, full cycles through runner processes, recovery after ``kill -9``, a worker's
recovery passes next to an offline fleet, and an idle fleet of wake streams.

Each takes the :class:`~bench_core.Bench` of the run and records one or more results.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import random
import shutil
import signal
import sys
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, cast
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import httpx
from bench_core import IN_FLIGHT, POOL, PRINCIPAL, REDIS_URL, SCRIPTS, Bench, usage_fields
from bench_load import Client, HttpError
from bench_measure import Mark, Proc, children_cpu_s, delta, dist, spawn, tree_cpu_s
from bench_report import Result
from redis.asyncio import Redis

from pullwake.testing import free_port

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
        idle_cpu = delta(idle_mark.cpu.server, idle.server) or 0.0
        idle_share = idle_cpu / (idle.t - idle_mark.cpu.t)
        mark = await bench.meter.begin(server=[worker])
        latencies: list[float] = []
        for _ in range(sequential):
            self.counter += 1
            # At a random moment of the worker's polling cycle, as a producer would: right after
            # the last job started, every enqueue would wait the whole poll_delay.
            await asyncio.sleep(random.uniform(0, float(self.delay)))
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
        burst_cpu = delta(burst_start.server, end_cpu.server)
        fields["server_cpu_us"] = None if burst_cpu is None else burst_cpu / burst * 1e6
        sequential_cpu = delta(mark.cpu.server, burst_start.server)
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
                    f"latency: {sequential} jobs one at a time, each enqueued at a random moment "
                    f"of the polling cycle; throughput and server CPU "
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
                f"load: {generator}, {load['generator_cpu_s'] / max(1, requests) * 1e6:,.0f} µs "
                "of its own CPU per send; the entity's one outstanding wake covers every send",
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
            f"cycles: {coalesced_n} of {len(sent)} sends came before the previous done and "
            f"coalesced into the live claim; that done woke the entity again ({ops} wakes for "
            f"{len(sent)} messages)"
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


# --- pullwake: an offline fleet -------------------------------------------------------------------

OFFLINE_TYPE = "offline"
LAST_PASS = "pullwake_worker_last_pass_timestamp_seconds"


async def _offline_fleet(bench: Bench, count: int) -> list[str]:
    """``count`` registered runners, none connected, each with one entity and one waiting wake.

    Runners and entities go in with a few SQL statements (the bench owns its database; the
    entities copy the dispatch policy of one created through the API), the wakes through batch
    sends, so each is published to its runner's stream as in real life: a stream nobody reads.
    """
    runner_ids = [f"offline-{n:06d}" for n in range(count)]
    await bench.api("POST", "/v1/runners", {"id": "offline-template"})
    await bench.entity(OFFLINE_TYPE, "template", "offline-template")
    conn = await asyncpg.connect(bench.db_url, server_settings={"application_name": "bench-fleet"})
    try:
        async with conn.transaction():
            await conn.execute(
                "INSERT INTO runner_id_owners (id, owner_principal) "
                "SELECT unnest($1::text[]), $2 ON CONFLICT DO NOTHING",
                runner_ids,
                PRINCIPAL,
            )
            await conn.execute(
                "INSERT INTO runners (id, owner_principal, label) "
                "SELECT unnest($1::text[]), $2, 'offline' ON CONFLICT DO NOTHING",
                runner_ids,
                PRINCIPAL,
            )
            await conn.execute(
                "INSERT INTO entities (url, type, id, dispatch_policy, target_runner_id, "
                "created_by, members) "
                "SELECT '/' || t.type || '/e' || r.n, t.type, 'e' || r.n, "
                "jsonb_set(t.dispatch_policy, '{targets,0,runner_id}', to_jsonb(r.id)), r.id, "
                "t.created_by, t.members "
                "FROM entities t, unnest($1::text[]) WITH ORDINALITY AS r(id, n) "
                "WHERE t.url = $2",
                runner_ids,
                f"/{OFFLINE_TYPE}/template",
            )
            await conn.execute(
                "INSERT INTO dispatch_state (entity_url) "
                "SELECT url FROM entities WHERE type = $1 AND url <> $2",
                OFFLINE_TYPE,
                f"/{OFFLINE_TYPE}/template",
            )
    finally:
        await conn.close()
        await bench.backends_gone("bench-fleet")
    urls = [f"/{OFFLINE_TYPE}/e{n}" for n in range(1, count + 1)]
    for start in range(0, len(urls), 500):
        body = {"messages": [{"entity": url, "payload": {}} for url in urls[start : start + 500]]}
        answer = await bench.api("POST", "/v1/messages", body)
        problems = [item for item in answer["results"] if "problem" in item]
        if problems:
            raise RuntimeError(f"offline fleet: batch send answered {problems[:3]}")
    return runner_ids


async def _last_passes(http: httpx.AsyncClient) -> dict[str, float]:
    """The worker's last-pass timestamp of each periodic job (its Prometheus metrics)."""
    try:
        text = (await http.get("/")).text
    except httpx.TransportError:
        return {}
    found = {}
    for line in text.splitlines():
        if line.startswith(LAST_PASS + "{"):
            labels, _, value = line.partition("} ")
            found[labels.split('job="', 1)[1].rstrip('"')] = float(value)
    return found


async def _lease_expiry_delay(bench: Bench, conn: asyncpg.Connection, runner_id: str) -> float:
    """Claim the lease entity's outstanding wake and let the lease run out: milliseconds from
    the lease's end to the worker's expiry of it (both by the Postgres clock)."""
    url = f"/{OFFLINE_TYPE}/lease"
    deadline = time.monotonic() + 30
    while (
        wake_id := await conn.fetchval(
            "SELECT outstanding_wake_id FROM dispatch_state WHERE entity_url = $1", url
        )
    ) is None:
        if time.monotonic() > deadline:
            raise RuntimeError("offline fleet: the lease entity has no outstanding wake")
        await asyncio.sleep(0.05)
    note = await bench.api("POST", f"/v1/runners/{runner_id}/claim", {"wake_id": wake_id})
    timeout = bench.profile.lease_ms / 1000 + 30
    deadline = time.monotonic() + timeout
    while True:
        row = await conn.fetchrow(
            "SELECT status, lease_expires_at, released_at FROM claims WHERE id = $1",
            note["claim_id"],
        )
        if row is not None and row["status"] == "expired":
            return float((row["released_at"] - row["lease_expires_at"]).total_seconds() * 1000)
        if time.monotonic() > deadline:
            raise RuntimeError(f"offline fleet: a lease was not expired within {timeout:.0f} s")
        await asyncio.sleep(0.02)


async def _settled(worker: Proc, least_s: float, most_s: float) -> float:
    """Wait at least ``least_s`` and until the worker's start-up work is over: no recovery
    pass has logged what it did for a few seconds (at most ``most_s``); how long that took."""
    quiet_s = min(3.0, most_s / 3)
    started = time.monotonic()
    await asyncio.sleep(least_s)
    while time.monotonic() - started < most_s:
        if time.time() - worker.log_path.stat().st_mtime >= quiet_s:
            break
        await asyncio.sleep(0.2)
    return time.monotonic() - started


async def offline_fleet(bench: Bench) -> None:
    """A ``pullwake worker`` next to registered runners that never connected, each with a
    waiting wake: its CPU per recovery pass once its start-up work is done, and how late it
    expires a lease meanwhile."""
    assert bench.server is not None
    count = bench.profile.offline_runners
    t0 = time.monotonic()
    await _offline_fleet(bench, count)
    lease_runner = "offline-template"  # its entities: the template (no wake) and the lease one
    await bench.entity(OFFLINE_TYPE, "lease", lease_runner)
    await bench.api("POST", f"/v1/entities/{OFFLINE_TYPE}/lease/messages", {"payload": {}})
    print(f"  {count} offline runners with a waiting wake each: {time.monotonic() - t0:.1f} s")
    port = free_port()
    worker = await bench.start_worker("--metrics-port", str(port), name="worker-offline")
    bench.worker = worker
    metrics = httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=5)
    conn = await asyncpg.connect(
        bench.db_url, server_settings={"application_name": "bench-offline"}
    )
    try:
        warmup = await _settled(
            worker, bench.profile.offline_warmup_s, bench.profile.offline_settle_s
        )
        # Before the measured window: the bench polls Postgres meanwhile.
        delays = [
            await _lease_expiry_delay(bench, conn, lease_runner)
            for _ in range(bench.profile.offline_expiries)
        ]
        seen: dict[str, set[float]] = {}

        async def count_passes(stop: asyncio.Event) -> None:
            while not stop.is_set():
                for job, at in (await _last_passes(metrics)).items():
                    seen.setdefault(job, set()).add(at)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), 0.5)

        mark = await bench.meter.begin(server=[worker])
        before = await _last_passes(metrics)
        stop = asyncio.Event()
        counting = asyncio.create_task(count_passes(stop))
        await asyncio.sleep(bench.profile.offline_window_s)
        cpu = await bench.meter.cpu(mark)
        stop.set()
        await counting
        passes = {
            job: len({at for at in times if at > before.get(job, 0.0)})
            for job, times in seen.items()
        }

        async def quiet() -> None:
            assert bench.worker is not None
            await bench.worker.stop(timeout=15)  # its backends publish their counts as they exit
            await bench.backends_gone("pullwake-worker")

        usage = await bench.meter.end(mark, cpu, before_settle=quiet)
    finally:
        await conn.close()
        await bench.backends_gone("bench-offline")
        await metrics.aclose()
        await worker.stop(timeout=15)
    repairs = max(1, passes.get("repair_streams", 0))
    window = usage.wall_s
    worker_cpu = usage.server_cpu_s or 0.0
    bench.record(
        Result(
            key="offline",
            name=f"pullwake worker, {count:,} offline runners",
            title=(
                f"pullwake: a worker's recovery passes next to {count:,} registered runners "
                f"that never connected, a waiting wake each; lease expiry meanwhile"
            ),
            unit="pass",
            latency=dist(delays),
            throughput=None,
            **usage_fields(usage, repairs, runner=False),
            extra={
                "runners": count,
                "passes": passes,
                "worker_cpu_ms_per_s": worker_cpu / window * 1000 if window else None,
                "worker_cpu_ms_per_pass": worker_cpu / repairs * 1000,
                "warmup_s": warmup,
                "lease_ms": bench.profile.lease_ms,
            },
            notes=[
                "latency: from a claim's lease end to its expiry by the worker (Postgres clock), "
                f"measured before the window, lease {bench.profile.lease_ms} ms; "
                "every 1000 ms a pass (PULLWAKE_RECOVERY_INTERVAL_MS)",
                f"costs per repair_streams pass ({passes.get('repair_streams', 0)} in "
                f"{window:.1f} s, counted on the worker's metrics) after {warmup:.0f} s of "
                "start-up work (until its passes stopped logging changes, at most "
                f"{bench.profile.offline_settle_s:.0f} s); server CPU: the worker process only "
                "(the API is idle)",
            ],
        )
    )


# --- pullwake: an idle fleet ----------------------------------------------------------------------

FLEET_SMOKE = 50


def rss_bytes(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


async def redis_clients_named(redis: Redis, name: str) -> int:
    return sum(1 for c in await redis.client_list() if c.get("name") in (name, name.encode()))


async def idle_fleet(bench: Bench) -> None:
    """``--fleet`` wake streams (one runner each) on a ``pullwake serve`` of their own, from one
    raw-socket client process: Redis connections, memory per session, idle CPU, connect time,
    and send → wake for runners among them."""
    count = bench.args.fleet or (FLEET_SMOKE if bench.profile.name == "smoke" else 10_000)
    # Idle is the steady state: the connect burst's last full garbage collection (about 0.6 s
    # of CPU at 10,000 streams) may still come a few seconds after it, so settle, then average
    # over long enough a window that one such collection would not decide the figure alone.
    settle_s = 1.0 if bench.profile.name == "smoke" else 5.0
    idle_s = 2.0 if bench.profile.name == "smoke" else 30.0
    rounds = 10 if bench.profile.name == "smoke" else 200
    name = f"pwbench-fleet-{os.getpid()}"
    max_connections = 16
    server = await bench.start_server(
        "serve-fleet",
        PULLWAKE_REDIS_URL=f"{REDIS_URL}?client_name={name}",
        PULLWAKE_REDIS_MAX_CONNECTIONS=str(max_connections),
        PULLWAKE_MAX_SSE_PER_PRINCIPAL=str(count + 100),
        # the bench's principal may already own the offline fleet's runners (same database)
        PULLWAKE_MAX_RUNNERS_PER_PRINCIPAL=str(count + bench.profile.offline_runners + 100),
        PULLWAKE_AUTH_CACHE_MAX_ENTRIES=str(2 * count + 100),
    )
    client = Client("127.0.0.1", server.port, bench.token, size=32)
    fleet: asyncio.subprocess.Process | None = None
    try:
        await asyncio.gather(
            *(client.json("POST", "/v1/runners", {"id": f"fleet-{n}"}) for n in range(count))
        )
        targets = [random.randrange(count) for _ in range(rounds)]
        for r, n in enumerate(targets):
            await bench.entity("fleet", f"w{r}", f"fleet-{n}")
        await asyncio.sleep(1)
        rss_before = rss_bytes(server.proc.pid)
        redis_before = await redis_clients_named(bench.redis, name)
        fleet = await asyncio.create_subprocess_exec(
            sys.executable,
            str(SCRIPTS / "bench_fleet.py"),
            "--port",
            str(server.port),
            "--token",
            bench.token,
            "--count",
            str(count),
            stdout=asyncio.subprocess.PIPE,
            limit=1 << 20,
        )
        assert fleet.stdout is not None
        stdout = fleet.stdout
        most_redis = redis_before

        async def sample_redis() -> None:
            nonlocal most_redis
            while True:
                most_redis = max(most_redis, await redis_clients_named(bench.redis, name))
                await asyncio.sleep(0.25)

        sampler = asyncio.create_task(sample_redis())
        try:
            line = await asyncio.wait_for(stdout.readline(), 600)
            report = json.loads(line or b"{}")
            if "connected" not in report:
                raise RuntimeError(f"the fleet did not connect: {line!r}")
            connect_s, refused = float(report["seconds"]), int(report["refused"])
            print(f"  {count} wake streams connected in {connect_s:.1f} s ({refused} refusals)")
            await asyncio.sleep(settle_s)  # let the connect burst settle
            rss_after = rss_bytes(server.proc.pid)
            cpu0, wall0 = server.proc.cpu_s(), time.monotonic()
            fleet_cpu0 = tree_cpu_s(fleet.pid)
            await asyncio.sleep(idle_s)
            idle_cpu = (server.proc.cpu_s() - cpu0) / (time.monotonic() - wall0)
            fleet_idle_cpu = (tree_cpu_s(fleet.pid) - fleet_cpu0) / (time.monotonic() - wall0)
            redis_idle = await redis_clients_named(bench.redis, name)

            arrivals: asyncio.Queue[dict[str, Any]] = asyncio.Queue()

            async def read_fleet() -> None:
                while line := await stdout.readline():
                    await arrivals.put(json.loads(line))

            async def arrival(wake_id: str | None, runner: int) -> float:
                while True:
                    got = await asyncio.wait_for(arrivals.get(), 10)
                    if got.get("wake") == runner and (wake_id is None or got["wake_id"] == wake_id):
                        return float(got["t"])

            reading = asyncio.create_task(read_fleet())
            try:
                mark = await bench.meter.begin(server=[server.proc])
                sends = []
                for r, n in enumerate(targets):
                    t0 = time.monotonic()
                    sent = await client.json(
                        "POST", f"/v1/entities/fleet/w{r}/messages", {"payload": {"r": r}}
                    )
                    sends.append((await arrival(sent["wake"]["id"], n) - t0) * 1000)
                usage = await bench.meter.end(mark)
                xadds = []
                fields: dict[Any, Any] = {
                    "v": "1",
                    "wake_id": "wk_" + "f" * 28,
                    "entity": "/fleet/x",
                    "epoch": "1",
                }
                for n in targets:
                    async with bench.redis.pipeline(transaction=False) as pipe:
                        pipe.xadd(bench.keys.runner_wakes(f"fleet-{n}"), fields)
                        pipe.publish(bench.keys.wake_notify(), f"fleet-{n}")
                        t0 = time.monotonic()
                        await pipe.execute()
                    xadds.append((await arrival(None, n) - t0) * 1000)
            finally:
                reading.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await reading
        finally:
            sampler.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await sampler
    finally:
        if fleet is not None and fleet.returncode is None:
            fleet.terminate()
            await fleet.wait()
        client.close()
        await server.proc.stop(timeout=20)
    per_session_kb = (rss_after - rss_before) / count / 1024
    bench.record(
        Result(
            key="fleet",
            name=f"idle fleet: send → wake, 1 of {count} streams",
            title=f"pullwake: {count} idle wake streams on one API process; send → wake",
            unit="wake",
            latency=dist(sends),
            throughput=count / connect_s,
            **usage_fields(usage, len(sends), runner=False),
            extra={
                "sessions": count,
                "connect_s": connect_s,
                "connect_refusals_retried": refused,
                "redis_connections": redis_idle,
                "redis_connections_max": most_redis,
                "redis_max_connections_setting": max_connections,
                "rss_before_mb": rss_before / 2**20,
                "rss_after_mb": rss_after / 2**20,
                "rss_per_session_kb": per_session_kb,
                "idle_cpu_pct": idle_cpu * 100,
                "idle_window_s": idle_s,
                "client_idle_cpu_pct": fleet_idle_cpu * 100,
                "xadd_wake_ms": dist(xadds),
            },
            notes=[
                "throughput: wake streams connected per second",
                "latency: from the start of the POST to the wake on its stream, one at a time",
                f"idle: {count} streams, keep-alives only, over {idle_s:.0f} s after "
                f"{settle_s:.0f} s of settling",
            ],
        )
    )
    print(
        f"  redis connections {redis_idle} (max {most_redis}, setting {max_connections}); "
        f"{per_session_kb:.1f} KB/session; idle CPU {idle_cpu * 100:.1f} % of a core; "
        f"XADD → wake p50 {dist(xadds)['p50']:.2f} ms p99 {dist(xadds)['p99']:.2f} ms"
    )


SCENARIOS: dict[str, Callable[[Bench], Awaitable[None]]] = {
    "floor": floor,
    "arq": arq_scenarios,
    "wake": wake_rounds,
    "coalesced": coalesced,
    "batch": batch_sends,
    "cycle": cycles,
    "recovery": recovery,
    "offline": offline_fleet,
    "fleet": idle_fleet,
}
