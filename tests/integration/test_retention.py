"""Retention on real Postgres and Redis: what a prune removes, what it never touches, and that
pruning while sends, claims and dones run loses nothing.

Setup and the dispatch view go through the live API; cycles run through the same use cases in
process (as the API would call them), so hundreds of cycles take seconds. Rows are aged by
back-dating their timestamps in Postgres.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import asyncpg
import pytest

from pullwake.config import Settings
from pullwake.core.retention import TABLES, Retention
from pullwake.errors import AlreadyClaimed
from pullwake.metrics import REGISTRY
from pullwake.model import Principal
from pullwake.services import Services, open_services
from pullwake.tasks import prune_retention, worker_settings
from pullwake.wire import WakeNotification

from .helpers import ALICE, create_entity, get_entity, register_runner

OWNER = Principal.parse(ALICE)
AGE = "interval '8 days'"  # older than the default 7-day window


@pytest.fixture
def server_settings(settings: Settings) -> Settings:
    return settings.with_(retention_batch=7)


@pytest.fixture
async def svc(server_settings: Settings) -> AsyncIterator[Services]:
    async with open_services(server_settings, pool_max=6) as services:
        yield services


@dataclass
class Driver:
    """Sends, claims and dones through the use cases; remembers what each done acked."""

    svc: Services
    acked: dict[str, list[int]] = field(default_factory=dict)

    async def send(self, url: str, n: int = 1, key: str | None = None) -> None:
        for i in range(n):
            await self.svc.dispatcher.send(OWNER, url, {"i": i}, key)

    async def claim(self, runner_id: str, url: str) -> WakeNotification | None:
        wake_id = (await self.svc.dispatcher.get_entity(url, None)).dispatch.outstanding_wake_id
        if wake_id is None:
            return None
        try:
            outcome = await self.svc.claims.claim(runner_id, wake_id, None)
        except AlreadyClaimed:
            return None
        return outcome if isinstance(outcome, WakeNotification) else None

    async def finish(self, note: WakeNotification, url: str) -> None:
        offsets = [m.offset for m in note.messages]
        assert offsets == list(range(note.acked_offset + 1, note.acked_offset + 1 + len(offsets)))
        await self.svc.callbacks.append_event(note.claim_token, url, {"seen": offsets}, note.epoch)
        acked = offsets[-1] if offsets else note.acked_offset
        await self.svc.callbacks.done(note.claim_id, note.claim_token, note.epoch, acked)
        self.acked.setdefault(url, []).extend(offsets)

    async def cycles(self, runner_id: str, url: str, n: int, per_cycle: int = 2) -> None:
        for _ in range(n):
            await self.send(url, per_cycle)
            note = await self.claim(runner_id, url)
            assert note is not None
            await self.finish(note, url)


async def counts(db: asyncpg.Connection) -> dict[str, int]:
    return {t: await db.fetchval(f"SELECT count(*) FROM {t}") for t in TABLES}


async def age_everything(db: asyncpg.Connection, urls: list[str]) -> None:
    """Back-date every row of these entities, finished or not: only status may protect them."""
    for table, column in (
        ("wakes", "created_at"),
        ("wakes", "resolved_at"),
        ("claims", "claimed_at"),
        ("inbox_messages", "created_at"),
        ("entity_events", "created_at"),
    ):
        await db.execute(
            f"UPDATE {table} SET {column} = {column} - {AGE} WHERE entity_url = ANY($1)", urls
        )


async def dispatch_views(api: Any, headers: dict[str, str], entities: list[Any]) -> list[Any]:
    return [(await get_entity(api.http, headers, e))["dispatch"] for e in entities]


def pruned_metric(table: str) -> float:
    return REGISTRY.get_sample_value("pullwake_pruned_rows_total", {"table": table}) or 0.0


async def test_one_prune_keeps_only_the_window_and_unfinished_work(
    api: Any, svc: Services, db: asyncpg.Connection
) -> None:
    headers = await api.as_(ALICE)
    runner_id = await register_runner(api.http, headers)
    old, busy, fresh = [await create_entity(api.http, headers, runner_id) for _ in range(3)]
    drive = Driver(svc)
    await drive.cycles(runner_id, old.url, 20)
    await drive.send(old.url, 1, key="kept-key")  # unacked, with an outstanding wake
    await drive.cycles(runner_id, busy.url, 3)
    await drive.send(busy.url, 2)
    active = await drive.claim(runner_id, busy.url)  # an active claim over 2 unacked messages
    assert active is not None
    await age_everything(db, [old.url, busy.url])
    await drive.cycles(runner_id, fresh.url, 2)  # inside the window
    views = await dispatch_views(api, headers, [old, busy, fresh])
    old_wake = await db.fetchval(
        "SELECT id FROM wakes WHERE entity_url = $1 AND epoch = 1", old.url
    )
    before = await counts(db)
    metric_before = {t: pruned_metric(t) for t in TABLES}

    dry = await svc.retention.prune(dry_run=True)
    assert await counts(db) == before
    progress: list[tuple[str, int]] = []
    report = await svc.retention.prune(progress=lambda t, n: progress.append((t, n)))

    assert report.rows == dry.rows
    assert {t: before[t] - n for t, n in (await counts(db)).items()} == report.rows
    assert {t: pruned_metric(t) - metric_before[t] for t in TABLES} == report.rows
    assert ("wakes", 7) in progress
    assert ("inbox_messages", 7) in progress
    assert await dispatch_views(api, headers, [old, busy, fresh]) == views
    # what is left: old's outstanding wake and unacked message; busy's active claim and its
    # wake, its two unacked messages; everything of fresh; no aged event.
    state = {r["entity_url"]: r for r in await db.fetch("SELECT * FROM dispatch_state")}
    wakes = {r["id"] for r in await db.fetch("SELECT id FROM wakes")}
    assert wakes == {state[old.url]["outstanding_wake_id"], active.claim_id} | {
        r["id"] for r in await db.fetch("SELECT id FROM wakes WHERE entity_url = $1", fresh.url)
    }
    claims = await db.fetch("SELECT id, entity_url, status FROM claims ORDER BY claimed_at")
    assert [(c["entity_url"], c["status"]) for c in claims] == [
        (busy.url, "active"),
        (fresh.url, "released"),
        (fresh.url, "released"),
    ]
    inbox = await db.fetch('SELECT entity_url, "offset" FROM inbox_messages')
    assert sorted((r["entity_url"], r["offset"]) for r in inbox) == sorted(
        [(old.url, 41), (busy.url, 7), (busy.url, 8)] + [(fresh.url, o) for o in (1, 2, 3, 4)]
    )
    assert {r["entity_url"] for r in await db.fetch("SELECT entity_url FROM entity_events")} == {
        fresh.url
    }
    assert (await api.http.get(f"/v1/wakes/{old_wake}", headers=headers)).status_code == 404
    assert (await svc.retention.prune()).total == 0

    # The kept work goes on as if nothing happened.
    await drive.finish(active, busy.url)
    note = await drive.claim(runner_id, old.url)
    assert note is not None
    assert [m.offset for m in note.messages] == [41]
    await drive.finish(note, old.url)
    for entity in (old, busy):
        dispatch = (await get_entity(api.http, headers, entity))["dispatch"]
        assert dispatch["acked_offset"] == dispatch["tail_offset"]
    assert drive.acked[old.url] == list(range(1, 42))
    assert drive.acked[busy.url] == list(range(1, 9))


async def test_an_old_idempotency_key_appends_again_once_its_message_is_pruned(
    api: Any, svc: Services, db: asyncpg.Connection
) -> None:
    headers = await api.as_(ALICE)
    runner_id = await register_runner(api.http, headers)
    entity = await create_entity(api.http, headers, runner_id)
    first = await svc.dispatcher.send(OWNER, entity.url, {"n": 1}, "order-1")
    assert (await svc.dispatcher.send(OWNER, entity.url, {"n": 1}, "order-1")).duplicate
    note = await Driver(svc).claim(runner_id, entity.url)
    assert note is not None
    await Driver(svc).finish(note, entity.url)
    await age_everything(db, [entity.url])
    assert (await svc.retention.prune()).rows["inbox_messages"] == 1

    again = await svc.dispatcher.send(OWNER, entity.url, {"n": 1}, "order-1")
    assert not again.duplicate
    assert again.offset == first.offset + 1  # documented: dedup lasts as long as the row


async def test_dry_run_deletes_nothing_and_retention_zero_prunes_nothing(
    api: Any, svc: Services, db: asyncpg.Connection
) -> None:
    headers = await api.as_(ALICE)
    runner_id = await register_runner(api.http, headers)
    entity = await create_entity(api.http, headers, runner_id)
    await Driver(svc).cycles(runner_id, entity.url, 5)
    await age_everything(db, [entity.url])
    before = await counts(db)

    dry = await svc.retention.prune(dry_run=True)
    assert dry.dry_run
    assert dry.rows == {
        "wakes": 4,  # the latest wake stays
        "claims": 4,
        "inbox_messages": 10,
        "entity_events": 5,
    }
    off = Retention(svc.store, svc.settings.with_(retention_ms=0))
    assert not off.enabled
    assert (await off.prune()).total == 0
    assert (await off.prune(dry_run=True)).total == 0
    assert await counts(db) == before
    assert await prune_retention(svc) == dry.rows  # the worker's periodic job
    assert (await counts(db))["wakes"] == 1


async def test_a_parked_entitys_dead_letter_is_kept(
    api: Any, svc: Services, db: asyncpg.Connection
) -> None:
    headers = await api.as_(ALICE)
    policy = {"targets": [{"type": "webhook", "url": "https://hooks.example.com/in"}]}
    entity = await create_entity(api.http, headers, dispatch_policy=policy)
    sent = await svc.dispatcher.send(OWNER, entity.url, {"n": 1}, None)
    assert sent.wake.id is not None
    assert isinstance(await svc.webhook_claims.claim(sent.wake.id, 30_000), WakeNotification)
    await svc.webhook_claims.fail(sent.wake.id, "HTTP 500", attempts=8)
    await age_everything(db, [entity.url])
    dead = await db.fetchval("SELECT count(*) FROM wakes WHERE delivery_status = 'failed'")

    assert (await svc.retention.prune()).rows["wakes"] == 0
    assert dead == 1
    assert await svc.store.fetchval("metrics_dead_letters") == 1
    view = (await get_entity(api.http, headers, entity))["dispatch"]
    assert view["parked_reason"].startswith("webhook delivery failed")
    wake = await api.http.get(f"/v1/wakes/{sent.wake.id}", headers=headers)
    assert wake.json()["delivery_status"] == "failed"


async def test_tables_take_turns_and_a_time_budget_ends_the_pass_early(
    api: Any, svc: Services, db: asyncpg.Connection
) -> None:
    headers = await api.as_(ALICE)
    runner_id = await register_runner(api.http, headers)
    entity = await create_entity(api.http, headers, runner_id)
    await Driver(svc).cycles(runner_id, entity.url, 10)  # batches of 7: 9 wakes, 20 messages
    await age_everything(db, [entity.url])

    first = await svc.retention.prune(budget_s=0)  # one batch of each table, then stop
    assert not first.complete
    assert first.rows == {"wakes": 7, "claims": 7, "inbox_messages": 7, "entity_events": 7}
    rest = await svc.retention.prune(budget_s=60)
    assert rest.complete
    assert rest.rows == {"wakes": 2, "claims": 2, "inbox_messages": 13, "entity_events": 3}


async def test_prune_never_waits_for_the_locks_of_the_hot_path(
    api: Any, svc: Services, db: asyncpg.Connection, database_url: str
) -> None:
    headers = await api.as_(ALICE)
    runner_id = await register_runner(api.http, headers)
    entity = await create_entity(api.http, headers, runner_id)
    await Driver(svc).cycles(runner_id, entity.url, 3)
    await age_everything(db, [entity.url])
    sender = await asyncpg.connect(database_url)
    try:
        async with sender.transaction():
            # What a send, claim or done holds for its whole transaction.
            await sender.execute(
                "SELECT 1 FROM entities e JOIN dispatch_state d ON d.entity_url = e.url "
                "WHERE e.url = $1 FOR UPDATE OF e, d",
                entity.url,
            )
            report = await asyncio.wait_for(svc.retention.prune(), timeout=5)
    finally:
        await sender.close()
    assert report.rows == {"wakes": 2, "claims": 2, "inbox_messages": 6, "entity_events": 3}


def test_the_worker_runs_prune_retention_at_its_interval(settings: Settings) -> None:
    jobs = worker_settings(settings.with_(retention_interval_ms=120_000)).ctx["pullwake_jobs"]
    (job,) = [j for j in jobs if j.name == "prune_retention"]
    assert job.run is prune_retention
    assert job.interval_ms == 120_000
    assert job.needs_redis is False  # Postgres only: it goes on while Redis is down


# --- concurrency ------------------------------------------------------------------------------

ENTITIES = 4
SENDS = 60


async def invariants_hold(db: asyncpg.Connection) -> None:
    """Every outstanding wake and active claim the dispatch rows name still exists, live."""
    broken = await db.fetchval(
        """SELECT count(*) FROM dispatch_state d
           WHERE d.acked_offset > d.tail_offset
              OR (d.outstanding_wake_id IS NOT NULL AND NOT EXISTS (
                    SELECT 1 FROM wakes w WHERE w.id = d.outstanding_wake_id
                    AND w.claim_status = 'unclaimed'))
              OR (d.active_claim_id IS NOT NULL AND NOT EXISTS (
                    SELECT 1 FROM claims c WHERE c.id = d.active_claim_id
                    AND c.status = 'active'))
              OR d.tail_offset > d.acked_offset AND NOT EXISTS (
                    SELECT 1 FROM inbox_messages m WHERE m.entity_url = d.entity_url
                    AND m."offset" = d.acked_offset + 1)"""
    )
    assert broken == 0
    assert (
        await db.fetchval(
            """SELECT count(*) FROM (SELECT entity_url FROM wakes
           WHERE claim_status = 'unclaimed' AND delivery_status IN ('queued', 'delivered')
           GROUP BY entity_url HAVING count(*) > 1) x"""
        )
        == 0
    )


async def test_pruning_concurrent_with_sends_and_claims_loses_nothing(
    api: Any, server_settings: Settings, db: asyncpg.Connection
) -> None:
    headers = await api.as_(ALICE)
    runner_id = await register_runner(api.http, headers)
    entities = [await create_entity(api.http, headers, runner_id) for _ in range(ENTITIES)]
    tiny = server_settings.with_(retention_ms=1, retention_batch=5)
    async with open_services(tiny, pool_max=8) as svc:
        drive = Driver(svc)
        sending = [asyncio.create_task(drive.send(e.url, SENDS)) for e in entities]

        async def work(url: str) -> None:
            while not all(t.done() for t in sending) or await pending(url):
                note = await drive.claim(runner_id, url)
                if note is None:
                    await asyncio.sleep(0.002)
                else:
                    await drive.finish(note, url)

        async def pending(url: str) -> bool:
            view = (await svc.dispatcher.get_entity(url, None)).dispatch
            return view.acked_offset < view.tail_offset

        working = asyncio.gather(*(work(e.url) for e in entities))

        async def prune_until_done() -> int:
            pruned = 0
            while not working.done():
                pruned += (await svc.retention.prune()).total
                await asyncio.sleep(0.001)
            return pruned

        async def check_until_done() -> None:
            while not working.done():
                await invariants_hold(db)
                await asyncio.sleep(0.005)

        # Two pruners at once (two workers), racing each other and the hot path.
        pruned = await asyncio.gather(prune_until_done(), prune_until_done(), check_until_done())
        await working
        await asyncio.gather(*sending)
        await svc.retention.prune()  # whatever the last dones left behind

    assert pruned[0] > 0
    assert pruned[1] > 0
    for entity in entities:
        assert drive.acked[entity.url] == list(range(1, SENDS + 1))  # each once, in order
        dispatch = (await get_entity(api.http, headers, entity))["dispatch"]
        assert dispatch["acked_offset"] == dispatch["tail_offset"] == SENDS
        assert dispatch["active_claim"] is None
    await invariants_hold(db)
    left = await counts(db)
    assert left["inbox_messages"] == 0
    assert left["entity_events"] == 0
    assert left["wakes"] == ENTITIES  # each entity's latest wake
