"""Outage bookkeeping of the worker: one log line when an outage starts, one when it ends, and
a retry that backs off (jittered, doubling, capped) until Redis answers."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import pytest
from redis.exceptions import ConnectionError as RedisConnectionError

from pullwake.metrics import REGISTRY
from pullwake.periodic import _delay_ms
from pullwake.reachability import OutageRetry, Reachability


def _lines(caplog: pytest.LogCaptureFixture) -> list[tuple[int, str]]:
    return [
        (r.levelno, r.getMessage()) for r in caplog.records if r.name == "pullwake.reachability"
    ]


def _gauge(name: str) -> float | None:
    return REGISTRY.get_sample_value("pullwake_worker_dependency_up", {"dependency": name})


def test_one_warning_per_outage_and_one_info_when_it_ends(caplog: pytest.LogCaptureFixture):
    caplog.set_level(logging.INFO)
    now = [100.0]
    reach = Reachability("unit-redis", clock=lambda: now[0])
    for _ in range(50):  # a call failing every tick
        reach.failed(RedisConnectionError("refused"))
    assert _gauge("unit-redis") == 0
    now[0] += 7.5
    for _ in range(5):
        reach.succeeded()
    assert _gauge("unit-redis") == 1
    reach.failed(OSError("reset"))  # a second outage is logged again
    levels = [level for level, _ in _lines(caplog)]
    assert levels == [logging.WARNING, logging.INFO, logging.WARNING]
    assert "after 7.5 s" in _lines(caplog)[1][1]
    assert reach.outages == 2


async def test_retry_backs_off_until_redis_answers(caplog: pytest.LogCaptureFixture):
    caplog.set_level(logging.INFO)
    slept: list[float] = []

    async def sleep(seconds: float) -> None:
        slept.append(seconds)

    retry = OutageRetry(Reachability("unit-retry"), cap_s=2.0, base_s=0.1, sleep=sleep)
    calls = 0

    async def do() -> str:
        nonlocal calls
        calls += 1
        if calls <= 10:
            raise RedisConnectionError("Connection refused")
        return "PONG"

    disconnects: list[Any] = []

    async def fail(error: Any) -> None:
        disconnects.append(error)

    assert await retry.call_with_retry(do, fail) == "PONG"
    assert len(slept) == len(disconnects) == 10
    assert all(0 < s <= 2.0 for s in slept)
    assert slept[0] <= 0.2  # starts short ...
    assert min(slept[5:]) >= 1.0  # ... doubles, and stays at the cap (equal jitter: >= cap / 2)
    assert [level for level, _ in _lines(caplog)] == [logging.WARNING, logging.INFO]


async def test_retry_gives_up_once_the_worker_stopped() -> None:
    retry = OutageRetry(Reachability("unit-stop"), sleep=lambda s: asyncio.sleep(0))
    owner = asyncio.create_task(asyncio.sleep(0))
    await owner
    retry.owner = owner  # the worker's main task has ended: shutting down during an outage

    async def do() -> None:
        raise RedisConnectionError("Connection refused")

    async def fail(error: Any) -> None:
        return None

    with pytest.raises(RedisConnectionError):
        await retry.call_with_retry(do, fail)


def test_failing_periodic_jobs_back_off_to_a_cap() -> None:
    assert _delay_ms(1_000, 0) == 1_000
    assert [_delay_ms(1_000, n) for n in (1, 2, 3, 4, 5, 6)] == [
        2_000,
        4_000,
        8_000,
        16_000,
        30_000,
        30_000,
    ]
    assert _delay_ms(60_000, 3) == 60_000  # never more often than the interval
