"""A handler that keeps failing: the claim is held for a growing delay before it ends, and a
park the server answers is logged (fake clock, scripted transport)."""

from __future__ import annotations

import logging
from typing import Any

import pytest
from _runner_fakes import (
    FakeClock,
    FakeTransport,
    make_runner,
    notification,
    parked,
    settle,
    started,
    stopped,
    wake_event,
)

from pullwake.runner import ApiError, Release, Runner, Wake
from pullwake.runner.failures import Failures
from pullwake.runner.transport import ClaimOutcome, EntityState
from pullwake.wire import ClaimHeartbeatResponse, WakeNotification

ENTITY = "/t/a"


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def transport(clock: FakeClock) -> FakeTransport:
    transport = FakeTransport(clock)

    async def claim(wake_id: str) -> ClaimOutcome:
        epoch = int(wake_id[-4:])
        return notification(wake_event(ENTITY, epoch), range(1, 3), acked=0)

    transport.claim_script = claim
    return transport


async def wake(transport: FakeTransport, epoch: int) -> None:
    transport.streams[-1].push(wake_event(ENTITY, epoch))
    await settle()


def end_times(transport: FakeTransport) -> list[float]:
    """When claims ended (done or release), in order."""
    return sorted([t for _, _, t in transport.dones] + transport.release_times)


async def ended_at(transport: FakeTransport, clock: FakeClock, count: int) -> float:
    """Move the clock until ``count`` claims have ended; when the last one did."""
    for _ in range(2_000):
        if len(end_times(transport)) >= count:
            return end_times(transport)[count - 1]
        await clock.advance(500)
    raise AssertionError("the claim never ended")


async def fail_in_a_row(
    runner: Runner, transport: FakeTransport, clock: FakeClock, times: int
) -> list[float]:
    """Wake the entity ``times`` times, each as soon as the last claim ended (as the server
    does); how long each claim was held."""
    held = []
    for epoch in range(1, times + 1):
        began = clock.now_ms()
        await wake(transport, epoch)
        held.append(await ended_at(transport, clock, epoch) - began)
    return held


async def always_release(wake: Wake) -> None:
    raise Release("not now")


async def test_a_failing_handler_is_retried_with_a_doubling_delay_up_to_the_cap(
    clock: FakeClock, transport: FakeTransport
) -> None:
    runner = make_runner(transport, always_release, max_retry_delay_ms=16_000)
    await started(runner)
    held = await fail_in_a_row(runner, transport, clock, 7)
    assert held == [1_000, 2_000, 4_000, 8_000, 16_000, 16_000, 16_000]
    assert [error for _, error in transport.releases] == ["not now"] * 7
    await stopped(runner, clock)


async def test_jitter_is_added_to_the_delay(clock: FakeClock, transport: FakeTransport) -> None:
    runner = make_runner(transport, always_release, random=lambda: 0.5)
    await started(runner)
    assert await fail_in_a_row(runner, transport, clock, 2) == [1_125, 2_250]
    await stopped(runner, clock)


async def test_an_error_without_progress_holds_then_acks_nothing(
    clock: FakeClock, transport: FakeTransport, caplog: pytest.LogCaptureFixture
) -> None:
    async def boom(wake: Wake) -> None:
        raise RuntimeError("boom")

    runner = make_runner(transport, boom, retry_delay_ms=500)
    with caplog.at_level(logging.INFO, logger="pullwake.runner"):
        await started(runner)
        assert await fail_in_a_row(runner, transport, clock, 2) == [500, 1_000]
    assert [acked for _, acked, _ in transport.dones] == [0, 0]
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert warnings == [
        "handler failed on /t/a (claim wk_ta0001): RuntimeError('boom'); failure 1 in a row, "
        "the claim ends in 0.5 s",
        "handler failed on /t/a (claim wk_ta0002): RuntimeError('boom'); failure 2 in a row, "
        "the claim ends in 1.0 s",
    ]
    assert runner.health().handler_errors == 2
    await stopped(runner, clock)


async def test_success_or_progress_starts_the_count_over(
    clock: FakeClock, transport: FakeTransport
) -> None:
    plan = ["fail", "fail", "ok", "fail", "progress", "fail"]

    async def handler(wake: Wake) -> None:
        step = plan.pop(0)
        if step == "ok":
            return
        if step == "progress":
            wake.ack(1)
        raise Release("again")

    runner = make_runner(transport, handler)
    await started(runner)
    held = await fail_in_a_row(runner, transport, clock, 6)
    assert held == [1_000, 2_000, 0, 1_000, 0, 1_000]
    await stopped(runner, clock)


async def test_stop_ends_a_hold_at_once(clock: FakeClock, transport: FakeTransport) -> None:
    runner = make_runner(
        transport, always_release, retry_delay_ms=20_000, max_retry_delay_ms=20_000
    )
    await started(runner)
    await wake(transport, 1)
    await clock.advance(3_000)
    assert transport.releases == []
    took = await stopped(runner, clock)
    assert took < 100
    assert transport.release_times == [3_000]


