"""The per-process wake reader over an in-memory stand-in for the wake streams (no Redis):
notifications routed to the right sessions, the poll fallback, bounded read pipelines,
keep-alives, slot refreshes, credential checks and session clean-up; the batched credential
check over a fake store."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Sequence
from typing import Any, cast

import fakeredis
import pytest

from pullwake.store.sessions import SessionAccess
from pullwake.streams import Keys, WakeStreams
from pullwake.streams.audit import Credential, check_sessions
from pullwake.streams.reader import KEEPALIVE, Closed, WakeReader, WakeSession
from pullwake.wire import WakeEntry


def _entry(n: int) -> WakeEntry:
    return WakeEntry(f"wk_{n:028x}", f"/t/e{n}", n, "message", "2026-01-01T00:00:00Z")


class FakeStreams:
    """Each runner's stream: a list of entries and the group's read position."""

    def __init__(self) -> None:
        self.keys = Keys("t")
        self.entries: dict[str, list[tuple[str, WakeEntry]]] = {}
        self.position: dict[str, int] = {}
        self.pipelines: list[list[tuple[str, str, int]]] = []
        self.gate: asyncio.Event | None = None
        self.in_flight = 0
        self.most_in_flight = 0
        self.fail: Exception | None = None
        self.consumers: dict[str, str] = {}  # entry id -> the consumer that read it

    def add(self, runner_id: str, count: int = 1) -> list[str]:
        stream = self.entries.setdefault(runner_id, [])
        ids = []
        for _ in range(count):
            n = sum(len(s) for s in self.entries.values()) + 1
            entry_id = f"{n}-0"
            stream.append((entry_id, _entry(n)))
            ids.append(entry_id)
        return ids

    async def read_new_many(
        self, reads: list[tuple[str, str, int]]
    ) -> list[list[tuple[str, WakeEntry]] | Exception]:
        self.pipelines.append(list(reads))
        self.in_flight += 1
        self.most_in_flight = max(self.most_in_flight, self.in_flight)
        try:
            if self.gate is not None:
                await self.gate.wait()
            else:
                await asyncio.sleep(0)
            if self.fail is not None:
                raise self.fail
            out: list[list[tuple[str, WakeEntry]] | Exception] = []
            for runner_id, consumer, count in reads:
                at = self.position.get(runner_id, 0)
                taken = self.entries.get(runner_id, [])[at : at + count]
                self.position[runner_id] = at + len(taken)
                for entry_id, _ in taken:
                    self.consumers[entry_id] = consumer
                out.append(list(taken))
            return out
        finally:
            self.in_flight -= 1

    @property
    def reads(self) -> list[tuple[str, str, int]]:
        return [read for pipeline in self.pipelines for read in pipeline]


@pytest.fixture
def streams() -> FakeStreams:
    return FakeStreams()


@contextlib.asynccontextmanager
async def running(streams: FakeStreams, **options: Any) -> AsyncIterator[WakeReader]:
    options.setdefault("poll_interval_s", 60.0)
    options.setdefault("keepalive_s", 60.0)
    reader = WakeReader(cast(WakeStreams, streams), options.pop("subscriber", None), **options)
    try:
        yield reader
    finally:
        await reader.close()


async def next_item(session: WakeSession, timeout: float = 2.0) -> Any:
    return await asyncio.wait_for(session.next(), timeout)


async def waiting(session: WakeSession) -> asyncio.Task[Any]:
    """A task waiting on the session's next item, once the session waits."""
    task = asyncio.ensure_future(session.next())
    for _ in range(100):
        await asyncio.sleep(0)
        if session.waiting:
            return task
    raise AssertionError("the session never waited")


async def closed(session: WakeSession, first: asyncio.Future[Any], timeout: float) -> Any:
    """The first item that is not a keep-alive."""
    async with asyncio.timeout(timeout):
        item = await first
        while item is KEEPALIVE:
            item = await session.next()
        return item


async def settle(streams: FakeStreams) -> None:
    for _ in range(20):
        await asyncio.sleep(0)


