"""Recovery costs what changed, not the fleet: with registered runners that never connected,
each with a waiting wake, an idle pass sends a bounded number of Postgres statements and Redis
commands whatever the fleet's size, and logs no warning for them; a real loss (a stream
deleted, FLUSHALL, a restart, a failed publish, a session gone after reading) is still repaired
within a bounded number of passes.

Structure, not timing: statements are counted with the store's ``observer``, Redis commands
with ``INFO commandstats`` on a redis-server of the test's own.
"""

from __future__ import annotations

import logging
import math
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import asyncpg
import pytest
from redis.asyncio import Redis

from pullwake.config import Settings
from pullwake.core import recovery as recovery_module
from pullwake.core.recovery import REBUILD_RUNNERS, SWEEP_MIN_RUNNERS, Recovery, RecoveryReport
from pullwake.model import Principal
from pullwake.services import Services, open_services
from pullwake.testing import RedisServer
from pullwake.wire import BatchItem

from .helpers import redis_down

GROUP = "pullwake"
OWNER = "user:fleet@example.com"
ROOM = 5  # a count may differ by this much between fleets (a round's first slice counts it)
STATEMENTS_PER_PASS = 12
REDIS_COMMANDS_PER_PASS = 4 * SWEEP_MIN_RUNNERS + 20  # two slices of XINFO + XRANGE, a few more

pytestmark = pytest.mark.timeout(240)


@pytest.fixture
async def services(
    settings: Settings, private_redis: RedisServer, db: asyncpg.Connection
) -> AsyncIterator[Services]:
    own = settings.with_(redis_url=private_redis.url, redeliver_after_ms=300)
    async with open_services(own, pool_max=4) as services:
        yield services


@dataclass
class Fleet:
    """Registered runners that never connected, each with one entity and one waiting wake."""

    services: Services
    db: asyncpg.Connection
    redis: Redis
    size: int = 0

    @property
    def recovery(self) -> Recovery:
        return self.services.recovery

    def key(self, runner_id: str) -> str:
        return self.services.streams.keys.runner_wakes(runner_id)

    async def grow(self, to: int) -> None:
        """Add runners ``fleet-<n>`` up to ``to``, each with an entity and a published wake."""
        ids = [f"fleet-{n:05d}" for n in range(self.size, to)]
        await self.db.execute(
            "INSERT INTO runner_id_owners (id, owner_principal) SELECT unnest($1::text[]), $2 "
            "ON CONFLICT DO NOTHING",
            ids,
            OWNER,
        )
        await self.db.execute(
            "INSERT INTO runners (id, owner_principal) SELECT unnest($1::text[]), $2", ids, OWNER
        )
        await self.db.execute(
            "INSERT INTO entities (url, type, id, dispatch_policy, target_runner_id, created_by) "
            "SELECT '/fleet/' || id, 'fleet', id, jsonb_build_object('targets', "
            "jsonb_build_array(jsonb_build_object('type', 'runner', 'runner_id', id))), id, $2 "
            "FROM unnest($1::text[]) AS id",
            ids,
            OWNER,
        )
        await self.db.execute(
            "INSERT INTO dispatch_state (entity_url) SELECT '/fleet/' || unnest($1::text[])", ids
        )
        principal = Principal.parse(OWNER)
        for start in range(0, len(ids), 1_000):
            items = [BatchItem(f"/fleet/{r}", {"n": 1}) for r in ids[start : start + 1_000]]
            results = await self.services.batch.send(principal, items)
            assert not [r for r in results if r.problem], results[:3]
        await self.services.publisher.flush()
        self.size = to

    async def settle(self) -> None:
        """Passes until the start-up work is done: the first full check of the streams, and
        re-delivery's one look at each wake (found unread: parked)."""
        await self.db.execute(
            "UPDATE wakes SET delivered_at = now() - interval '1 minute' "
            "WHERE delivery_status = 'delivered' AND parked_delivery_at IS NULL"
        )
        for _ in range(200):
            report = await self.recovery.run_all()
            if self.recovery._full is None and not (report.wakes_parked or report.redelivered):
                break
        else:
            raise AssertionError("recovery did not settle within 200 passes")
        for _ in range(math.ceil(self.size / SWEEP_MIN_RUNNERS) + 1):  # a sweep round each
            await self.recovery.repair_streams()
            await self.recovery.hygiene()

    async def wake_of(self, runner_id: str) -> asyncpg.Record:
        row = await self.db.fetchrow(
            "SELECT * FROM wakes WHERE runner_id = $1 AND claim_status = 'unclaimed'", runner_id
        )
        assert row is not None
        return row

    async def stream_wake_ids(self, runner_id: str) -> list[str]:
        return [f["wake_id"] for _id, f in await self.redis.xrange(self.key(runner_id))]

    async def commands(self) -> dict[str, int]:
        """Commands the private Redis ran so far, by name (INFO itself left out)."""
        stats = await self.redis.info("commandstats")
        return {
            name.removeprefix("cmdstat_"): int(value["calls"])
            for name, value in stats.items()
            if name != "cmdstat_info"
        }

    async def count_pass(self) -> tuple[int, int, RecoveryReport]:
        """One pass of every recovery job: (Postgres statements, Redis commands, report)."""
        statements: list[str] = []
        self.services.store.observer = lambda record: statements.append(record.query)
        before = await self.commands()
        try:
            report = await self.recovery.run_all()
        finally:
            self.services.store.observer = None
        after = await self.commands()
        commands = sum(after.values()) - sum(before.values())
        return len(statements), commands, report

    async def rebuilt(self) -> bool:
        """Every runner's wake is in its stream again, and no full check is under way."""
        async with self.redis.pipeline(transaction=False) as pipe:
            for n in range(self.size):
                pipe.xlen(self.key(f"fleet-{n:05d}"))
            lengths = await pipe.execute()
        return all(lengths) and self.recovery._full is None

    async def passes_until(self, done: Any, most: int) -> int:
        """Recovery passes until ``await done()``; how many it took (at most ``most``)."""
        for n in range(1, most + 1):
            await self.recovery.run_all()
            if await done():
                return n
        raise AssertionError(f"not repaired within {most} passes")


