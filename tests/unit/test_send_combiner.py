"""The send combiner over fake calls: when it combines, in what order, and what each sender hears
when a combined call fails."""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import Sequence

import asyncpg
import pytest

from pullwake.errors import Unavailable
from pullwake.store.combine import SendCombiner, SendItem
from pullwake.store.steps import Step


def item(n: int, url: str = "/t/a") -> SendItem:
    return SendItem(url, f'{{"n": {n}}}', 8, None, "user:a", True)


EMPTY = Step(*[None] * len(dataclasses.fields(Step)))


def answer(it: SendItem) -> Step:
    n = int(it.payload.split(": ")[1].rstrip("}"))
    return dataclasses.replace(EMPTY, msg_offset=n, wake_status="coalesced")


class FakeDb:
    """Records each call; a call waits for ``gate`` when one is set."""

    def __init__(self) -> None:
        self.calls: list[list[int]] = []
        self.gate: asyncio.Event | None = None
        self.fail_many: BaseException | None = None
        self.bad: set[int] = set()

    def number(self, it: SendItem) -> int:
        return int(it.payload.split(": ")[1].rstrip("}"))

    async def one(self, it: SendItem) -> Step:
        self.calls.append([self.number(it)])
        if self.gate is not None:
            await self.gate.wait()
        if self.number(it) in self.bad:
            raise asyncpg.DataError(f"bad item {self.number(it)}")
        return answer(it)

    async def many(self, items: Sequence[SendItem]) -> list[Step]:
        self.calls.append([self.number(i) for i in items])
        if self.gate is not None:
            await self.gate.wait()
        if self.fail_many is not None:
            raise self.fail_many
        if any(self.number(i) in self.bad for i in items):
            raise asyncpg.DataError("one of them is bad")
        return [answer(i) for i in items]


async def test_an_idle_combiner_sends_at_once_alone() -> None:
    db = FakeDb()
    combiner = SendCombiner(db.one, db.many)
    step = await combiner.send(item(1))
    assert step.msg_offset == 1
    assert db.calls == [[1]]
    assert combiner.calls == 1
    assert combiner.combined == 0


async def test_sends_arriving_while_calls_are_in_flight_share_the_next_call_in_order() -> None:
    db = FakeDb()
    db.gate = asyncio.Event()
    combiner = SendCombiner(db.one, db.many, flushers=2)
    tasks = [asyncio.create_task(combiner.send(item(n))) for n in range(1, 9)]
    await asyncio.sleep(0)
    # two calls in flight (items 1 and 2); the other six wait
    assert db.calls == [[1], [2]]
    db.gate.set()
    steps = await asyncio.gather(*tasks)
    assert [s.msg_offset for s in steps] == list(range(1, 9))
    assert db.calls == [[1], [2], [3, 4, 5, 6, 7, 8]]
    assert combiner.combined == 6


async def test_max_batch_bounds_a_combined_call() -> None:
    db = FakeDb()
    db.gate = asyncio.Event()
    combiner = SendCombiner(db.one, db.many, flushers=1, max_batch=3)
    tasks = [asyncio.create_task(combiner.send(item(n))) for n in range(1, 9)]
    await asyncio.sleep(0)
    db.gate.set()
    await asyncio.gather(*tasks)
    assert db.calls == [[1], [2, 3, 4], [5, 6, 7], [8]]


async def test_a_statement_error_is_retried_item_by_item_and_hits_only_its_sender() -> None:
    db = FakeDb()
    db.gate = asyncio.Event()
    db.bad = {5}
    combiner = SendCombiner(db.one, db.many, flushers=1)
    tasks = [asyncio.create_task(combiner.send(item(n))) for n in range(1, 7)]
    await asyncio.sleep(0)
    db.gate.set()
    results = await asyncio.gather(*tasks, return_exceptions=True)
    assert [getattr(r, "msg_offset", None) for r in results] == [1, 2, 3, 4, None, 6]
    assert isinstance(results[4], asyncpg.DataError)
    assert db.calls == [[1], [2, 3, 4, 5, 6], [2], [3], [4], [5], [6]]


async def test_an_outage_fails_every_sender_of_the_call() -> None:
    db = FakeDb()
    db.gate = asyncio.Event()
    db.fail_many = Unavailable("Postgres unavailable: ConnectionResetError")
    combiner = SendCombiner(db.one, db.many, flushers=1)
    tasks = [asyncio.create_task(combiner.send(item(n))) for n in range(1, 5)]
    await asyncio.sleep(0)
    db.gate.set()
    results = await asyncio.gather(*tasks, return_exceptions=True)
    assert getattr(results[0], "msg_offset", None) == 1
    assert all(isinstance(r, Unavailable) for r in results[1:])
    # the combiner is not stuck: the next send goes through
    db.fail_many = None
    assert (await combiner.send(item(9))).msg_offset == 9


async def test_a_sender_that_gave_up_before_its_call_is_left_out() -> None:
    db = FakeDb()
    db.gate = asyncio.Event()
    combiner = SendCombiner(db.one, db.many, flushers=1)
    first = asyncio.create_task(combiner.send(item(1)))
    waiting = [asyncio.create_task(combiner.send(item(n))) for n in (2, 3, 4)]
    await asyncio.sleep(0)
    waiting[1].cancel()
    await asyncio.sleep(0)
    db.gate.set()
    await first
    assert [(await t).msg_offset for t in (waiting[0], waiting[2])] == [2, 4]
    assert db.calls == [[1], [2, 4]]


def test_settings_are_checked() -> None:
    db = FakeDb()
    with pytest.raises(ValueError, match="at least 1"):
        SendCombiner(db.one, db.many, flushers=0)
