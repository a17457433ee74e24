"""pullwake benchmark: send → SSE wake latency, claim+done round trips, send throughput.

Everything runs on this machine against a fresh database and a unique Redis key prefix; the
number of requests is bounded by the arguments.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import json
import os
import platform
import secrets
import statistics
import sys
import time
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


def process_tree(pid: int) -> list[int]:
    """``pid`` and its descendants (Linux ``/proc``; empty elsewhere)."""
    tree, todo = [], [pid]
    while todo:
        current = todo.pop()
        tree.append(current)
        try:
            with open(f"/proc/{current}/task/{current}/children") as f:
                todo.extend(int(child) for child in f.read().split())
        except OSError:
            pass
    return tree


def cpu_s(pid: int) -> float | None:
    """CPU seconds (user + system) of ``pid`` and its descendants so far; None without /proc."""
    total = 0
    for member in process_tree(pid):
        try:
            with open(f"/proc/{member}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += int(fields[11]) + int(fields[12])  # utime, stime (in clock ticks)
    return total / os.sysconf("SC_CLK_TCK") if os.path.exists(f"/proc/{pid}") else None


def report_cpu(pid: int, before: float | None, operations: int, what: str) -> None:
    after = cpu_s(pid)
    if before is not None and after is not None and operations:
        print(f"  server CPU: {(after - before) / operations * 1e6:,.0f} µs per {what}")


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def report(name: str, values_ms: list[float]) -> None:
    print(
        f"  {name:<34} n={len(values_ms):<5} p50={pct(values_ms, 0.5):7.2f} ms  "
        f"p95={pct(values_ms, 0.95):7.2f} ms  p99={pct(values_ms, 0.99):7.2f} ms  "
        f"mean={statistics.fmean(values_ms):7.2f} ms"
    )


async def read_wakes(response: httpx.Response, queue: asyncio.Queue[tuple[str, Any]]) -> None:
    entry = ""
    async for line in response.aiter_lines():
        if line.startswith("id:"):
            entry = line[3:].strip()
        elif line.startswith("data:"):
            await queue.put((entry, json.loads(line[5:])))


async def create_token(env: dict[str, str]) -> str:
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "pullwake",
        "tokens",
        "create",
        "--principal",
        "user:bench@example.com",
        "--label",
        "bench",
        env=env,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.DEVNULL,
    )
    out, _ = await proc.communicate()
    return out.decode().strip()


async def wait_ready(base: str) -> None:
    async with httpx.AsyncClient(base_url=base) as http:
        for _ in range(200):
            try:
                if (await http.get("/readyz")).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            await asyncio.sleep(0.05)
    raise RuntimeError("server did not become ready")


async def bench(args: argparse.Namespace) -> None:
    name = f"pullwake_bench_{secrets.token_hex(4)}"
    admin = await asyncpg.connect(SERVER_DB)
    await admin.execute(f'CREATE DATABASE "{name}"')
    await admin.close()
    db_url = urlunsplit(urlsplit(SERVER_DB)._replace(path=f"/{name}"))
    prefix = f"pwbench{secrets.token_hex(4)}"
    try:
        await apply_migrations(db_url)
        # The send-rate limit (opt-in) protects a shared server; here it would measure the
        # limiter, so an inherited one is unset (empty means unset).
        env = {
            **os.environ,
            "PULLWAKE_DATABASE_URL": db_url,
            "PULLWAKE_REDIS_URL": REDIS_URL,
            "PULLWAKE_REDIS_KEY_PREFIX": prefix,
            "PULLWAKE_SEND_RATE_PER_S": "",
            "PULLWAKE_SEND_BURST": "",
        }
        token = await create_token(env)
        port = free_port()
        # The server is its own process (as in production), so the client does not share its
        # event loop; on a 2-core machine they still share the CPUs.
        server = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "pullwake",
            "serve",
            "--no-migrate",
            "--port",
            str(port),
            *(["--workers", str(args.server_workers)] if args.server_workers > 1 else []),
            env=env,
            stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.DEVNULL,
        )
        try:
            base = f"http://127.0.0.1:{port}"
            await wait_ready(base)
            await run(base, token, args, server.pid)
        finally:
            server.terminate()
            await server.wait()
    finally:
        redis = Redis.from_url(REDIS_URL)
        keys = [k async for k in redis.scan_iter(match=f"{prefix}:*")]
        if keys:
            await redis.delete(*keys)
        await redis.aclose()
        admin = await asyncpg.connect(SERVER_DB)
        await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        await admin.close()


async def run(base: str, token: str, args: argparse.Namespace, server_pid: int) -> None:
    headers = {"Authorization": f"Bearer {token}"}
    limits = httpx.Limits(max_connections=64, max_keepalive_connections=64)
    async with httpx.AsyncClient(base_url=base, headers=headers, timeout=30, limits=limits) as http:
        (await http.post("/v1/runners", json={"id": "bench"})).raise_for_status()
        policy = {"targets": [{"type": "runner", "runner_id": "bench"}]}
        for i in range(args.entities):
            (
                await http.put(f"/v1/entities/b/e{i}", json={"dispatch_policy": policy})
            ).raise_for_status()
        queue: asyncio.Queue[tuple[str, Any]] = asyncio.Queue()
        async with http.stream(
            "GET", "/v1/runners/bench/wakes", params={"session": "bench"}
        ) as sse:
            reader = asyncio.create_task(read_wakes(sse, queue))
            before = cpu_s(server_pid)
            await latency_rounds(http, queue, args.rounds)
            report_cpu(server_pid, before, args.rounds, "round (send, wake, claim, done)")
            before = cpu_s(server_pid)
            await throughput(http, queue, args)
            report_cpu(server_pid, before, args.sends, "send")
            before = cpu_s(server_pid)
            await batch_throughput(http, args)
            report_cpu(server_pid, before, args.batch_messages, "batched message")
            reader.cancel()


async def latency_rounds(
    http: httpx.AsyncClient, queue: asyncio.Queue[tuple[str, Any]], rounds: int
) -> None:
    send_ms, wake_ms, claim_ms, done_ms, total_ms = [], [], [], [], []
    for n in range(rounds):
        t0 = time.perf_counter()
        r = await http.post("/v1/entities/b/e0/messages", json={"payload": {"n": n}})
        r.raise_for_status()
        t1 = time.perf_counter()
        entry, wake = await asyncio.wait_for(queue.get(), timeout=10)
        t2 = time.perf_counter()
        r = await http.post(
            "/v1/runners/bench/claim", json={"wake_id": wake["wake_id"], "entry_id": entry}
        )
        r.raise_for_status()
        note = r.json()
        t3 = time.perf_counter()
        r = await http.post(
            f"/v1/claims/{note['claim_id']}/done",
            json={"epoch": note["epoch"], "acked_offset": note["tail_offset"]},
            headers={"Authorization": f"Bearer {note['claim_token']}"},
        )
        r.raise_for_status()
        t4 = time.perf_counter()
        send_ms.append((t1 - t0) * 1000)
        wake_ms.append((t2 - t0) * 1000)
        claim_ms.append((t3 - t2) * 1000)
        done_ms.append((t4 - t3) * 1000)
        total_ms.append((t4 - t0) * 1000)
    print(f"\nsequential lifecycle, {rounds} rounds on one entity:")
    report("POST messages (202)", send_ms)
    report("send → wake on SSE", wake_ms)
    report("claim (200 + first messages)", claim_ms)
    report("done", done_ms)
    report("send → wake → claim → done", total_ms)


async def throughput(
    http: httpx.AsyncClient, queue: asyncio.Queue[tuple[str, Any]], args: argparse.Namespace
) -> None:
    sem = asyncio.Semaphore(args.concurrency)

    async def one(n: int) -> None:
        async with sem:
            r = await http.post(
                f"/v1/entities/b/e{n % args.entities}/messages", json={"payload": {"n": n}}
            )
            r.raise_for_status()

    t0 = time.perf_counter()
    await asyncio.gather(*(one(n) for n in range(args.sends)))
    elapsed = time.perf_counter() - t0
    print(
        f"\nconcurrent sends: {args.sends} messages to {args.entities} entities, "
        f"concurrency {args.concurrency}:"
    )
    print(
        f"  {args.sends / elapsed:,.0f} sends/s ({elapsed:.2f} s); wakes coalesced while "
        "outstanding, so at most one wake per entity"
    )
    await asyncio.sleep(0.2)
    print(f"  wakes on the stream: {queue.qsize()} (≤ {args.entities} expected)")


async def batch_throughput(http: httpx.AsyncClient, args: argparse.Namespace) -> None:
    """``POST /v1/messages`` in batches of ``--batch-size`` over the same entities."""
    sem = asyncio.Semaphore(max(1, args.concurrency // 4))
    size = args.batch_size

    async def one(start: int) -> None:
        items = [
            {"entity": f"/b/e{n % args.entities}", "payload": {"n": n}}
            for n in range(start, min(start + size, args.batch_messages))
        ]
        async with sem:
            r = await http.post("/v1/messages", json={"messages": items})
            r.raise_for_status()
            assert not any("problem" in item for item in r.json()["results"]), r.text[:300]

    t0 = time.perf_counter()
    await asyncio.gather(*(one(s) for s in range(0, args.batch_messages, size)))
    elapsed = time.perf_counter() - t0
    print(
        f"\nbatch sends: {args.batch_messages} messages to {args.entities} entities, "
        f"{size} per POST /v1/messages, {max(1, args.concurrency // 4)} in flight:"
    )
    print(f"  {args.batch_messages / elapsed:,.0f} messages/s ({elapsed:.2f} s)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rounds", type=int, default=300)
    parser.add_argument("--entities", type=int, default=50)
    parser.add_argument("--sends", type=int, default=2000)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--batch-messages", type=int, default=20_000)
    parser.add_argument("--batch-size", type=int, default=500)
    parser.add_argument(
        "--server-workers", type=int, default=1, help="pullwake serve --workers (default 1)"
    )
    args = parser.parse_args()
    print(
        f"pullwake bench on {platform.node()}: {platform.machine()}, {os.cpu_count()} cores, "
        f"Python {platform.python_version()}; server and client share this machine; "
        f"server workers: {args.server_workers}; installed: "
        + (", ".join(m for m in ("uvloop", "httptools") if importlib.util.find_spec(m)) or "-")
    )
    asyncio.run(bench(args))


if __name__ == "__main__":
    main()