@pytest.fixture
async def fleet(services: Services, db: asyncpg.Connection) -> AsyncIterator[Fleet]:
    redis: Redis = Redis.from_url(services.settings.redis_url or "", decode_responses=True)
    try:
        yield Fleet(services, db, redis)
    finally:
        await redis.aclose()


def warnings_of(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]


# --- an idle pass ------------------------------------------------------------------------------


async def test_an_idle_pass_costs_the_same_for_200_and_2000_offline_runners(
    fleet: Fleet, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="pullwake")
    counts = {}
    for size in (200, 2_000):
        await fleet.grow(size)
        await fleet.settle()
        counts[size] = [await fleet.count_pass() for _ in range(3)]
        for statements, commands, report in counts[size]:
            assert statements <= STATEMENTS_PER_PASS, (size, statements)
            assert commands <= REDIS_COMMANDS_PER_PASS, (size, commands)
            assert not report.any(), (size, report)
    small = max(s for s, _c, _r in counts[200]), max(c for _s, c, _r in counts[200])
    large = max(s for s, _c, _r in counts[2_000]), max(c for _s, c, _r in counts[2_000])
    assert large[0] <= small[0] + ROOM, (small, large)
    assert large[1] <= small[1] + ROOM, (small, large)
    # Never connected is a normal state: not one warning, for 2,000 of them.
    assert warnings_of(caplog) == []
    # Each of them still has its wake in a stream, with a group from id 0 (created quietly).
    wake = await fleet.wake_of("fleet-01999")
    assert await fleet.stream_wake_ids("fleet-01999") == [wake["id"]]
    groups = await fleet.redis.xinfo_groups(fleet.key("fleet-01999"))
    assert [(g["name"], g["last-delivered-id"]) for g in groups] == [(GROUP, "0-0")]
    assert wake["parked_delivery_at"] == wake["delivered_at"], "parked: not re-published"
    assert await fleet.redis.xlen(fleet.key("fleet-01999")) == 1, "no duplicate piled up"


# --- real losses, repaired within a bounded number of passes -----------------------------------


