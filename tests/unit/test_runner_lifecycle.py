"""Runner lifecycle timing on a fake clock: backoff, heartbeats, resets, on_error, health."""

from __future__ import annotations

import asyncio
import logging

import pytest
from _runner_fakes import (
    END,
    HANG,
    FakeClock,
    FakeStream,
    FakeTransport,
    make_runner,
    settle,
    started,
    unreachable,
)

from pullwake.runner import ApiError, Refused, State


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def transport(clock: FakeClock) -> FakeTransport:
    return FakeTransport(clock)


async def test_registers_then_streams(transport: FakeTransport) -> None:
    runner = make_runner(transport)
    await started(runner)
    assert transport.registers == 1
    assert runner.status is State.STREAMING
    assert runner.health().stream_connected
    await runner.stop()
    assert runner.status is State.STOPPED
    assert transport.streams[0].closed
    assert transport.closed is False  # an injected transport belongs to the caller


async def test_reconnects_exactly_at_1000_then_2000_ms(
    clock: FakeClock, transport: FakeTransport
) -> None:
    transport.connect_plan = [unreachable() for _ in range(5)]
    runner = make_runner(transport)
    await started(runner)
    assert transport.connects == [0]
    assert runner.status is State.RECONNECTING
    await clock.advance(999)
    assert transport.connects == [0]
    await clock.advance(1)
    assert transport.connects == [0, 1_000]
    await clock.advance(1_999)
    assert len(transport.connects) == 2
    await clock.advance(1)
    assert transport.connects == [0, 1_000, 3_000]
    await clock.advance(4_000)
    assert transport.connects[-1] == 7_000
    assert runner.health().reconnect_count == 4
    await runner.stop()


async def test_backoff_caps_at_30_seconds(clock: FakeClock, transport: FakeTransport) -> None:
    transport.connect_plan = [unreachable() for _ in range(9)]
    runner = make_runner(transport)
    await started(runner)
    await clock.advance(1_000 + 2_000 + 4_000 + 8_000 + 16_000 + 30_000 + 30_000)
    gaps = [b - a for a, b in zip(transport.connects, transport.connects[1:], strict=False)]
    assert gaps == [1_000, 2_000, 4_000, 8_000, 16_000, 30_000, 30_000]
    await runner.stop()


async def test_jitter_is_added_to_each_delay(clock: FakeClock, transport: FakeTransport) -> None:
    transport.connect_plan = [unreachable() for _ in range(3)]
    runner = make_runner(transport, random=lambda: 0.5)
    await started(runner)
    await clock.advance(1_124)
    assert len(transport.connects) == 1
    await clock.advance(1)
    assert transport.connects == [0, 1_125]
    await clock.advance(2_250)
    assert transport.connects == [0, 1_125, 3_375]
    await runner.stop()


async def test_backoff_resets_after_a_good_connect(
    clock: FakeClock, transport: FakeTransport
) -> None:
    good = FakeStream()
    transport.connect_plan = [unreachable(), unreachable(), good, unreachable()]
    runner = make_runner(transport)
    await started(runner)
    await clock.advance(3_000)  # failures at 0 and 1000, connected at 3000
    assert runner.status is State.STREAMING
    good.push(END)  # the server closes the stream
    await settle()
    assert runner.status is State.RECONNECTING
    await clock.advance(999)
    assert transport.connects == [0, 1_000, 3_000]
    await clock.advance(1)
    assert transport.connects == [0, 1_000, 3_000, 4_000]
    await runner.stop()


async def test_stream_error_reconnects_and_records_the_error(
    clock: FakeClock, transport: FakeTransport
) -> None:
    runner = make_runner(transport)
    await started(runner)
    transport.streams[0].push(unreachable("reset by peer"))
    await settle()
    assert runner.status is State.RECONNECTING
    assert "reset by peer" in (runner.health().last_error or "")
    await clock.advance(1_000)
    assert runner.status is State.STREAMING
    assert len(transport.streams) == 2
    await runner.stop()


