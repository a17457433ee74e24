"""The worker's periodic loops and its arq connection against real Postgres and a private
``redis-server`` that the test stops and starts again."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import warnings
from collections.abc import AsyncIterator
from typing import Any

import asyncpg
import pytest
from redis.exceptions import ConnectionError as RedisConnectionError

from pullwake.config import Settings
from pullwake.metrics import REGISTRY
from pullwake.model import Principal
from pullwake.periodic import Periodic, PeriodicLoops
from pullwake.reachability import OutageRetry, WorkerHealth
from pullwake.services import Services, open_services
from pullwake.tasks import (
    PullwakeWorker,
    _arq_pool,
    create_worker,
    periodic_jobs,
    queue_name,
    worker_settings,
)
from pullwake.testing import RedisServer
from pullwake.wire import (
    DispatchPolicy,
    EntityCreate,
    RunnerRegister,
    RunnerTarget,
    WakeNotification,
)

from .helpers import uid
from .servers import Server, serve

pytestmark = pytest.mark.timeout(60)


@pytest.fixture
async def services(settings: Settings) -> AsyncIterator[Services]:
    async with open_services(settings) as svc:
        yield svc


def _outage_lines(caplog: pytest.LogCaptureFixture) -> list[int]:
    return [r.levelno for r in caplog.records if r.name == "pullwake.reachability"]


async def test_arq_connection_waits_out_a_redis_outage(
    settings: Settings, private_redis: RedisServer, caplog: pytest.LogCaptureFixture
) -> None:
    """Stopped, then started again empty: the call in flight waits (no exception out of arq's
    poll loop) and the outage is logged once when it starts and once when it ends."""
    caplog.set_level(logging.INFO)
    health = WorkerHealth()
    pool = _arq_pool(settings.with_(redis_url=private_redis.url), OutageRetry(health.redis))
    try:
        await pool.zadd(f"{settings.redis_key_prefix}:q", {"job": 1})
        private_redis.stop()
        polls = [asyncio.create_task(pool.zrangebyscore("q", 0, 10)) for _ in range(3)]
        await asyncio.sleep(3)
        assert not any(p.done() for p in polls)
        assert not health.redis.is_up
        private_redis.start()
        assert await asyncio.wait_for(asyncio.gather(*polls), 15) == [[], [], []]  # empty
        assert health.redis.is_up
    finally:
        await pool.aclose()
    assert _outage_lines(caplog) == [logging.WARNING, logging.INFO]


async def test_a_failing_pass_is_reported_once_and_the_loop_recovers(
    services: Services, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    outcomes = [RuntimeError("boom"), RuntimeError("boom again"), None]

    async def flaky(_: Services) -> None:
        error = outcomes.pop(0)
        if error is not None:
            raise error

    job = Periodic("flaky_job", flaky, 1_000, needs_redis=False)
    loops = PeriodicLoops(services, [job], WorkerHealth())
    assert [await loops.run_once(job) for _ in range(3)] == [False, False, True]
    errors = REGISTRY.get_sample_value("pullwake_worker_pass_errors_total", {"job": "flaky_job"})
    assert errors == 2
    last = REGISTRY.get_sample_value(
        "pullwake_worker_last_pass_timestamp_seconds", {"job": "flaky_job"}
    )
    assert last is not None
    assert last > 0
    ours = [(r.levelno, r.getMessage()) for r in caplog.records if r.name == "pullwake.periodic"]
    assert [level for level, _ in ours] == [logging.WARNING, logging.INFO]
    assert "flaky_job" in ours[0][1]


async def test_lease_expiry_goes_on_while_redis_is_down(
    services: Services, settings: Settings
) -> None:
    """Redis-bound jobs pause during an outage; lease expiry (Postgres only) does not."""
    health = WorkerHealth()
    loops = PeriodicLoops(services, periodic_jobs(settings), health)
    jobs = {job.name: job for job in loops.jobs}
    health.redis.failed(ConnectionError("gone"))
    assert await loops.run_once(jobs["expire_claims"]) is True
    assert await loops.run_once(jobs["redeliver_wakes"]) is None
    assert await loops.run_once(jobs["repair_streams"]) is None
    await loops.probe()  # the shared Redis answers: the outage is over
    assert health.redis.is_up
    assert await loops.run_once(jobs["redeliver_wakes"]) is True


async def test_worker_status_rows_show_in_readyz_and_metrics(
    services: Services, settings: Settings, db: asyncpg.Connection
) -> None:
    """A separately deployed worker that cannot work shows: impaired while Redis is down,
    silent once it stops writing its status row."""
    health = WorkerHealth()
    loops = PeriodicLoops(services, [], health)
    await db.execute("DELETE FROM worker_status")
    async with serve(settings) as api:
        await _status_sequence(loops, health, api, db)


async def _status_sequence(
    loops: PeriodicLoops, health: WorkerHealth, api: Server, db: asyncpg.Connection
) -> None:
    async def readyz_workers() -> dict[str, int]:
        r = await api.http.get("/readyz")
        assert r.status_code == 200, r.text  # informational: the API itself is ready
        workers: dict[str, int] = r.json()["workers"]
        return workers

    await loops.record_status()
    assert await readyz_workers() == {"working": 1, "impaired": 0, "silent": 0}
    health.redis.failed(ConnectionError("gone"))
    await loops.record_status()
    assert await readyz_workers() == {"working": 0, "impaired": 1, "silent": 0}
    metrics = (await api.http.get("/metrics")).text
    assert 'pullwake_workers{state="impaired"} 1.0' in metrics
    assert f'pullwake_worker_seen_age_seconds{{worker="{loops.worker_id}"}}' in metrics
    await db.execute("UPDATE worker_status SET seen_at = now() - interval '1 minute'")
    assert await readyz_workers() == {"working": 0, "impaired": 0, "silent": 1}
    await loops.stop()  # a clean stop removes the row
    assert await readyz_workers() == {"working": 0, "impaired": 0, "silent": 0}


async def test_readyz_is_not_ready_while_the_in_process_worker_cannot_work(
    settings: Settings,
) -> None:
    """``pullwake dev`` hands its worker's health to the app: /readyz follows it."""
    health = WorkerHealth()
    health.loops_running = True
    health.main_task = asyncio.current_task()
    async with serve(settings) as api:
        api.services.worker_health = health
        r = await api.http.get("/readyz")
        assert r.status_code == 200, r.text
        assert r.json()["worker"] == "ok"
        health.redis.failed(ConnectionError("gone"))
        r = await api.http.get("/readyz")
        assert r.status_code == 503, r.text
        assert r.json()["code"] == "UNAVAILABLE"
        assert "'worker': 'down'" in r.json()["detail"]


