"""Backoff delays, jitter bounds, the SSE parser and the fake clock used by the runner tests."""

from __future__ import annotations

import asyncio

import pytest

from pullwake.runner.backoff import Backoff
from pullwake.runner.clock import FakeClock, wait_tasks
from pullwake.runner.sse import SseParser


def test_doubles_from_one_second_to_the_cap_without_jitter() -> None:
    backoff = Backoff(random=lambda: 0.0)
    delays = [backoff.next_delay_ms() for _ in range(8)]
    assert delays == [1_000, 2_000, 4_000, 8_000, 16_000, 30_000, 30_000, 30_000]


def test_reset_goes_back_to_the_initial_delay() -> None:
    backoff = Backoff(random=lambda: 0.0)
    backoff.next_delay_ms()
    backoff.next_delay_ms()
    backoff.reset()
    assert backoff.next_delay_ms() == 1_000


@pytest.mark.parametrize("draw", [0.0, 0.5, 0.999_999, 1.0, 7.0, -3.0])
def test_jitter_is_only_ever_added_and_bounded(draw: float) -> None:
    backoff = Backoff(jitter=0.25, random=lambda: draw)
    for base in (1_000, 2_000, 4_000, 8_000, 16_000, 30_000):
        delay = backoff.next_delay_ms()
        assert base <= delay <= base * 1.25


def test_jitter_spreads_runners() -> None:
    draws = iter([0.0, 0.2, 0.4, 0.6, 0.8])
    delays = {Backoff(random=lambda: next(draws)).next_delay_ms() for _ in range(5)}
    assert delays == {1_000, 1_050, 1_100, 1_150, 1_200}


def test_rejects_nonsense() -> None:
    with pytest.raises(ValueError, match="initial_ms"):
        Backoff(0)
    with pytest.raises(ValueError, match="jitter"):
        Backoff(jitter=2)


def test_sse_parser_reads_wake_blocks_and_comments() -> None:
    parser = SseParser()
    lines = [
        ": connected session=s1",
        "retry: 1000",
        "",
        "id: 5-0",
        "event: wake",
        'data: {"wake_id": "wk_1"}',
        "",
        "",
        ": keep-alive",
        "",
    ]
    messages = [m for m in map(parser.feed, lines) if m is not None]
    assert len(messages) == 3
    assert messages[0].comments == ["connected session=s1"]
    assert messages[0].retry_ms == 1000
    assert (messages[1].event, messages[1].id, messages[1].data) == (
        "wake",
        "5-0",
        '{"wake_id": "wk_1"}',
    )
    assert messages[2].comments == ["keep-alive"]


def test_sse_parser_joins_multi_line_data() -> None:
    parser = SseParser()
    for line in ("data: a", "data:b"):
        assert parser.feed(line) is None
    message = parser.feed("")
    assert message is not None
    assert message.data == "a\nb"


async def test_fake_clock_wakes_sleepers_exactly_at_their_deadline() -> None:
    clock = FakeClock()
    woke: list[float] = []

    async def sleeper(ms: float) -> None:
        await clock.sleep_ms(ms)
        woke.append(clock.now_ms())

    tasks = [asyncio.create_task(sleeper(ms)) for ms in (1_000, 250)]
    await clock.advance(249)
    assert woke == []
    await clock.advance(1)
    assert woke == [250]
    await clock.advance(749)
    assert woke == [250]
    await clock.advance(1)
    assert woke == [250, 1_000]
    await asyncio.gather(*tasks)


async def test_wait_tasks_times_out_on_the_clock() -> None:
    clock = FakeClock()
    never: asyncio.Task[object] = asyncio.create_task(asyncio.Event().wait())
    waiter = asyncio.create_task(wait_tasks([never], clock, 500))
    await clock.advance(499)
    assert not waiter.done()
    await clock.advance(1)
    assert await waiter == {never}
    never.cancel()