async def test_two_heartbeat_failures_reset_the_stream(
    clock: FakeClock, transport: FakeTransport
) -> None:
    transport.heartbeat_plan = [None, unreachable(), unreachable()]
    runner = make_runner(transport, heartbeat_interval_ms=10, event_heartbeat_throttle_ms=0)
    await started(runner)
    assert len(transport.heartbeats) == 1
    await clock.advance(10)  # first failure: nothing happens yet
    assert runner.status is State.STREAMING
    assert runner.health().last_heartbeat_ok is False
    await clock.advance(10)  # second consecutive failure: the stream is dropped
    assert runner.status is State.RECONNECTING
    assert transport.streams[0].closed
    await clock.advance(1_000)
    assert runner.status is State.STREAMING
    assert runner.health().reconnect_count == 1
    await runner.stop()


async def test_one_heartbeat_failure_between_successes_does_not_reset(
    clock: FakeClock, transport: FakeTransport
) -> None:
    transport.heartbeat_plan = [None, unreachable(), None, unreachable(), None]
    runner = make_runner(transport, heartbeat_interval_ms=10, event_heartbeat_throttle_ms=0)
    await started(runner)
    await clock.advance(40)
    assert len(transport.heartbeats) == 5
    assert runner.status is State.STREAMING
    assert runner.health().reconnect_count == 0
    await runner.stop()


async def test_heartbeat_failures_abort_a_hung_connect(
    clock: FakeClock, transport: FakeTransport
) -> None:
    transport.connect_plan = [HANG]
    transport.heartbeat_plan = [unreachable(), unreachable()]
    runner = make_runner(
        transport,
        register=False,
        heartbeat_interval_ms=10,
        event_heartbeat_throttle_ms=0,
        connect_timeout_ms=60_000,
    )
    await started(runner)
    assert runner.status is State.CONNECTING
    await clock.advance(10)
    assert runner.status is State.RECONNECTING  # 2nd failure aborted the hung connect
    await clock.advance(1_000)
    assert runner.status is State.STREAMING
    assert runner.health().reconnect_count == 1
    await runner.stop()


async def test_connect_timeout_aborts_a_hung_connect(
    clock: FakeClock, transport: FakeTransport
) -> None:
    transport.connect_plan = [HANG]
    runner = make_runner(transport, connect_timeout_ms=5_000)
    await started(runner)
    await clock.advance(4_999)
    assert runner.status is State.CONNECTING
    await clock.advance(1)
    assert runner.status is State.RECONNECTING
    assert "CONNECT_TIMEOUT" in (runner.health().last_error or "")
    await clock.advance(1_000)
    assert runner.status is State.STREAMING
    await runner.stop()


async def test_heartbeats_are_single_flight_with_one_coalesced_follow_up(
    clock: FakeClock, transport: FakeTransport
) -> None:
    gate = asyncio.Event()
    transport.heartbeat_plan = [gate]
    runner = make_runner(transport, heartbeat_interval_ms=0, event_heartbeat_throttle_ms=1)
    await started(runner)
    beats = runner._heartbeats
    beats.start()
    beats.request()
    await settle()
    assert len(transport.heartbeats) == 1
    for _ in range(5):
        beats.request()
        beats.changed()
        await clock.advance(5)
    assert len(transport.heartbeats) == 1  # still only the one in flight
    gate.set()
    await settle()
    assert len(transport.heartbeats) == 2  # exactly one follow-up
    await clock.advance(100)
    assert len(transport.heartbeats) == 2
    await runner.stop()


async def test_diagnostics_changes_send_at_most_one_heartbeat_per_throttle_window(
    clock: FakeClock, transport: FakeTransport
) -> None:
    runner = make_runner(transport, heartbeat_interval_ms=60_000, event_heartbeat_throttle_ms=2_000)
    await started(runner)
    assert len(transport.heartbeats) == 1  # the immediate one
    runner._heartbeats.changed()
    await clock.advance(500)
    runner._heartbeats.changed()
    await clock.advance(1_499)
    assert len(transport.heartbeats) == 1
    await clock.advance(1)
    assert len(transport.heartbeats) == 2
    await clock.advance(10_000)
    assert len(transport.heartbeats) == 2
    await runner.stop()


