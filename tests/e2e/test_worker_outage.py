"""Redis goes down under load and comes back empty: the worker process (``pullwake worker`` or
plain ``arq pullwake.tasks.WorkerSettings``) rides it out in the same process, logs the outage
once, and every message sent before, during and after is acked by the runner.

The Redis here is a private ``redis-server`` of the test (stopped and started again on the same
port, without persistence); the shared Redis is never touched.
"""

from __future__ import annotations

import asyncio
import secrets
import signal
import subprocess
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import pytest
from redis.asyncio import Redis

from pullwake.testing import RedisServer, free_port

from .harness import PULLWAKE, child_env, cleanup_process, stop_process
from .test_faults import (
    LEASE_MS,
    MESSAGES,
    RECOVERY_MS,
    REDELIVER_MS,
    STRANDED_MS,
    TABLES,
    Faults,
    assert_every_message_handled,
    log,
)

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(180)]

OUTAGE_S = 8.0
OUTAGE_WARNING = "redis is unreachable"
OUTAGE_OVER = "redis is reachable again"


@pytest.fixture
async def outage(
    database_url: str, private_redis: RedisServer, tmp_path: Path
) -> AsyncIterator[Faults]:
    """The fault harness (server, worker, runner processes) on the private Redis."""
    conn = await asyncpg.connect(database_url)
    await conn.execute(f"TRUNCATE {TABLES} CASCADE")
    await conn.close()
    env = child_env(
        PULLWAKE_DATABASE_URL=database_url,
        PULLWAKE_REDIS_URL=private_redis.url,
        PULLWAKE_REDIS_KEY_PREFIX=f"pwout{secrets.token_hex(3)}",
        PULLWAKE_SSE_BLOCK_MS="200",
        PULLWAKE_SSE_KEEPALIVE_MS="1000",
        PULLWAKE_CLAIM_LEASE_MS=str(LEASE_MS),
        PULLWAKE_REDELIVER_AFTER_MS=str(REDELIVER_MS),
        PULLWAKE_STRANDED_AFTER_MS=str(STRANDED_MS),
        PULLWAKE_RECOVERY_INTERVAL_MS=str(RECOVERY_MS),
        PULLWAKE_HYGIENE_INTERVAL_MS="5000",
    )
    redis: Redis = Redis.from_url(private_redis.url, decode_responses=True)
    harness = Faults(tmp_path, env, database_url, redis, entity_type="outage")
    try:
        yield harness
    finally:
        harness.cleanup()
        if harness.http is not None:
            await harness.http.aclose()
        await redis.aclose()


@pytest.mark.parametrize("entry_point", ["pullwake-worker", "plain-arq"])
async def test_worker_rides_out_redis_stopped_and_restarted_empty(
    outage: Faults, private_redis: RedisServer, entry_point: str
) -> None:
    await outage.start(workers=0)
    worker = await outage.start_worker(plain_arq=entry_point == "plain-arq")
    assert worker.proc is not None
    pid = worker.proc.pid
    await outage.start_runner("r1", handle_ms=50)
    urls = await outage.setup_entities()

    await outage.send(urls, range(1, 4))  # before
    during = asyncio.create_task(outage.send(urls, range(4, 8)))
    await asyncio.sleep(0.3)  # under load
    private_redis.stop()
    stopped_at = time.monotonic()
    await asyncio.sleep(OUTAGE_S)
    assert worker.proc.poll() is None, f"the worker exited during the outage:\n{worker.log()}"
    private_redis.start()  # empty: no streams, no groups, no arq queue
    await during
    await outage.send(urls, range(8, MESSAGES + 1))  # after

    took = await outage.wait_all_done(timeout=90)
    log(f"{entry_point}: all acked {time.monotonic() - stopped_at:.1f} s after Redis stopped")
    await outage.check_invariants(urls)
    assert_every_message_handled(outage, urls)
    assert worker.proc.poll() is None, worker.log()
    assert worker.proc.pid == pid
    text = worker.log().lower()
    assert text.count(OUTAGE_WARNING) == 1, text[-4000:]
    assert text.count(OUTAGE_OVER) == 1, text[-4000:]
    assert "traceback" not in text, text[-4000:]
    assert took < 90


async def _readyz(base: str) -> tuple[int, dict[str, object]]:
    async with httpx.AsyncClient(base_url=base, timeout=3) as client:
        try:
            r = await client.get("/readyz")
        except httpx.TransportError:
            return 0, {}
        return r.status_code, r.json()


async def _until_readyz(base: str, want: Callable[[int, str], bool], proc: Any) -> str:
    deadline = time.monotonic() + 45
    while True:
        status, body = await _readyz(base)
        text = str(body)
        if want(status, text):
            return text
        assert proc.poll() is None, f"pullwake dev exited {proc.returncode}"
        assert time.monotonic() < deadline, f"/readyz stayed {status} {text}"
        await asyncio.sleep(0.2)


async def test_dev_worker_rides_out_redis_and_readyz_follows_it(
    database_url: str, private_redis: RedisServer, tmp_path: Path
) -> None:
    """``pullwake dev``: its in-process worker survives the outage in the same process, and
    /readyz says not ready (worker down) until it can work again."""
    port = free_port()
    env = child_env(
        PULLWAKE_DATABASE_URL=database_url,
        PULLWAKE_REDIS_URL=private_redis.url,
        PULLWAKE_REDIS_KEY_PREFIX=f"pwdev{secrets.token_hex(3)}",
    )
    log_path = tmp_path / "dev.log"
    with log_path.open("wb") as out:
        proc = subprocess.Popen(
            [*PULLWAKE, "dev", "--no-demo", "--port", str(port), "--data-dir", str(tmp_path)],
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    base = f"http://127.0.0.1:{port}"
    try:
        ready = await _until_readyz(base, lambda s, t: s == 200, proc)
        assert "'worker': 'ok'" in ready
        private_redis.stop()
        down = await _until_readyz(base, lambda s, t: s == 503 and "'worker': 'down'" in t, proc)
        await asyncio.sleep(5)  # well past several recovery ticks
        assert proc.poll() is None, log_path.read_text()
        private_redis.start()  # empty
        back = await _until_readyz(base, lambda s, t: s == 200, proc)
        assert "'worker': 'ok'" in back, (down, back)
        rc = await stop_process(proc, signal.SIGTERM, timeout=20, log=log_path.read_text)
    finally:
        cleanup_process(proc)
    text = log_path.read_text().lower()
    assert rc == 0, text
    assert text.count(OUTAGE_WARNING) == 1, text


async def test_worker_stopped_during_a_redis_outage_exits_cleanly(
    outage: Faults, private_redis: RedisServer
) -> None:
    await outage.start(workers=1)
    worker = outage.workers[0]
    assert worker.proc is not None
    private_redis.stop()
    await asyncio.sleep(3)
    assert worker.proc.poll() is None, worker.log()
    rc = await stop_process(worker.proc, signal.SIGTERM, timeout=20, log=worker.log)
    assert rc == 0, worker.log()
    assert "traceback" not in worker.log().lower(), worker.log()
