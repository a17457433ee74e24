"""``pullwake.testing``'s fakes, used the way a library user tests a handler: no server, a
fake wake, a fake transport told to fail."""

from __future__ import annotations

import asyncio

import pytest

from pullwake.runner import ApiError, ClaimLost, Release, Runner, Wake
from pullwake.runner.transport import Transport
from pullwake.testing import FakeTransport, Outcome, fake_wake


async def echo(wake: Wake) -> None:
    """A user's handler: an echo event per message, acked one by one."""
    async for message in wake.messages:
        await wake.emit({"echo": message.payload, "epoch": wake.epoch})
        wake.ack(message.offset)


async def first_only(wake: Wake) -> None:
    """Processes the first message, then fails."""
    async for message in wake.messages:
        wake.ack(message.offset)
        raise RuntimeError("boom")


async def not_yet(wake: Wake) -> None:
    """Gives the claim back without touching the inbox."""
    raise Release("the order service is down")


async def test_a_handler_that_returns_acks_everything_delivered() -> None:
    wake = fake_wake({"n": 1}, {"n": 2}, entity="/orders/42", epoch=3)
    outcome = await wake.run(echo)
    assert outcome == Outcome(done=2)
    assert wake.emitted == [{"echo": {"n": 1}, "epoch": 3}, {"echo": {"n": 2}, "epoch": 3}]
    assert wake.acks == [1, 2]
    assert wake.transport.dones == [2]
    assert wake.releases == []


async def test_the_wake_carries_the_entity_and_the_epoch() -> None:
    wake = fake_wake("x", entity="/orders/42", epoch=7, tags={"team": "a"}, acked_offset=4)
    assert (wake.entity.url, wake.entity.type, wake.entity.id) == ("/orders/42", "orders", "42")
    assert wake.entity.tags == {"team": "a"}
    assert wake.epoch == 7
    assert wake.acked_offset == 4
    assert [m.offset async for m in wake.messages] == [5]
    assert not wake.stopping
    assert fake_wake(status="stopping").stopping


async def test_a_handler_that_returns_without_acking_still_acks_what_it_was_given() -> None:
    async def ignore(wake: Wake) -> None:
        return None

    wake = fake_wake(1, 2, 3)
    assert await wake.run(ignore) == Outcome(done=3)
    assert wake.acks == []


async def test_a_long_inbox_is_paged_through() -> None:
    wake = fake_wake(*range(1, 8), first_batch=2, page_limit=2)
    assert await wake.run(echo) == Outcome(done=7)
    assert wake.acks == [1, 2, 3, 4, 5, 6, 7]
    assert [args[1:] for args in wake.transport.called("messages")] == [(2, 2), (4, 2), (6, 2)]


async def test_a_failing_handler_acks_only_what_it_acked() -> None:
    wake = fake_wake("a", "b", "c")
    outcome = await wake.run(first_only)
    assert outcome.done == 1
    assert isinstance(outcome.error, RuntimeError)
    assert wake.transport.dones == [1]


async def test_a_release_before_any_ack_gives_the_claim_back() -> None:
    wake = fake_wake("a")
    outcome = await wake.run(not_yet)
    assert outcome.released == "the order service is down"
    assert outcome.done is None
    assert isinstance(outcome.error, Release)
    assert wake.releases == ["the order service is down"]
    assert wake.transport.dones == []


async def test_a_fenced_event_append_loses_the_claim() -> None:
    """A newer epoch took over: the handler's emit raises ClaimLost, and no done is sent."""
    transport = FakeTransport()
    transport.fail("emit", "FENCED")
    wake = fake_wake({"n": 1}, transport=transport)
    outcome = await wake.run(echo)
    assert outcome.lost == "FENCED"
    assert isinstance(outcome.error, ClaimLost)
    assert (transport.dones, transport.releases, transport.emitted) == ([], [], [])


async def test_a_failure_takes_the_status_of_its_code() -> None:
    transport = FakeTransport()
    transport.fail("emit", "RATE_LIMITED", times=2)
    transport.fail("messages", "UNREACHABLE")
    wake = fake_wake(1, 2, first_batch=1, transport=transport)

    refusals: list[tuple[int, str]] = []

    async def retry_once(wake: Wake) -> None:
        async for message in wake.messages:
            for _ in range(3):
                try:
                    await wake.emit(message.payload)
                    break
                except ApiError as exc:
                    refusals.append((exc.status, exc.code))
            wake.ack(message.offset)

    outcome = await wake.run(retry_once)
    assert outcome.done == 1  # the page after the first message was unreachable
    assert getattr(outcome.error, "status", None) == 0
    assert refusals == [(429, "RATE_LIMITED")] * 2
    assert transport.emitted == [1]
    assert [name for name, _ in transport.calls].count("emit") == 3


def test_fail_refuses_a_call_the_transport_does_not_have() -> None:
    with pytest.raises(ValueError, match="no call"):
        FakeTransport().fail("emitt", "FENCED")


def test_an_entity_must_be_a_type_and_an_id() -> None:
    with pytest.raises(ValueError, match="/type/id"):
        fake_wake(entity="orders/42")


async def test_a_runner_runs_a_handler_over_the_fake_transport() -> None:
    """The same transport drives a whole Runner: it registers, claims the offered wake, runs
    the handler and sends the done."""
    transport = FakeTransport()
    wake = fake_wake({"n": 1}, entity="/orders/1", transport=transport)
    transport.offer(wake)
    typed: Transport = transport  # the fake satisfies the runner's protocol
    runner = Runner("http://unused", "runner-1", echo, token="pwk_unused", transport=typed)
    await runner.start()
    try:
        async with asyncio.timeout(10):
            while not transport.dones:
                await asyncio.sleep(0.01)
    finally:
        await runner.stop()
    assert transport.dones == [1]
    assert transport.emitted == [{"echo": {"n": 1}, "epoch": 1}]
    names = [name for name, _ in transport.calls]
    assert names[0] == "register"
    assert names.index("open_wakes") < names.index("claim") < names.index("done")
    assert transport.called("claim")[0][0] == wake.claim_id