async def test_heartbeat_body_carries_lease_and_sanitized_diagnostics(
    transport: FakeTransport,
) -> None:
    runner = make_runner(transport, heartbeat_interval_ms=20_000)
    await started(runner)
    runner._report(RuntimeError("bad token pwk_SECRETSECRET in url"), "test")
    body = transport.heartbeats[0]
    assert body["lease_ms"] == 60_000
    assert body["status"] in {"connecting", "streaming"}
    assert {"reconnect_count", "events_received", "claims_succeeded", "last_error"} <= set(body)
    assert "SECRET" not in (runner.health().last_error or "")
    await runner.stop()


async def test_restart_resets_the_heartbeat_failure_count(
    clock: FakeClock, transport: FakeTransport
) -> None:
    transport.heartbeat_plan = [unreachable(), unreachable()]
    runner = make_runner(transport, heartbeat_interval_ms=60_000, event_heartbeat_throttle_ms=0)
    await started(runner)
    await runner.stop()
    await started(runner)  # second failure in a new run: the count started again at 0
    assert runner.status is State.STREAMING
    assert runner.health().reconnect_count == 0
    await runner.stop()


async def test_on_error_is_report_only(
    clock: FakeClock, transport: FakeTransport, caplog: pytest.LogCaptureFixture
) -> None:
    seen: list[tuple[str, bool | None]] = []

    def on_error(error: BaseException) -> None:
        health = runner.health()
        seen.append((health.last_error or "", health.last_heartbeat_ok))
        raise RuntimeError("callback exploded")

    transport.heartbeat_plan = [unreachable("hb down")]
    transport.connect_plan = [unreachable("refused")]
    runner = make_runner(transport, on_error=on_error)
    with caplog.at_level(logging.ERROR, logger="pullwake.runner"):
        await started(runner)
        await clock.advance(1_000)
    assert runner.status is State.STREAMING
    assert any("hb down" in error and ok is False for error, ok in seen)
    assert any("refused" in error for error, _ in seen)
    assert "runner on_error callback failed" in caplog.text
    await runner.stop()
    assert runner.status is State.STOPPED


async def test_health_before_and_after(transport: FakeTransport) -> None:
    runner = make_runner(transport)
    before = runner.health()
    assert (before.running, before.status, before.started_at, before.events_received) == (
        False,
        "stopped",
        None,
        0,
    )
    await started(runner)
    during = runner.health()
    assert during.running
    assert during.started_at is not None
    assert during.stream_connected_since is not None
    await runner.stop()
    assert not runner.health().running


async def test_concurrent_stops_share_one_shutdown_and_start_during_stop_is_ignored(
    transport: FakeTransport,
) -> None:
    runner = make_runner(transport)
    await started(runner)
    first = asyncio.create_task(runner.stop())
    second = asyncio.create_task(runner.stop())
    await asyncio.sleep(0)
    assert runner.status is State.STOPPING
    await runner.start()
    assert runner.status is State.STOPPING
    await asyncio.gather(first, second)
    assert runner.status is State.STOPPED
    assert len(transport.streams) == 1


# --- refusals: permanent errors stop the runner --------------------------------------------

UNAUTHORIZED = ApiError(401, "UNAUTHORIZED", "the API token is unknown or revoked")


@pytest.mark.parametrize(
    ("error", "message"),
    [
        (UNAUTHORIZED, "the server refused the token (401 UNAUTHORIZED): the API token is"),
        (
            ApiError(403, "FORBIDDEN", "runner 'runner-1' is owned by another principal"),
            "the server refused runner 'runner-1' (403 FORBIDDEN): runner 'runner-1' is",
        ),
        (
            ApiError(400, "INVALID_REQUEST", "invalid runner id"),
            "the server refused runner 'runner-1' (400 INVALID_REQUEST): invalid runner id",
        ),
    ],
)
async def test_a_refused_registration_stops_the_runner_and_run_raises_it(
    clock: FakeClock, transport: FakeTransport, error: ApiError, message: str
) -> None:
    transport.register_plan = [error]
    seen: list[BaseException] = []
    runner = make_runner(transport, on_error=seen.append)
    run = asyncio.create_task(runner.run(signals=()))
    await settle()
    assert run.done()  # stopped by itself, without a signal
    with pytest.raises(Refused) as raised:
        await run
    assert str(raised.value).startswith(message)
    assert (raised.value.status, raised.value.code) == (error.status, error.code)
    assert isinstance(raised.value, ApiError)
    assert runner.refused is raised.value
    assert runner.status is State.STOPPED
    assert seen == [raised.value]
    await clock.advance(120_000)
    assert transport.registers == 1  # never tried again
    assert transport.connects == []


