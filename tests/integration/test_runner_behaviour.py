"""The runner library against a live server: a failing handler's retries are spaced out and its
park is logged; permanent refusals stop the runner with an exception."""

from __future__ import annotations

import asyncio
import itertools
import logging
import time

import pytest

from pullwake.config import Settings
from pullwake.runner import Refused, Release, Runner, Wake

from .helpers import ALICE, BOB, create_entity, get_entity, register_runner, send, wait_for

MAX_ATTEMPTS = 3
DELAY_MS = 300


@pytest.fixture
def server_settings(settings: Settings) -> Settings:
    return settings.with_(max_attempts=MAX_ATTEMPTS)


async def test_a_failing_handler_is_retried_seconds_apart_and_its_park_is_a_warning(
    api, http, alice, caplog: pytest.LogCaptureFixture
) -> None:
    runner_id = await register_runner(http, alice)
    entity = await create_entity(http, alice, runner_id)
    attempts: list[float] = []

    async def handle(wake: Wake) -> None:
        attempts.append(time.monotonic())
        raise Release("not now")

    runner = Runner(
        api.base_url,
        runner_id,
        handle,
        await api.make_token(ALICE),
        retry_delay_ms=DELAY_MS,
        max_retry_delay_ms=10 * DELAY_MS,
        heartbeat_interval_ms=60_000,
    )
    with caplog.at_level(logging.INFO, logger="pullwake.runner"):
        await runner.start()
        try:
            await wait_for(lambda: asyncio.sleep(0, runner.status.value == "streaming"))
            await send(http, alice, entity, {"text": "not now"})
            await wait_for(
                lambda: asyncio.sleep(0, runner.health().entities_parked == 1), timeout=15
            )
            await asyncio.sleep(0.5)  # nothing more comes: the entity is parked
        finally:
            await runner.stop()
    assert len(attempts) == MAX_ATTEMPTS
    gaps = [b - a for a, b in itertools.pairwise(attempts)]
    # Each failed claim is held 300 ms, then 600 ms (+ up to 25 %) before it ends, and the
    # server's follow-up wake only comes after that.
    assert DELAY_MS / 1000 <= gaps[0] < 2 * DELAY_MS / 1000, gaps
    assert 2 * DELAY_MS / 1000 <= gaps[1] < 4 * DELAY_MS / 1000, gaps
    parked = f"{MAX_ATTEMPTS} claims in a row ended without progress (last: release)"
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert warnings == [
        f"entity {entity.url} parked by the server: {parked}; it gets no wakes until its "
        f"creator sends resume (POST /v1/entities/{entity.type}/{entity.id}/signal "
        '{"signal": "resume"})'
    ]
    dispatch = (await get_entity(http, alice, entity))["dispatch"]
    assert (dispatch["parked_reason"], dispatch["failed_attempts"]) == (parked, MAX_ATTEMPTS)


async def refusal(api, runner_id: str, token: str | None, **kw: object) -> Refused:
    async def handle(wake: Wake) -> None:
        raise AssertionError("never called")

    runner = Runner(api.base_url, runner_id, handle, token, **kw)  # type: ignore[arg-type]
    with pytest.raises(Refused) as raised:
        await asyncio.wait_for(runner.run(signals=()), 10)
    assert runner.status.value == "stopped"
    return raised.value


async def test_permanent_refusals_end_run_with_refused(api, http, alice) -> None:
    bad = await refusal(api, "build-box", "pwk_not-a-real-token")
    assert (bad.status, bad.code) == (401, "UNAUTHORIZED")
    assert str(bad) == (
        "the server refused the token (401 UNAUTHORIZED): the API token is unknown or revoked"
    )
    missing = await refusal(api, "build-box", None)
    assert str(missing).startswith("the server refused the token (401 UNAUTHORIZED): missing")

    owned = await register_runner(http, alice)
    other = await refusal(api, owned, await api.make_token(BOB))
    assert str(other) == (
        f"the server refused runner {owned!r} (403 FORBIDDEN): runner {owned!r} is owned "
        "by another principal"
    )
    invalid = await refusal(api, "no spaces allowed", await api.make_token(ALICE))
    assert (invalid.status, invalid.code) == (400, "INVALID_REQUEST")
    unknown = await refusal(api, "never-registered", await api.make_token(ALICE), register=False)
    assert str(unknown) == (
        "the server refused runner 'never-registered' (404 NOT_FOUND): runner "
        "'never-registered' does not exist"
    )