async def test_the_held_claim_is_heartbeated_and_a_lost_one_sends_nothing(
    clock: FakeClock, transport: FakeTransport
) -> None:
    runner = make_runner(transport, always_release, retry_delay_ms=10_000, claim_heartbeat_ms=1_000)
    await started(runner)
    await wake(transport, 1)
    await clock.advance(3_500)
    assert len(transport.claim_heartbeats) == 3  # the lease is kept while the claim is held
    transport.claim_heartbeat_error = ApiError(409, "FENCED", "killed")
    await clock.advance(1_000)
    assert runner.active_entities() == set()  # the hold ended with the claim
    await clock.advance(20_000)
    assert transport.releases == []
    assert transport.dones == []
    assert runner.health().claims_lost == 1
    await stopped(runner, clock)


async def test_an_entity_stopping_ends_the_hold(clock: FakeClock, transport: FakeTransport) -> None:
    statuses = ["running", "stopping"]

    async def claim_heartbeat(claim: WakeNotification) -> ClaimHeartbeatResponse:
        transport.claim_heartbeats.append(claim.claim_id)
        response = ClaimHeartbeatResponse(True, claim.lease_expires_at, statuses.pop(0))
        return response

    transport.claim_heartbeat = claim_heartbeat  # type: ignore[method-assign]
    runner = make_runner(transport, always_release, retry_delay_ms=10_000, claim_heartbeat_ms=1_000)
    await started(runner)
    await wake(transport, 1)
    await clock.advance(2_000)
    assert transport.release_times == [2_000]
    await stopped(runner, clock)


async def test_a_park_is_logged_at_warning_with_the_servers_reason(
    clock: FakeClock, transport: FakeTransport, caplog: pytest.LogCaptureFixture
) -> None:
    runner = make_runner(transport, always_release)
    await started(runner)
    await fail_in_a_row(runner, transport, clock, 2)
    assert transport.entity_reads == []  # the server re-woke the entity: not parked
    transport.next_wake = False
    transport.entity_state = parked()
    with caplog.at_level(logging.WARNING, logger="pullwake.runner"):
        await wake(transport, 3)
        await ended_at(transport, clock, 3)
    assert transport.entity_reads == [ENTITY]
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING] == [
        "entity /t/a parked by the server: 5 claims in a row ended without progress (last: "
        "release); it gets no wakes until its creator sends resume (POST /v1/entities/t/a/signal "
        '{"signal": "resume"})'
    ]
    assert runner.health().entities_parked == 1
    # Resumed: a fresh set of attempts, so the delay starts over.
    transport.next_wake = True
    began = clock.now_ms()
    await wake(transport, 4)
    assert await ended_at(transport, clock, 4) - began == 1_000
    await stopped(runner, clock)


@pytest.mark.parametrize(
    ("state", "level", "text"),
    [
        (EntityState("paused"), logging.INFO, "entity /t/a gets no wake: it is paused"),
        (
            ApiError(0, "UNREACHABLE", "connection refused"),
            logging.WARNING,
            "entity /t/a gets no wake although work is pending (parked, paused or stopped; "
            "reading it failed: UNREACHABLE: connection refused)",
        ),
    ],
)
async def test_no_wake_without_a_park(
    clock: FakeClock,
    transport: FakeTransport,
    caplog: pytest.LogCaptureFixture,
    state: Any,
    level: int,
    text: str,
) -> None:
    transport.next_wake = False
    transport.entity_state = state
    runner = make_runner(transport, always_release)
    with caplog.at_level(logging.INFO, logger="pullwake.runner"):
        await started(runner)
        await wake(transport, 1)
        await ended_at(transport, clock, 1)
    matching = [r for r in caplog.records if r.getMessage() == text]
    assert [r.levelno for r in matching] == [level]
    assert runner.health().entities_parked == 0
    await stopped(runner, clock)


async def test_a_successful_done_reads_no_entity(
    clock: FakeClock, transport: FakeTransport
) -> None:
    transport.next_wake = False

    async def ok(wake: Wake) -> None:
        return None

    runner = make_runner(transport, ok)
    await started(runner)
    await wake(transport, 1)
    assert [acked for _, acked, _ in transport.dones] == [2]
    assert transport.entity_reads == []
    await stopped(runner, clock)


async def test_retry_delay_zero_ends_a_failed_claim_at_once(
    clock: FakeClock, transport: FakeTransport
) -> None:
    runner = make_runner(transport, always_release, retry_delay_ms=0)
    await started(runner)
    assert await fail_in_a_row(runner, transport, clock, 3) == [0, 0, 0]
    await stopped(runner, clock)


def test_failures_are_bounded_and_validated() -> None:
    failures = Failures(1_000, 30_000, random=lambda: 1.0, limit=2)
    assert [failures.failed("a"), failures.failed("a"), failures.failed("b")] == [1, 2, 1]
    failures.failed("c")  # "a" is the oldest: forgotten
    assert (failures.count("a"), failures.count("b"), failures.count("c")) == (0, 1, 1)
    assert [failures.delay_ms(n) for n in (0, 1, 2, 6, 200)] == [0, 1_250, 2_500, 37_500, 37_500]
    with pytest.raises(ValueError, match="retry_delay_ms"):
        Failures(2_000, 1_000, random=lambda: 0.0)