async def test_a_refused_wake_stream_stops_the_runner(
    clock: FakeClock, transport: FakeTransport
) -> None:
    transport.connect_plan = [ApiError(404, "NOT_FOUND", "runner 'runner-1' does not exist")]
    runner = make_runner(transport, register=False)
    run = asyncio.create_task(runner.run(signals=()))
    await settle()
    with pytest.raises(Refused, match=r"refused runner 'runner-1' \(404 NOT_FOUND\)"):
        await run
    await clock.advance(60_000)
    assert len(transport.connects) == 1


@pytest.mark.parametrize("code", ["HTTP_404", "NOT_FOUND"])
async def test_a_url_that_is_not_the_api_is_refused_with_a_hint(
    transport: FakeTransport, code: str
) -> None:
    transport.register_plan = [ApiError(404, code, "Not Found")]
    runner = make_runner(transport)
    with pytest.raises(Refused) as raised:
        await runner.run(signals=())
    assert str(raised.value) == (
        f"http://server answered (404 {code}): Not Found: is it the pullwake API's base URL?"
    )


async def test_a_refusal_after_streaming_stops_the_runner(
    clock: FakeClock, transport: FakeTransport
) -> None:
    """The token is revoked while the runner streams: the stream breaks, the reconnect is
    refused, and the runner stops instead of retrying."""
    transport.connect_plan = [FakeStream(), UNAUTHORIZED]
    runner = make_runner(transport)
    run = asyncio.create_task(runner.run(signals=()))
    await settle()
    assert runner.status is State.STREAMING
    transport.streams[0].push(unreachable("reset by peer"))
    await clock.advance(1_000)
    with pytest.raises(Refused, match="refused the token"):
        await run
    assert len(transport.connects) == 2


@pytest.mark.parametrize(
    "error",
    [
        unreachable(),
        ApiError(409, "RUNNER_DISABLED", "runner 'runner-1' is disabled"),
        ApiError(429, "RATE_LIMITED", "too many wake streams"),
        ApiError(503, "UNAVAILABLE", "redis is down"),
        ApiError(500, "INTERNAL", "boom"),
        ApiError(502, "HTTP_502", "Bad Gateway"),
    ],
)
async def test_transient_errors_keep_retrying(
    clock: FakeClock, transport: FakeTransport, error: ApiError
) -> None:
    transport.connect_plan = [error, error, error]
    runner = make_runner(transport)
    await started(runner)
    await clock.advance(1_000 + 2_000 + 4_000)
    assert transport.connects == [0, 1_000, 3_000, 7_000]
    assert runner.status is State.STREAMING
    assert runner.refused is None
    await runner.stop()


async def test_start_logs_a_refusal_once_and_run_raises_it_instead(
    transport: FakeTransport, caplog: pytest.LogCaptureFixture
) -> None:
    transport.register_plan = [UNAUTHORIZED, UNAUTHORIZED]
    runner = make_runner(transport)
    with caplog.at_level(logging.INFO, logger="pullwake.runner"):
        await started(runner)
        assert runner.status is State.STOPPED
        errors = [r for r in caplog.records if r.levelno >= logging.WARNING]
        assert [r.getMessage() for r in errors] == [
            "runner runner-1 stopping: the server refused the token (401 UNAUTHORIZED): "
            "the API token is unknown or revoked"
        ]
        assert errors[0].levelno == logging.ERROR
        caplog.clear()
        with pytest.raises(Refused):
            await runner.run(signals=())
    assert [r for r in caplog.records if r.levelno >= logging.WARNING] == []
    assert runner.refused is not None
    await runner.stop()  # returns at once
