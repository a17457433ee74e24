"""The claim use cases over a fake state machine: what they do with each answer of the store
(acks, publishing, errors, the holder's view), without Postgres or Redis."""

from __future__ import annotations

import dataclasses
from datetime import UTC, datetime
from typing import Any

import pytest
from _core_fakes import FakePublisher

from pullwake.config import Settings
from pullwake.core.callbacks import ClaimCallbacks
from pullwake.core.claims import Claims, NoWork
from pullwake.errors import AlreadyClaimed, Fenced, InvalidOffset, LeaseExpired
from pullwake.model import hash_token
from pullwake.store.steps import Step
from pullwake.wire import ClaimDone, WakeNotification

NOW = datetime(2026, 12, 1, 12, 0, tzinfo=UTC)
EMPTY = Step(*[None] * len(dataclasses.fields(Step)))


def step(**fields: Any) -> Step:
    return dataclasses.replace(EMPTY, **fields)


def claimed(claim_id: str = "wk_1", epoch: int = 3, **fields: Any) -> Step:
    """A step that handed out a claim with two messages."""
    return step(
        claim_id=claim_id,
        epoch=epoch,
        lease_ms=30_000,
        lease_expires_at=NOW,
        url="/t/e",
        type="t",
        entity_id="e",
        status="running",
        tags={},
        created_by="user:a",
        acked_offset=4,
        tail_offset=9,
        msg_offsets=[5, 6],
        msg_payloads=[{"n": 5}, {"n": 6}],
        msg_senders=["user:a", "user:a"],
        msg_created_at=[NOW, NOW],
        more_messages=True,
        waited_s=0.01,
        **fields,
    )


def with_wake(s: Step) -> Step:
    return dataclasses.replace(
        s,
        pub_id="wk_2",
        pub_url="/t/e",
        pub_epoch=4,
        pub_reason="lease_expired",
        pub_created_at=NOW,
        pub_runner_id="r1",
        pub_target_type="runner",
    )


class FakeStore:
    """Answers each call with the next scripted step and records the arguments."""

    def __init__(self, *answers: Step) -> None:
        self.answers = list(answers)
        self.calls: list[tuple[str, tuple[Any, ...]]] = []

    def __getattr__(self, name: str) -> Any:
        async def call(*args: Any, **kwargs: Any) -> Step:
            self.calls.append((name, args))
            return self.answers.pop(0)

        return call


class FakeStreams:
    def __init__(self) -> None:
        self.acked: list[tuple[str, list[str]]] = []

    async def ack(self, runner_id: str, entry_ids: list[str]) -> None:
        self.acked.append((runner_id, entry_ids))


SETTINGS = Settings(public_url="http://pw.test")


def claims(store: FakeStore) -> tuple[Claims, FakePublisher, FakeStreams]:
    publisher, streams = FakePublisher(), FakeStreams()
    return Claims(store, streams, publisher, SETTINGS), publisher, streams  # type: ignore[arg-type]


def callbacks(store: FakeStore) -> tuple[ClaimCallbacks, FakePublisher]:
    publisher = FakePublisher()
    return ClaimCallbacks(store, publisher, SETTINGS), publisher  # type: ignore[arg-type]


async def test_a_claim_hands_out_the_view_with_the_token_whose_hash_was_stored() -> None:
    store = FakeStore(claimed(entry_id="1-0"))
    use_case, publisher, streams = claims(store)
    outcome = await use_case.claim("r1", "wk_1", "1-0", owner="user:a")
    assert isinstance(outcome, WakeNotification)
    name, args = store.calls[0]
    assert name == "claim"
    assert args[:4] == ("r1", "wk_1", "1-0", "user:a")
    assert args[4] == hash_token(outcome.claim_token)
    assert [m.offset for m in outcome.messages] == [5, 6]
    assert outcome.more_messages
    assert outcome.callbacks.done == "http://pw.test/v1/claims/wk_1/done"
    assert outcome.callbacks.events == "http://pw.test/v1/entities/t/e/events"
    assert streams.acked == [("r1", ["1-0"])]
    assert publisher.published == []