async def test_a_notification_reaches_the_sessions_of_its_runner_only(
    streams: FakeStreams,
) -> None:
    async with running(streams) as reader:
        one = reader.open("r1", "s1")
        two = reader.open("r2", "s2")
        first, second = await waiting(one), await waiting(two)
        await settle(streams)  # each session's first read finds nothing
        streams.pipelines.clear()

        (entry_id,) = streams.add("r1")
        reader.notify("r1")
        entries = await asyncio.wait_for(first, 2)

        assert [e for e, _ in entries] == [entry_id]
        assert streams.reads == [("r1", "s1", 100)]  # one page for a runner's only session
        assert not second.done()
        reader.notify("nobody-here")  # a runner without sessions here: nothing read
        await settle(streams)
        assert len(streams.pipelines) == 1
        second.cancel()


async def test_a_new_session_reads_what_came_before_it(streams: FakeStreams) -> None:
    streams.add("r1", 3)
    async with running(streams) as reader:
        session = reader.open("r1", "s1")
        entries = await next_item(session)
        assert len(entries) == 3


async def test_entries_go_round_the_waiting_sessions_of_a_runner(streams: FakeStreams) -> None:
    async with running(streams) as reader:
        sessions = [reader.open("r1", f"s{n}") for n in range(3)]
        tasks = [await waiting(s) for s in sessions]
        await settle(streams)
        streams.add("r1", 3)
        reader.notify("r1")
        got = await asyncio.wait_for(asyncio.gather(*tasks), 2)
        assert [len(entries) for entries in got] == [1, 1, 1]
        assert sorted(streams.consumers.values()) == ["s0", "s1", "s2"]

        # a burst larger than the sessions: each reads one, then another once it waits again
        streams.add("r1", 7)
        reader.notify("r1")
        seen = 0
        while seen < 7:
            for session in sessions:
                with contextlib.suppress(TimeoutError):
                    seen += len(await next_item(session, 0.05))
        assert seen == 7


async def test_a_busy_session_leaves_new_entries_to_the_others(streams: FakeStreams) -> None:
    async with running(streams) as reader:
        busy, idle = reader.open("r1", "busy"), reader.open("r1", "idle")
        busy_task = await waiting(busy)
        idle_task = await waiting(idle)
        await settle(streams)
        streams.add("r1")
        reader.notify("r1")
        done, _ = await asyncio.wait({busy_task, idle_task}, return_when=asyncio.FIRST_COMPLETED)
        first = done.pop()
        other = idle_task if first is busy_task else busy_task
        # the first one does not ask again (it is "sending"); the next entry goes to the other
        streams.add("r1")
        reader.notify("r1")
        assert len(await asyncio.wait_for(other, 2)) == 1
        assert len(set(streams.consumers.values())) == 2


async def test_the_poll_delivers_without_a_notification(streams: FakeStreams) -> None:
    async with running(streams, poll_interval_s=0.2) as reader:
        session = reader.open("r1", "s1")
        task = await waiting(session)
        await settle(streams)
        streams.add("r1")  # and no notify: a lost notification
        entries = await asyncio.wait_for(task, 2)
        assert len(entries) == 1
        assert reader.stats.polled >= 1


async def test_the_poll_visits_a_slice_of_runners_per_tick(streams: FakeStreams) -> None:
    async with running(streams, poll_interval_s=0.5) as reader:
        sessions = [reader.open(f"r{n}", f"s{n}") for n in range(40)]
        tasks = [await waiting(s) for s in sessions]
        await settle(streams)
        streams.pipelines.clear()
        await asyncio.sleep(0.08)  # about one tick (a tenth of the interval)
        first_tick = len(streams.reads)
        assert 1 <= first_tick <= 8, first_tick
        await asyncio.sleep(0.6)  # a whole interval: every runner read at least once
        assert {r for r, _, _ in streams.reads} == {f"r{n}" for n in range(40)}
        for task in tasks:
            task.cancel()


async def test_read_pipelines_are_bounded(streams: FakeStreams) -> None:
    streams.gate = asyncio.Event()
    async with running(streams, batch=10, concurrency=2) as reader:
        sessions = [reader.open(f"r{n}", f"s{n}") for n in range(100)]
        tasks = [asyncio.ensure_future(s.next()) for s in sessions]
        await settle(streams)
        for n in range(100):
            streams.add(f"r{n}")
            reader.notify(f"r{n}")
        await settle(streams)
        assert streams.in_flight == 2  # the rest wait for a pipeline to finish
        streams.gate.set()
        got = await asyncio.wait_for(asyncio.gather(*tasks), 5)
        assert all(len(entries) == 1 for entries in got)
        assert streams.most_in_flight <= 2 + 1  # notified reads, plus the poll's one
        assert max(len(p) for p in streams.pipelines) <= 10


