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
  ``kill -9`` of a runner process holding a claim (with a ``pullwake worker`` process);
  an offline fleet (``--offline-runners`` registered runners with a waiting wake each, none
  connected): a ``pullwake worker`` process's CPU per recovery pass, and how late a lease
  expiry is handled next to that fleet; an idle fleet of ``--fleet`` wake streams on one
  ``pullwake serve`` (Redis connections, memory per stream, idle CPU, connect time, send → wake
  among them).

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
import importlib.util
import os
import platform
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

from bench_core import FULL, IN_FLIGHT, POOL, SMOKE, Bench, Profile, wrk_version
from bench_report import write_results
from bench_scenarios import SCENARIOS


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
    if args.offline_runners:
        profile = Profile(**{**asdict(profile), "offline_runners": args.offline_runners})
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
            print(f"  (set-up: {time.monotonic() - started:.1f} s)")
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
    parser.add_argument(
        "--offline-runners",
        type=int,
        default=None,
        help="offline fleet: registered runners, none connected, one waiting wake each "
        "(default 10000, 200 with --smoke)",
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
    parser.add_argument(
        "--fleet",
        type=int,
        default=None,
        metavar="N",
        help="idle fleet: wake streams held open on one API process (default 10000; smoke 50)",
    )
    parser.add_argument("--logs", default=None, help="keep the processes' logs in this directory")
    parser.add_argument("--keep-going", action="store_true", help="report a failed scenario")
    args = parser.parse_args()
    if args.cycle_entities is None:
        args.cycle_entities = 2 * args.runners * args.runner_concurrency
    report = asyncio.run(run(args))
    write_results(report, Path(args.out))


if __name__ == "__main__":
    main()