@pytest.mark.parametrize(
    ("answer", "expected"),
    [
        (step(code="NO_WORK", detail="no pending work"), NoWork("no pending work")),
        (step(code="NOT_RUNNABLE", status="paused"), ClaimDone(True, "paused")),
    ],
)
async def test_claim_answers_without_a_claim_still_ack_the_entry(answer: Step, expected: Any):
    use_case, _, streams = claims(FakeStore(dataclasses.replace(answer, entry_id="7-0")))
    assert await use_case.claim("r1", "wk_1", None) == expected
    assert streams.acked == [("r1", ["7-0"])]


async def test_a_claim_that_expired_a_dead_holder_publishes_the_new_wake() -> None:
    answer = with_wake(step(code="NO_WORK", detail="wake is no longer outstanding"))
    use_case, publisher, _ = claims(FakeStore(answer))
    assert isinstance(await use_case.claim("r1", "wk_1", None), NoWork)
    assert [w.id for w in publisher.published] == ["wk_2"]


async def test_already_claimed_names_the_claim_and_acks() -> None:
    answer = step(code="ALREADY_CLAIMED", claim_id="wk_0", detail="busy", entry_id="2-0")
    use_case, _, streams = claims(FakeStore(answer))
    with pytest.raises(AlreadyClaimed) as caught:
        await use_case.claim("r1", "wk_1", "2-0")
    assert caught.value.extra["claim_id"] == "wk_0"
    assert streams.acked == [("r1", ["2-0"])]


async def test_a_passed_lease_hands_the_work_on_before_the_holder_hears_of_it() -> None:
    answer = with_wake(step(code="EXPIRED_NOW", detail="claim wk_1 lease expired"))
    use_case, publisher = callbacks(FakeStore(answer))
    with pytest.raises(LeaseExpired, match="lease expired"):
        await use_case.heartbeat("wk_1", "pwc_x", 3)
    assert [w.id for w in publisher.published] == ["wk_2"]


async def test_invalid_offset_carries_the_offsets() -> None:
    answer = step(code="INVALID_OFFSET", detail="past the tail", acked_offset=2, tail_offset=5)
    use_case, _ = callbacks(FakeStore(answer))
    with pytest.raises(InvalidOffset) as caught:
        await use_case.done("wk_1", "pwc_x", 3, 9)
    assert caught.value.extra == {"acked_offset": 2, "tail_offset": 5}


async def test_a_stale_holder_is_fenced_and_nothing_is_published() -> None:
    use_case, publisher = callbacks(FakeStore(step(code="FENCED", detail="epoch 2 is stale")))
    with pytest.raises(Fenced, match="stale"):
        await use_case.release("wk_1", "pwc_x", 2, None)
    assert publisher.published == []


async def test_a_chaining_done_returns_the_next_claim_with_a_fresh_token() -> None:
    store = FakeStore(claimed(claim_id="wk_9", epoch=4, next_wake=True))
    use_case, publisher = callbacks(store)
    answer = await use_case.done("wk_1", "pwc_old", 3, 4, claim_next=True)
    assert answer.next_wake
    assert answer.next_claim is not None
    _, args = store.calls[0]
    assert args[1] == hash_token("pwc_old")
    assert args[4] == hash_token(answer.next_claim.claim_token) != args[1]
    assert (answer.next_claim.claim_id, answer.next_claim.epoch) == ("wk_9", 4)
    assert publisher.published == [], "a chained wake is never published"


async def test_a_done_without_chaining_asks_for_no_next_token() -> None:
    store = FakeStore(with_wake(step(next_wake=True)))
    use_case, publisher = callbacks(store)
    answer = await use_case.done("wk_1", "pwc_old", 3, 4)
    assert answer.next_wake
    assert answer.next_claim is None
    assert store.calls[0][1][4] is None
    assert [w.id for w in publisher.published] == ["wk_2"]