async def test_a_failed_read_is_retried_by_the_poll(streams: FakeStreams) -> None:
    async with running(streams, poll_interval_s=0.3) as reader:
        session = reader.open("r1", "s1")
        task = await waiting(session)
        await settle(streams)
        streams.fail = ConnectionError("Redis went away")
        streams.add("r1")
        reader.notify("r1")
        await settle(streams)
        assert reader.stats.errors >= 1
        assert not task.done()  # the session stays open
        streams.fail = None
        assert len(await asyncio.wait_for(task, 2)) == 1


async def test_removed_sessions_are_forgotten(streams: FakeStreams) -> None:
    async with running(streams) as reader:
        one, two = reader.open("r1", "s1"), reader.open("r1", "s2")
        assert reader.sessions == 2
        reader.remove(one)
        assert reader.sessions_of("r1") == [two]
        reader.remove(two)
        assert reader.sessions == 0
        assert reader.sessions_of("r1") == []
        streams.pipelines.clear()
        reader.notify("r1")
        await settle(streams)
        assert streams.pipelines == []


async def test_close_and_drain_end_every_session(streams: FakeStreams) -> None:
    draining = asyncio.Event()
    async with running(streams, draining=draining) as reader:
        session = reader.open("r1", "s1")
        task = await waiting(session)
        draining.set()
        assert await asyncio.wait_for(task, 2) == Closed("server shutting down")
        late = reader.open("r1", "s2")
        assert await next_item(late) == Closed("server shutting down")
    reader = WakeReader(cast(WakeStreams, streams), None, poll_interval_s=60, keepalive_s=60)
    session = reader.open("r1", "s1")
    task = await waiting(session)
    await reader.close()
    assert await asyncio.wait_for(task, 2) == Closed("server shutting down")


async def test_idle_sessions_get_keepalives_and_their_slots_refreshed(
    streams: FakeStreams,
) -> None:
    refreshed: list[WakeSession] = []

    async def refresh(sessions: Sequence[WakeSession]) -> None:
        refreshed.extend(sessions)

    async with running(streams, keepalive_s=0.3, refresh=refresh) as reader:
        session = reader.open("r1", "s1", slot="slot")
        assert await next_item(session, 1) is KEEPALIVE
        assert session in refreshed


async def test_one_check_for_every_session_closes_the_refused_ones(
    streams: FakeStreams,
) -> None:
    calls: list[list[str]] = []
    generation = [0]

    async def check(sessions: Sequence[WakeSession]) -> list[str | None]:
        calls.append([s.consumer for s in sessions])
        return ["revoked" if s.credential == "bad" else None for s in sessions]

    async with running(
        streams, keepalive_s=0.5, check=check, invalidations=lambda: generation[0]
    ) as reader:
        good = reader.open("r1", "good", credential="good")
        bad = reader.open("r2", "bad", credential="bad")
        await waiting(good)
        bad_task = await waiting(bad)
        assert await closed(bad, bad_task, 2) == Closed("revoked")
        assert calls[0] == ["good", "bad"]  # both in one call
        assert good.closed is None

        # a credential changed somewhere (the auth cache heard it): checked at once
        before = len(calls)
        late = reader.open("r3", "late", credential="bad")
        late_task = await waiting(late)
        generation[0] += 1
        assert await closed(late, late_task, 0.3) == Closed("revoked")
        assert len(calls) == before + 1


async def test_a_failing_check_keeps_the_sessions(streams: FakeStreams) -> None:
    async def check(sessions: Sequence[WakeSession]) -> list[str | None]:
        raise OSError("Postgres is down")

    async with running(streams, keepalive_s=0.2, check=check) as reader:
        session = reader.open("r1", "s1")
        await asyncio.sleep(0.5)
        assert session.closed is None
        assert reader.stats.errors >= 1


