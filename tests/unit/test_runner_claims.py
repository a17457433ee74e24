"""Claims, deferral, the handler API, claim loss, done retries and graceful stop (fake clock)."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import pytest
from _runner_fakes import (
    NOW,
    FakeClock,
    FakeTransport,
    make_runner,
    notification,
    settle,
    started,
    stopped,
    unreachable,
    wake_event,
)

from pullwake.runner import ClaimLost, Release, Runner, State, Wake
from pullwake.runner.book import Offer, WakeBook
from pullwake.runner.transport import ApiError, ClaimOutcome, WakeEvent
from pullwake.wire import ClaimDone, MessagePage, MessageView


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def transport(clock: FakeClock) -> FakeTransport:
    return FakeTransport(clock)


class Gates:
    """Claim answers held until released by the test, keyed by wake id."""

    def __init__(self) -> None:
        self.answers: dict[str, asyncio.Future[ClaimOutcome]] = {}

    def future(self, wake_id: str) -> asyncio.Future[ClaimOutcome]:
        if wake_id not in self.answers:
            self.answers[wake_id] = asyncio.get_running_loop().create_future()
        return self.answers[wake_id]

    async def claim(self, wake_id: str) -> ClaimOutcome:
        return await self.future(wake_id)

    def answer(self, wake_id: str, outcome: ClaimOutcome | BaseException) -> None:
        future = self.future(wake_id)
        if isinstance(outcome, BaseException):
            future.set_exception(outcome)
        else:
            future.set_result(outcome)


def auto_claim(events: dict[str, WakeEvent], **kw: Any) -> Any:
    async def claim(wake_id: str) -> ClaimOutcome:
        return notification(events[wake_id], **kw)

    return claim


async def deliver(runner: Runner, transport: FakeTransport, *events: WakeEvent) -> None:
    for event in events:
        transport.streams[-1].push(event)
    await settle()


async def test_claims_and_acks_the_delivered_batch(transport: FakeTransport) -> None:
    seen: list[int] = []

    async def handler(wake: Wake) -> None:
        async for message in wake.messages:
            seen.append(message.offset)

    event = wake_event()
    transport.claim_script = auto_claim({event.wake.wake_id: event}, offsets=range(1, 4))
    runner = make_runner(transport, handler)
    await started(runner)
    await deliver(runner, transport, event)
    assert seen == [1, 2, 3]
    assert [(c, a) for c, a, _ in transport.dones] == [(event.wake.wake_id, 3)]
    health = runner.health()
    assert (health.events_received, health.claims_succeeded, health.dones_sent) == (1, 1, 1)
    assert health.last_claim_result == "claimed"
    assert health.last_dispatch_at is not None
    await stopped(runner, transport.clock)


async def test_a_chained_claim_runs_at_once_without_a_wake(transport: FakeTransport) -> None:
    """done asks claim_next; a follow-up claim in the answer runs straight away (one job)."""
    seen: list[list[int]] = []

    async def handler(wake: Wake) -> None:
        seen.append([m.offset async for m in wake.messages])

    event = wake_event()
    transport.claim_script = auto_claim({event.wake.wake_id: event}, offsets=range(1, 3))
    follow_up = wake_event(entity=event.wake.entity, epoch=event.wake.epoch + 1)
    transport.done_plan = [notification(follow_up, range(3, 5), acked=2)]
    runner = make_runner(transport, handler)
    await started(runner)
    await deliver(runner, transport, event)
    assert seen == [[1, 2], [3, 4]]
    assert [(c, a) for c, a, _ in transport.dones] == [
        (event.wake.wake_id, 2),
        (follow_up.wake.wake_id, 4),
    ]
    assert transport.done_chains == [True, True]
    assert len(transport.claims) == 1  # the follow-up needed no claim call
    health = runner.health()
    assert (health.claims_succeeded, health.dones_sent) == (2, 2)
    assert health.last_claim_result == "chained"
    await stopped(runner, transport.clock)


async def test_chaining_lets_go_when_another_entity_waits(transport: FakeTransport) -> None:
    """A busy entity must not starve the others: with a wake of another entity waiting for the
    only slot, done asks for no follow-up claim (the entity's next wake goes via the stream)."""
    release_a = asyncio.Event()

    async def handler(wake: Wake) -> None:
        if wake.entity.url == "/t/a":
            await release_a.wait()

    a, b = wake_event("/t/a"), wake_event("/t/b")
    transport.claim_script = auto_claim({a.wake.wake_id: a, b.wake.wake_id: b})
    runner = make_runner(transport, handler, concurrency=1)
    await started(runner)
    await deliver(runner, transport, a, b)  # b waits for a's slot
    release_a.set()
    await settle()
    assert [c for c, _, _ in transport.dones] == [a.wake.wake_id, b.wake.wake_id]
    assert transport.done_chains == [False, True]
    await stopped(runner, transport.clock)


async def test_an_old_server_refusing_claim_next_gets_the_done_again_without_it(
    transport: FakeTransport, caplog: pytest.LogCaptureFixture
) -> None:
    """A server from before chaining answers claim_next with 400 INVALID_REQUEST (unknown
    field): the same done goes again without it, and no later done of the session asks."""
    a, b = wake_event("/t/a"), wake_event("/t/b")
    transport.claim_script = auto_claim({a.wake.wake_id: a, b.wake.wake_id: b})
    transport.refuse_claim_next = True
    runner = make_runner(transport)
    await started(runner)
    with caplog.at_level(logging.INFO, logger="pullwake.runner"):
        await deliver(runner, transport, a)
        await deliver(runner, transport, b)
    assert [(c, acked) for c, acked, _ in transport.dones] == [
        (a.wake.wake_id, 2),
        (a.wake.wake_id, 2),
        (b.wake.wake_id, 2),
    ]
    assert transport.done_chains == [True, False, False]
    refused = [r for r in caplog.records if "refused claim_next" in r.getMessage()]
    assert len(refused) == 1
    assert refused[0].levelno == logging.INFO
    health = runner.health()
    assert (health.dones_sent, health.last_error) == (2, None)
    await stopped(runner, transport.clock)


async def test_a_400_not_about_claim_next_refuses_the_done_and_keeps_chaining(
    transport: FakeTransport,
) -> None:
    """When the done without claim_next is refused too, the 400 was about something else: the
    done is reported as refused and the next done still asks for the follow-up claim."""
    a, b = wake_event("/t/a"), wake_event("/t/b")
    transport.claim_script = auto_claim({a.wake.wake_id: a, b.wake.wake_id: b})
    bad = ApiError(400, "INVALID_REQUEST", "acked_offset is past the tail")
    transport.done_plan = [bad, bad]
    runner = make_runner(transport)
    await started(runner)
    await deliver(runner, transport, a)
    await deliver(runner, transport, b)
    assert transport.done_chains == [True, False, True]
    health = runner.health()
    assert health.dones_sent == 1
    assert "acked_offset is past the tail" in (health.last_error or "")
    await stopped(runner, transport.clock)


async def test_messages_page_past_the_first_batch(transport: FakeTransport) -> None:
    seen: list[int] = []

    async def handler(wake: Wake) -> None:
        seen.extend([m.offset async for m in wake.messages])

    event = wake_event()
    transport.claim_script = auto_claim(
        {event.wake.wake_id: event}, offsets=range(1, 3), tail=5, more=True
    )

    def page(offsets: range, more: bool) -> MessagePage:
        messages = [MessageView(o, {}, "user:a@example.com", NOW) for o in offsets]
        return MessagePage(messages, offsets[-1], 5, more)

    transport.pages = {2: page(range(3, 5), True), 4: page(range(5, 6), False)}
    runner = make_runner(transport, handler)
    await started(runner)
    await deliver(runner, transport, event)
    assert seen == [1, 2, 3, 4, 5]
    assert transport.dones[0][1] == 5
    await stopped(runner, transport.clock)


async def test_same_entity_wakes_are_deferred_and_the_newest_retried(
    transport: FakeTransport,
) -> None:
    gates = Gates()
    transport.claim_script = gates.claim
    first, second, third = wake_event(epoch=1), wake_event(epoch=2), wake_event(epoch=3)
    runner = make_runner(transport)
    await started(runner)
    await deliver(runner, transport, first, third, second)  # second arrives late: older than third
    assert [w for w, _ in transport.claims] == [first.wake.wake_id]  # never two at once
    assert runner.health().wakes_deferred == 2
    gates.answer(first.wake.wake_id, notification(first))
    await settle()
    # The active one ended: exactly one retry, with the newest wake.
    assert [w for w, _ in transport.claims] == [first.wake.wake_id, third.wake.wake_id]
    gates.answer(third.wake.wake_id, None)
    await settle()
    assert len(transport.claims) == 2
    assert runner.health().claims_skipped == 1
    assert runner.active_entities() == set()
    await stopped(runner, transport.clock)


async def test_different_entities_run_concurrently_up_to_the_limit(
    transport: FakeTransport,
) -> None:
    gates = Gates()
    transport.claim_script = gates.claim
    events = [wake_event(f"/t/e{i}") for i in range(3)]
    runner = make_runner(transport, concurrency=2)
    await started(runner)
    await deliver(runner, transport, *events)
    assert [w for w, _ in transport.claims] == [e.wake.wake_id for e in events[:2]]
    assert runner.health().waiting_wakes == 1
    gates.answer(events[1].wake.wake_id, notification(events[1]))
    await settle()
    assert [w for w, _ in transport.claims][-1] == events[2].wake.wake_id
    await stopped(runner, transport.clock)


@pytest.mark.parametrize(
    ("outcome", "result"),
    [
        (None, "no_work"),
        (ClaimDone(True, "paused"), "entity_paused"),
        (ApiError(409, "ALREADY_CLAIMED", "busy"), "already_claimed"),
        (ApiError(404, "NOT_FOUND", "gone"), "not_found"),
    ],
)
async def test_skipped_claims_run_nothing(
    transport: FakeTransport, outcome: Any, result: str
) -> None:
    ran: list[Wake] = []

    async def handler(wake: Wake) -> None:
        ran.append(wake)

    async def claim(wake_id: str) -> ClaimOutcome:
        if isinstance(outcome, BaseException):
            raise outcome
        return outcome  # type: ignore[no-any-return]

    errors: list[BaseException] = []
    transport.claim_script = claim
    runner = make_runner(transport, handler, on_error=errors.append)
    await started(runner)
    await deliver(runner, transport, wake_event())
    assert ran == []
    assert transport.dones == []
    assert errors == []
    health = runner.health()
    assert (health.claims_skipped, health.claims_failed, health.last_claim_result) == (
        1,
        0,
        result,
    )
    await stopped(runner, transport.clock)


async def test_claim_retries_transient_failures(clock: FakeClock, transport: FakeTransport) -> None:
    event = wake_event()
    answers: list[Any] = [unreachable(), ApiError(503, "UNAVAILABLE", "db"), notification(event)]

    async def claim(wake_id: str) -> ClaimOutcome:
        answer = answers.pop(0)
        if isinstance(answer, BaseException):
            raise answer
        return answer  # type: ignore[no-any-return]

    transport.claim_script = claim
    runner = make_runner(transport)
    await started(runner)
    await deliver(runner, transport, event)
    await clock.advance(250)
    assert len(transport.claims) == 2
    await clock.advance(500)
    assert [t for _, t in transport.claims] == [0, 250, 750]
    assert len(transport.dones) == 1
    await stopped(runner, transport.clock)


async def test_handler_error_still_sends_done_acking_only_what_was_acked(
    transport: FakeTransport,
) -> None:
    errors: list[BaseException] = []

    async def handler(wake: Wake) -> None:
        async for message in wake.messages:
            if message.offset == 3:
                raise ValueError("poison")
            wake.ack(message.offset)

    event = wake_event()
    transport.claim_script = auto_claim({event.wake.wake_id: event}, offsets=range(1, 5), acked=0)
    runner = make_runner(transport, handler, on_error=errors.append)
    await started(runner)
    await deliver(runner, transport, event)
    assert [a for _, a, _ in transport.dones] == [2]
    assert runner.health().handler_errors == 1
    assert any(isinstance(e, ValueError) for e in errors)
    await stopped(runner, transport.clock)


async def test_handler_error_without_acks_acks_nothing(transport: FakeTransport) -> None:
    async def handler(wake: Wake) -> None:
        raise RuntimeError("boom")

    event = wake_event()
    transport.claim_script = auto_claim({event.wake.wake_id: event}, offsets=range(8, 10), acked=7)
    runner = make_runner(transport, handler)
    await started(runner)
    await deliver(runner, transport, event)
    assert transport.dones == []  # held for the retry delay first
    await transport.clock.advance(1_000)
    assert [(a, t) for _, a, t in transport.dones] == [(7, 1_000)]
    await stopped(runner, transport.clock)


async def test_ack_cannot_pass_what_was_delivered(transport: FakeTransport) -> None:
    problems: list[BaseException] = []

    async def handler(wake: Wake) -> None:
        try:
            wake.ack(99)
        except ValueError as exc:
            problems.append(exc)
        wake.ack(1)
        wake.ack(0)  # never backwards
        assert wake.acked_offset == 1
        raise RuntimeError("stop here")

    event = wake_event()
    transport.claim_script = auto_claim({event.wake.wake_id: event})
    runner = make_runner(transport, handler)
    await started(runner)
    await deliver(runner, transport, event)
    assert len(problems) == 1
    assert [a for _, a, _ in transport.dones] == [1]
    await stopped(runner, transport.clock)


async def test_release_from_the_handler(transport: FakeTransport) -> None:
    async def handler(wake: Wake) -> None:
        raise Release("exit status 3: no disk")

    event = wake_event()
    transport.claim_script = auto_claim({event.wake.wake_id: event})
    runner = make_runner(transport, handler)
    await started(runner)
    await deliver(runner, transport, event)
    await transport.clock.advance(1_000)
    assert transport.releases == [(event.wake.wake_id, "exit status 3: no disk")]
    assert transport.release_times == [1_000]
    assert transport.dones == []
    await stopped(runner, transport.clock)


async def test_emit_is_fenced(transport: FakeTransport) -> None:
    offsets: list[int] = []

    async def handler(wake: Wake) -> None:
        offsets.append(await wake.emit({"ok": 1}))
        transport.emit_error = ApiError(409, "FENCED", "stale epoch")
        await wake.emit({"ok": 2})

    event = wake_event()
    transport.claim_script = auto_claim({event.wake.wake_id: event})
    runner = make_runner(transport, handler)
    await started(runner)
    await deliver(runner, transport, event)
    assert offsets == [1]
    assert transport.dones == []  # a lost claim sends no done
    assert runner.health().claims_lost == 1
    await stopped(runner, transport.clock)


async def test_claim_heartbeats_run_and_a_fenced_claim_cancels_the_handler(
    clock: FakeClock, transport: FakeTransport
) -> None:
    outcome: list[str] = []

    async def handler(wake: Wake) -> None:
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            outcome.append("cancelled")
            raise

    event = wake_event()
    transport.claim_script = auto_claim({event.wake.wake_id: event}, lease_ms=30_000)
    runner = make_runner(transport, handler)
    await started(runner)
    await deliver(runner, transport, event)
    await clock.advance(10_000)
    assert transport.claim_heartbeats == [event.wake.wake_id]
    await clock.advance(10_000)
    assert len(transport.claim_heartbeats) == 2
    transport.claim_heartbeat_error = ApiError(409, "LEASE_EXPIRED", "expired")
    await clock.advance(10_000)
    assert outcome == ["cancelled"]
    assert transport.dones == []
    assert transport.releases == []
    assert runner.active_entities() == set()
    await stopped(runner, transport.clock)


async def test_unreachable_server_until_the_lease_passes_loses_the_claim(
    clock: FakeClock, transport: FakeTransport
) -> None:
    async def handler(wake: Wake) -> None:
        await asyncio.Event().wait()

    event = wake_event()
    transport.claim_script = auto_claim({event.wake.wake_id: event}, lease_ms=3_000)
    transport.claim_heartbeat_error = unreachable()
    runner = make_runner(transport, handler)
    await started(runner)
    await deliver(runner, transport, event)
    await clock.advance(2_999)
    assert runner.active_entities() == {"/t/a"}
    await clock.advance(1)
    assert runner.active_entities() == set()
    assert runner.health().claims_lost == 1
    await stopped(runner, transport.clock)


async def test_failed_done_is_retried_with_backoff(
    clock: FakeClock, transport: FakeTransport
) -> None:
    event = wake_event()
    transport.claim_script = auto_claim({event.wake.wake_id: event})
    transport.done_plan = [unreachable(), ApiError(503, "UNAVAILABLE", "x"), None]
    runner = make_runner(transport)
    await started(runner)
    await deliver(runner, transport, event)
    await clock.advance(499)
    assert len(transport.dones) == 1
    await clock.advance(1)
    assert len(transport.dones) == 2
    await clock.advance(1_000)
    assert [t for _, _, t in transport.dones] == [0, 500, 1_500]
    health = runner.health()
    assert (health.dones_sent, health.done_retries) == (1, 2)
    await stopped(runner, transport.clock)


async def test_refused_done_is_not_retried(clock: FakeClock, transport: FakeTransport) -> None:
    event = wake_event()
    transport.claim_script = auto_claim({event.wake.wake_id: event})
    transport.done_plan = [ApiError(409, "FENCED", "stale")]
    runner = make_runner(transport)
    await started(runner)
    await deliver(runner, transport, event)
    await clock.advance(60_000)
    assert len(transport.dones) == 1
    await stopped(runner, transport.clock)


async def test_stop_waits_one_second_for_a_hung_claim(
    clock: FakeClock, transport: FakeTransport
) -> None:
    gates = Gates()
    transport.claim_script = gates.claim
    runner = make_runner(transport)
    await started(runner)
    await deliver(runner, transport, wake_event())
    stopping = asyncio.create_task(runner.stop())
    await clock.advance(999)
    assert not stopping.done()
    await clock.advance(1)
    await stopping
    assert runner.status is State.STOPPED
    # A later start claims again and stops the same way.
    await started(runner)
    await deliver(runner, transport, wake_event(epoch=2))
    assert len(transport.claims) == 2
    stopping = asyncio.create_task(runner.stop())
    await clock.advance(1_000)
    await stopping


async def test_a_claim_granted_after_stop_is_released_not_run(
    clock: FakeClock, transport: FakeTransport
) -> None:
    ran: list[Wake] = []

    async def handler(wake: Wake) -> None:
        ran.append(wake)

    gates = Gates()
    transport.claim_script = gates.claim
    event = wake_event()
    runner = make_runner(transport, handler)
    await started(runner)
    await deliver(runner, transport, event)
    stopping = asyncio.create_task(runner.stop())
    await settle()
    gates.answer(event.wake.wake_id, notification(event))
    await clock.advance(10)
    await stopping
    assert ran == []
    assert [c for c, _ in transport.releases] == [event.wake.wake_id]


async def test_stop_lets_handlers_finish_within_the_drain_timeout(
    clock: FakeClock, transport: FakeTransport
) -> None:
    async def handler(wake: Wake) -> None:
        while not wake.stopping:
            await clock.sleep_ms(100)
        await clock.sleep_ms(3_000)  # finish up

    event = wake_event()
    transport.claim_script = auto_claim({event.wake.wake_id: event})
    runner = make_runner(transport, handler, drain_timeout_ms=10_000)
    await started(runner)
    await deliver(runner, transport, event)
    stopping = asyncio.create_task(runner.stop())
    await clock.advance(3_100)
    await stopping
    assert [a for _, a, _ in transport.dones] == [2]
    assert transport.releases == []


async def test_drain_timeout_cancels_the_handler_and_releases(
    clock: FakeClock, transport: FakeTransport
) -> None:
    async def handler(wake: Wake) -> None:
        await asyncio.Event().wait()

    first, second = wake_event("/t/a"), wake_event("/t/b")

    async def claim(wake_id: str) -> ClaimOutcome:
        return notification(first if wake_id == first.wake.wake_id else second)

    async def acking_handler(wake: Wake) -> None:
        if wake.entity.url == "/t/b":
            wake.ack(1)
        await asyncio.Event().wait()

    transport.claim_script = claim
    runner = make_runner(transport, acking_handler, drain_timeout_ms=5_000)
    await started(runner)
    await deliver(runner, transport, first, second)
    stopping = asyncio.create_task(runner.stop())
    await clock.advance(4_999)
    assert not stopping.done()
    await clock.advance(1)
    await stopping
    # No progress: released. Progress made: done with what was acked.
    assert [c for c, _ in transport.releases] == [first.wake.wake_id]
    assert [(c, a) for c, a, _ in transport.dones] == [(second.wake.wake_id, 1)]
    del handler


async def test_claim_lost_exception_type() -> None:
    lost = ClaimLost("FENCED", "stale")
    assert lost.code == "FENCED"
    assert "FENCED" in str(lost)


async def test_a_running_handler_survives_a_stream_reconnect(
    clock: FakeClock, transport: FakeTransport
) -> None:
    release = asyncio.Event()

    async def handler(wake: Wake) -> None:
        await release.wait()

    event = wake_event()
    transport.claim_script = auto_claim({event.wake.wake_id: event})
    runner = make_runner(transport, handler)
    await started(runner)
    await deliver(runner, transport, event)
    transport.streams[0].push(unreachable("server restarting"))
    await settle()
    assert runner.status is State.RECONNECTING
    await clock.advance(1_000)
    assert runner.status is State.STREAMING
    release.set()
    await settle()
    assert len(transport.dones) == 1
    await stopped(runner, transport.clock)


async def test_late_heartbeat_results_after_stop_are_ignored(
    clock: FakeClock, transport: FakeTransport
) -> None:
    gate = asyncio.Event()
    transport.heartbeat_plan = [gate]
    runner = make_runner(transport)
    await started(runner)
    await stopped(runner, transport.clock)
    gate.set()
    await settle()
    assert runner.health().last_heartbeat_at is None
    assert runner.status is State.STOPPED
    del clock
    _ = NOW


# --- the wake book on its own (pure) ---------------------------------------------------------


def test_book_keeps_the_newest_wake_per_entity_in_arrival_order() -> None:
    book: WakeBook[str] = WakeBook(concurrency=10)
    assert book.offer(wake_event("/t/a", 2), 0) == Offer(kept=True, deferred=False)
    assert book.offer(wake_event("/t/b", 1), 1) == Offer(kept=True, deferred=False)
    assert book.offer(wake_event("/t/a", 1), 2) == Offer(kept=False, deferred=False)
    assert book.offer(wake_event("/t/a", 3), 3) == Offer(kept=True, deferred=False)
    ready = book.take_ready()
    assert [(e.wake.entity, e.wake.epoch, t) for e, t in ready] == [("/t/a", 3, 3), ("/t/b", 1, 1)]
    assert book.waiting == 0


def test_book_defers_active_entities_and_respects_the_limit() -> None:
    book: WakeBook[str] = WakeBook(concurrency=2)
    book.begin("/t/a", "job-a")
    assert book.offer(wake_event("/t/a", 5), 0).deferred
    for name in ("/t/b", "/t/c"):
        book.offer(wake_event(name), 0)
    assert [e.wake.entity for e, _ in book.take_ready()] == ["/t/b"]  # a busy, one slot left
    book.begin("/t/b", "job-b")
    assert book.take_ready() == []
    book.end("/t/a", "some-other-job")  # not the active job: ignored
    assert book.take_ready() == []
    book.end("/t/a", "job-a")
    assert [e.wake.entity for e, _ in book.take_ready()] == ["/t/a"]
    assert book.waiting == 1
    book.clear_waiting()
    assert book.waiting == 0
