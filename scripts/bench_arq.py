"""The benchmark's arq worker: one job that records when it started.

``python scripts/bench_arq.py`` runs a real :class:`arq.worker.Worker` configured from the
environment: ``BENCH_ARQ_REDIS_URL`` (its own Redis database), ``BENCH_ARQ_QUEUE`` (a queue name
unique to the run), ``BENCH_ARQ_POLL_DELAY`` (seconds; arq's default is 0.5) and
``BENCH_ARQ_STARTED_KEY``, a list the job pushes ``"<n> <start time>"`` onto, which the bench
pops with a blocking BLPOP. Results are not kept.
"""

from __future__ import annotations

import os
import time
from typing import Any

from arq.connections import RedisSettings
from arq.worker import Worker

STARTED_KEY = os.environ.get("BENCH_ARQ_STARTED_KEY", "bench:arq:started")


async def started(ctx: dict[str, Any], n: int) -> None:
    """The job: push this job's number and start time (wall clock, seconds)."""
    began = time.time()
    await ctx["redis"].rpush(STARTED_KEY, f"{n} {began:.6f}")


def main() -> None:
    Worker(
        functions=[started],
        queue_name=os.environ["BENCH_ARQ_QUEUE"],
        redis_settings=RedisSettings.from_dsn(os.environ["BENCH_ARQ_REDIS_URL"]),
        poll_delay=float(os.environ.get("BENCH_ARQ_POLL_DELAY", "0.5")),
        keep_result=0,
        log_results=False,
    ).run()


if __name__ == "__main__":
    main()
