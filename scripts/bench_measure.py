"""Measuring for the benchmark: CPU from ``/proc``, child processes, latency percentiles and
:class:`Meter`, which brackets a measured window (CPU of the processes involved, and the bench
database's Postgres transactions once their statistics are settled).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import resource
import signal
import subprocess
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import asyncpg
from bench_load import cpu_self_s
from redis.asyncio import Redis

CLK_TCK = os.sysconf("SC_CLK_TCK")


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


class MeterHost(Protocol):
    """What :class:`Meter` needs of the bench."""

    admin: asyncpg.Connection
    db_name: str
    redis: Redis

    async def settle(self) -> bool: ...


class Meter:
    """CPU of the processes involved, and the bench database's settled transaction count."""

    def __init__(self, bench: MeterHost) -> None:
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
            server_cpu_s=delta(start.server, end.server),
            runner_cpu_s=delta(start.runners, end.runners),
            bench_cpu_s=end.bench - start.bench,
            pg_cpu_s=pg,
            redis_cpu_s=delta(start.redis, end.redis),
            xacts=total,
            rollbacks=rollbacks,
            settled=settled and mark.settled,
        )


def delta(a: float | None, b: float | None) -> float | None:
    """b - a, or None when either is unknown."""
    return None if a is None or b is None else b - a


def _comm(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/comm") as f:
            return f.read().strip()
    except OSError:
        return ""