async def test_a_deleted_stream_of_an_offline_runner_is_rebuilt_within_one_sweep_round(
    fleet: Fleet, caplog: pytest.LogCaptureFixture
) -> None:
    await fleet.grow(300)
    await fleet.settle()
    victim = "fleet-00123"
    wake_id = (await fleet.wake_of(victim))["id"]
    await fleet.redis.delete(fleet.key(victim))

    async def repaired() -> bool:
        return await fleet.stream_wake_ids(victim) == [wake_id]

    round_passes = math.ceil(fleet.size / fleet.recovery._sweep.per_pass)
    took = await fleet.passes_until(repaired, most=round_passes + 1)
    assert took <= round_passes + 1
    lines = warnings_of(caplog)
    assert len(lines) == 1, lines
    assert victim in lines[0]
    assert "rebuilding from Postgres" in lines[0]
    row = await fleet.wake_of(victim)
    assert row["id"] == wake_id
    assert row["stream_entry_id"] is not None
    assert await fleet.redis.xinfo_groups(fleet.key(victim)), "the group is back"


async def test_a_connected_runner_whose_stream_vanished_is_refilled_at_the_next_pass(
    fleet: Fleet,
) -> None:
    await fleet.grow(300)
    await fleet.settle()
    runner = "fleet-00200"
    wake_id = (await fleet.wake_of(runner))["id"]
    await fleet.redis.delete(fleet.key(runner))
    # A connected session's read answers NOGROUP: it recreates the (empty) group and queues
    # the runner for the worker's check.
    streams = fleet.services.streams
    assert await streams.read(runner, "s1", own_pending=False, count=10, block_ms=None) == []

    async def refilled() -> bool:
        return await fleet.stream_wake_ids(runner) == [wake_id]

    assert await fleet.passes_until(refilled, most=1) == 1
    entries = await streams.read(runner, "s1", own_pending=False, count=10, block_ms=None)
    assert [entry.wake_id for _id, entry in entries] == [wake_id]


@pytest.mark.parametrize("loss", ["flushall", "restart"])
async def test_redis_emptied_every_stream_is_rebuilt_and_said_once(
    fleet: Fleet, private_redis: RedisServer, caplog: pytest.LogCaptureFixture, loss: str
) -> None:
    await fleet.grow(1_200)
    await fleet.settle()
    caplog.clear()
    if loss == "flushall":
        await fleet.redis.flushall()
    else:
        private_redis.stop()
        private_redis.start()  # empty, with a new run_id
        await fleet.services.redis.connection_pool.disconnect()
        await fleet.redis.connection_pool.disconnect()

    slices = math.ceil(fleet.size / REBUILD_RUNNERS)
    assert await fleet.passes_until(fleet.rebuilt, most=10 * slices) >= 1
    lines = warnings_of(caplog)
    assert any("Redis lost its data" in line for line in lines), lines
    assert any("1200 outstanding wakes re-published" in line for line in lines), lines
    assert len(lines) == 2, lines  # one when it is found, one when it is rebuilt: not 1,200
    run_id = (await fleet.redis.info("server"))["run_id"]
    assert await fleet.redis.get(fleet.services.streams.keys.recovery_marker()) == run_id


async def test_a_restart_that_kept_the_data_is_checked_quietly(
    fleet: Fleet, caplog: pytest.LogCaptureFixture
) -> None:
    """A new run_id with the data still there (persistence): every stream is checked once
    against Postgres, nothing is re-published, no warning."""
    await fleet.grow(600)
    await fleet.settle()
    caplog.clear()
    caplog.set_level(logging.INFO, logger="pullwake")
    await fleet.redis.set(fleet.services.streams.keys.recovery_marker(), "an-earlier-run-id")
    xlen_before = await fleet.redis.xlen(fleet.key("fleet-00599"))

    report = RecoveryReport()
    for _ in range(20):
        report = await fleet.recovery.repair_streams()
        assert report.redelivered == 0
        if fleet.recovery._full is None:
            break
    assert fleet.recovery._full is None
    assert warnings_of(caplog) == []
    infos = [r.getMessage() for r in caplog.records if r.levelno == logging.INFO]
    assert any("run_id changed" in line for line in infos), infos
    assert any("600 runners' wake streams: nothing was lost" in line for line in infos), infos
    assert await fleet.redis.xlen(fleet.key("fleet-00599")) == xlen_before