# --- arq's side ----------------------------------------------------------------------------------


def _worker(settings: Settings) -> PullwakeWorker:
    ws: Any = worker_settings(settings)
    return create_worker(settings, ctx={**ws.ctx}, handle_signals=False, poll_delay=0.05)


async def test_a_job_start_broken_by_redis_gives_its_slot_back(settings: Settings) -> None:
    """arq takes a job slot, then WATCHes the job in Redis: a connection lost there used to
    keep the slot for good (with one slot, no webhook would ever be delivered again)."""
    worker = _worker(settings.with_(webhook_concurrency=1))
    pool = worker.pool
    real_pipeline = pool.pipeline

    def lost_mid_watch(*args: Any, **kwargs: Any) -> Any:
        pipe = real_pipeline(*args, **kwargs)

        async def exists(*_keys: Any) -> int:
            raise RedisConnectionError("connection lost during WATCH")

        pipe.exists = exists
        return pipe

    try:
        await pool.zadd(queue_name(settings), {"wk_lost": 1})
        pool.pipeline = lost_mid_watch  # type: ignore[method-assign]
        with pytest.raises(RedisConnectionError):
            await worker.start_jobs([b"wk_lost"])
        assert worker.job_counter == 0
        assert not worker.sem.locked()
    finally:
        await pool.aclose()


async def test_a_worker_started_while_redis_is_down_expires_leases(
    services: Services, settings: Settings, private_redis: RedisServer, db: asyncpg.Connection
) -> None:
    """arq's start-up waits for Redis; the periodic loops (lease expiry) must not."""
    alice = Principal.parse("user:alice@example.com")
    runner_id = uid("r")
    await services.runners.register(alice, RunnerRegister(id=runner_id))
    body = EntityCreate(dispatch_policy=DispatchPolicy([RunnerTarget(runner_id)]))
    await services.dispatcher.create_entity(alice, "job", uid("e"), body)
    url = await db.fetchval("SELECT url FROM entities")
    sent = await services.dispatcher.send(alice, url, {"n": 1}, None)
    assert sent.wake.id is not None
    assert isinstance(await services.claims.claim(runner_id, sent.wake.id, None), WakeNotification)
    await db.execute("UPDATE claims SET lease_expires_at = now() - interval '1 second'")
    await db.execute("UPDATE dispatch_state SET active_lease_expires_at = now()")

    private_redis.stop()
    worker = _worker(settings.with_(redis_url=private_redis.url, recovery_interval_ms=200))
    task = asyncio.create_task(worker.main())
    try:
        for _ in range(100):
            if await db.fetchval("SELECT status FROM claims") == "expired":
                break
            await asyncio.sleep(0.1)
        assert await db.fetchval("SELECT status FROM claims") == "expired"
        assert await db.fetchval("SELECT outstanding_wake_id FROM dispatch_state") is not None
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        if worker.on_shutdown is not None:
            await worker.on_shutdown(worker.ctx)
        await worker.pool.aclose()


async def test_closing_with_a_job_running_still_closes_the_services(settings: Settings) -> None:
    """arq cancels running jobs on close and then gathered them: the cancelled job's
    CancelledError came out of close, and the services (the Postgres pool, the periodic loops)
    were never closed, so a worker stopped mid-job leaked them."""
    worker = _worker(settings)
    main = asyncio.create_task(worker.main())
    try:
        for _ in range(200):
            if "services" in worker.ctx:
                break
            await asyncio.sleep(0.05)
        services: Services = worker.ctx["services"]
        started = asyncio.Event()

        async def stuck() -> None:
            started.set()
            await asyncio.sleep(60)

        worker.tasks["wk_stuck"] = asyncio.create_task(stuck())
        await started.wait()
    finally:
        main.cancel()
        with contextlib.suppress(asyncio.CancelledError, TimeoutError):
            await asyncio.wait_for(main, 15)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)  # arq calls redis' close()
            await asyncio.wait_for(worker.close(), 20)
    assert worker.tasks.get("wk_stuck") is None
    assert services.store.pool.is_closing(), "on_shutdown did not run: the pool is still open"