async def test_notifications_arrive_over_pub_sub() -> None:
    server = fakeredis.FakeServer()
    redis = fakeredis.FakeAsyncRedis(server=server, decode_responses=True)
    streams = WakeStreams(redis, Keys("t"))
    await streams.ensure_group("r1")
    reader = WakeReader(
        streams,
        lambda: fakeredis.FakeAsyncRedis(server=server, decode_responses=True),
        poll_interval_s=600,
        keepalive_s=600,
    )
    try:
        session = reader.open("r1", "s1")
        task = await waiting(session)
        await asyncio.wait_for(reader.subscribed.wait(), 2)
        entry_id = await streams.publish("r1", _entry(1))  # XADD + PUBLISH
        entries = await asyncio.wait_for(task, 2)
        assert [e for e, _ in entries] == [entry_id]
        assert reader.stats.notifications >= 1
        consumers = await redis.xinfo_consumers(streams.keys.runner_wakes("r1"), "pullwake")
        assert {c["name"]: c["pending"] for c in consumers} == {"s1": 1}
    finally:
        await reader.close()
        await redis.aclose()


# --- the batched credential check ---------------------------------------------------------------


class FakeAccessStore:
    def __init__(self, tokens: dict[str, str], runners: dict[str, tuple[str, str]]) -> None:
        self.access = SessionAccess(tokens, runners)
        self.calls: list[tuple[list[str], list[str]]] = []

    async def sse_access(self, token_hashes: list[str], runner_ids: list[str]) -> SessionAccess:
        self.calls.append((token_hashes, runner_ids))
        return self.access


async def test_check_sessions_looks_everything_up_once(streams: FakeStreams) -> None:
    alice, bob = "user:alice@example.com", "user:bob@example.com"
    store = FakeAccessStore(
        {"h-live": alice},
        {
            "mine": (alice, "enabled"),
            "off": (alice, "disabled"),
            "bobs": (bob, "enabled"),
        },
    )

    async def hook_ok() -> str | None:
        return None

    async def hook_refuses() -> str | None:
        return "the host says no"

    async with running(streams) as reader:
        cases = [
            ("mine", Credential(alice, token_hash="h-live"), None),
            ("mine", Credential(alice, token_hash="h-live"), None),
            ("mine", Credential(alice, token_hash="h-revoked"), "unknown or revoked"),
            ("gone", Credential(alice, token_hash="h-live"), "does not exist"),
            ("off", Credential(alice, token_hash="h-live"), "disabled"),
            ("bobs", Credential(alice, token_hash="h-live"), "another principal"),
            ("mine", Credential(bob, token_hash="h-live"), "another principal"),
            ("mine", Credential(alice), None),
            ("mine", Credential(alice, recheck=hook_ok), None),
            ("mine", Credential(alice, recheck=hook_refuses), "the host says no"),
        ]
        sessions = [
            reader.open(runner, f"s{n}", credential=credential)
            for n, (runner, credential, _) in enumerate(cases)
        ]
        reasons = await check_sessions(store, sessions)
    assert len(store.calls) == 1
    assert store.calls[0] == (["h-live", "h-revoked"], ["bobs", "gone", "mine", "off"])
    for (_, _, expected), reason in zip(cases, reasons, strict=True):
        if expected is None:
            assert reason is None
        else:
            assert reason is not None
            assert expected in reason


async def test_the_poll_keeps_to_its_budget(streams: FakeStreams) -> None:
    async with running(streams, poll_interval_s=1.0, poll_budget_per_s=20) as reader:
        sessions = [reader.open(f"r{n}", f"s{n}") for n in range(100)]
        tasks = [await waiting(s) for s in sessions]
        await settle(streams)
        streams.pipelines.clear()
        await asyncio.sleep(0.55)  # five ticks of a tenth of a second: 2 runners each
        assert 4 <= len(streams.reads) <= 12, len(streams.reads)
        for task in tasks:
            task.cancel()


def test_turns_go_round_and_drop_what_went_away() -> None:
    from pullwake.streams.reader import _Turns

    alive = {"a", "b", "c", "d"}
    turns = _Turns[str](lambda item: item in alive)
    for item in "abcd":
        turns.add(item)
    assert turns.take(3) == ["a", "b", "c"]
    alive.discard("d")
    alive.discard("a")
    assert turns.take(3) == ["b", "c"]  # d and a are gone: dropped on their turn
    turns.add("e")
    alive.add("e")
    assert turns.take(10) == ["b", "c", "e"]
    assert turns.take(0) == []
    assert len(turns._queue) == 3