async def test_a_failed_publish_is_published_at_the_next_pass_next_to_the_fleet(
    fleet: Fleet, caplog: pytest.LogCaptureFixture
) -> None:
    await fleet.grow(1_000)
    await fleet.settle()
    runner = "fleet-00500"
    old = (await fleet.wake_of(runner))["id"]
    principal = Principal.parse(OWNER)
    await fleet.db.execute(  # the runner's wake was claimed and done: the entity is idle
        "UPDATE wakes SET claim_status = 'completed', resolved_at = now() WHERE id = $1", old
    )
    await fleet.db.execute(
        "UPDATE dispatch_state SET outstanding_wake_id = NULL, outstanding_wake_created_at = NULL"
        ", acked_offset = tail_offset WHERE entity_url = $1",
        f"/fleet/{runner}",
    )
    with redis_down(fleet.services):
        await fleet.services.batch.send(principal, [BatchItem(f"/fleet/{runner}", 2)])
    wake = await fleet.wake_of(runner)
    assert (wake["delivery_status"], wake["stream_entry_id"]) == ("queued", None)
    assert "publish failed" in wake["last_error"]
    await fleet.db.execute(  # the queued retry waits a second: as if it had passed
        "UPDATE wakes SET created_at = now() - interval '2 seconds' WHERE id = $1", wake["id"]
    )

    statements, _commands, report = await fleet.count_pass()

    assert report.redelivered == 1, report
    assert wake["id"] in await fleet.stream_wake_ids(runner)
    assert (await fleet.wake_of(runner))["delivery_status"] == "delivered"
    assert statements <= STATEMENTS_PER_PASS + 4  # the publish's record and its flush


async def test_a_session_that_connects_reads_and_dies_gets_its_wake_again(fleet: Fleet) -> None:
    """A parked wake (its runner was offline) is looked at again once a session connects: read
    and left unclaimed (the session died), it is published again after redeliver_after_ms."""
    await fleet.grow(300)
    await fleet.settle()
    runner = "fleet-00042"
    wake = await fleet.wake_of(runner)
    assert wake["parked_delivery_at"] == wake["delivered_at"]
    streams = fleet.services.streams
    await streams.ensure_group(runner)  # what the SSE connect does
    entries = await streams.read(runner, "doomed", own_pending=False, count=10, block_ms=None)
    assert [entry.wake_id for _id, entry in entries] == [wake["id"]]
    await fleet.recovery.repair_streams()  # the connect is seen: unparked
    assert (await fleet.wake_of(runner))["parked_delivery_at"] is None
    await fleet.db.execute(  # redeliver_after_ms later
        "UPDATE wakes SET delivered_at = now() - interval '1 second' WHERE id = $1", wake["id"]
    )

    report = await fleet.recovery.redeliver()

    assert report.redelivered == 1
    assert await fleet.stream_wake_ids(runner) == [wake["id"], wake["id"]]
    again = await streams.read(runner, "alive", own_pending=False, count=10, block_ms=None)
    assert [entry.wake_id for _id, entry in again] == [wake["id"]]


async def test_a_flush_in_the_middle_of_the_full_check_starts_it_again(
    fleet: Fleet, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    await fleet.grow(1_200)
    await fleet.settle()
    monkeypatch.setattr(recovery_module, "PASS_BUDGET_S", 0.0)  # one slice per pass
    marker = fleet.services.streams.keys.recovery_marker()
    run_id = (await fleet.redis.info("server"))["run_id"]
    await fleet.redis.flushall()
    await fleet.recovery.repair_streams()  # found; the first slice of 500 is rebuilt
    assert fleet.recovery._full is not None
    assert await fleet.redis.get(marker) == f"{run_id} checking"
    await fleet.redis.flushall()  # again, before the check is done: the marker goes too

    slices = math.ceil(fleet.size / REBUILD_RUNNERS)
    assert await fleet.passes_until(fleet.rebuilt, most=2 * slices + 2) >= slices
    lost = [line for line in warnings_of(caplog) if "Redis lost its data" in line]
    assert len(lost) == 2
    assert await fleet.redis.get(marker) == run_id
