"""Recovery use cases, in process: lease expiry, re-delivery, Redis loss, stranded entries,
stream hygiene, concurrent passes and poison work.

The API is the live server of ``tests/conftest.py``; recovery runs through its own service
graph (``open_services``), exactly as the arq worker does. Time is moved by back-dating rows in
Postgres rather than by sleeping, except where the test is about real time passing.
"""

from __future__ import annotations

import asyncio
import secrets
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import asyncpg
import httpx
import pytest
from redis.asyncio import Redis

from pullwake.config import Settings
from pullwake.core.recovery import Recovery, RecoveryReport
from pullwake.services import Services, open_services
from pullwake.tasks import worker_settings

from .helpers import ServiceWorld, holder_call

GROUP = "pullwake"
OWNER = "user:recovery@example.com"
MAX_ATTEMPTS = 3


@pytest.fixture
def server_settings(settings: Settings) -> Settings:
    return settings.with_(
        claim_lease_ms=1_500,
        redeliver_after_ms=500,
        stranded_after_ms=300,
        max_attempts=MAX_ATTEMPTS,
    )


def uid(prefix: str) -> str:
    return f"{prefix}-{secrets.token_hex(4)}"


@dataclass
class World(ServiceWorld):
    """The owner's runner, helpers over HTTP (the API) and direct Postgres/Redis access."""

    redis: Redis
    runner_id: str

    @property
    def key(self) -> str:
        return self.svc.streams.keys.runner_wakes(self.runner_id)

    def recovery(self, **changes: Any) -> Recovery:
        """A Recovery over the same graph with some thresholds changed."""
        settings = self.svc.settings.with_(**changes)
        return Recovery(self.svc.store, self.svc.streams, self.svc.publisher, settings)

    async def entity(self, messages: int = 0) -> str:
        """A new entity targeting the runner, with ``messages`` sent; returns its API path."""
        path = f"/v1/entities/rtask/{uid('e')}"
        policy = {"targets": [{"type": "runner", "runner_id": self.runner_id}]}
        r = await self.http.put(path, json={"dispatch_policy": policy}, headers=self.headers)
        assert r.status_code == 201, r.text
        for n in range(messages):
            await self.send(path, {"n": n})
        return path

    async def outstanding(self, path: str) -> str:
        wake_id = (await self.get(path))["dispatch"]["outstanding_wake_id"]
        assert wake_id is not None, await self.get(path)
        return str(wake_id)

    async def claim(self, wake_id: str, entry_id: str | None = None) -> httpx.Response:
        body = {"wake_id": wake_id} | ({"entry_id": entry_id} if entry_id else {})
        return await self.http.post(
            f"/v1/runners/{self.runner_id}/claim", json=body, headers=self.headers
        )

    async def claim_ok(self, path: str) -> dict[str, Any]:
        r = await self.claim(await self.outstanding(path))
        assert r.status_code == 200, r.text
        body: dict[str, Any] = r.json()
        return body

    async def holder_call(
        self, notification: dict[str, Any], action: str, **body: Any
    ) -> httpx.Response:
        return await holder_call(self.http, notification, action, **body)

    async def backdate_lease(self, path: str, seconds: float = 1) -> None:
        url = path.removeprefix("/v1/entities")
        age = timedelta(seconds=seconds)
        await self.db.execute(
            "UPDATE dispatch_state SET active_lease_expires_at = now() - $2::interval "
            "WHERE entity_url = $1",
            url,
            age,
        )
        await self.db.execute(
            "UPDATE claims SET lease_expires_at = now() - $2::interval "
            "WHERE entity_url = $1 AND status = 'active'",
            url,
            age,
        )

    async def stream_wake_ids(self) -> list[str]:
        return [f["wake_id"] for _id, f in await self.redis.xrange(self.key)]

    async def pending(self) -> list[dict[str, Any]]:
        """XPENDING details: every entry in the group's PEL."""
        rows: list[dict[str, Any]] = await self.redis.xpending_range(
            self.key, GROUP, min="-", max="+", count=1000
        )
        return rows

    async def consumers(self) -> dict[str, dict[str, Any]]:
        rows: list[dict[str, Any]] = await self.redis.xinfo_consumers(self.key, GROUP)
        return {str(c["name"]): c for c in rows}

    async def read_as(self, consumer: str, count: int = 100) -> list[tuple[str, dict[str, str]]]:
        """XREADGROUP ``>`` as ``consumer`` (what one SSE session does), without acking."""
        reply = await self.redis.xreadgroup(GROUP, consumer, {self.key: ">"}, count=count)
        return [(entry_id, fields) for _key, entries in reply or [] for entry_id, fields in entries]


@pytest.fixture
async def world(api: Any, services: Services, db: asyncpg.Connection, redis: Redis) -> World:
    headers = await api.as_(OWNER)
    runner_id = uid("rr")
    r = await api.http.post("/v1/runners", json={"id": runner_id}, headers=headers)
    assert r.status_code == 201, r.text
    await services.streams.ensure_group(runner_id)  # what the runner's first SSE connect does
    return World(api, services, db, headers, redis=redis, runner_id=runner_id)


# --- lease expiry ------------------------------------------------------------------------------


async def test_expired_claim_is_expired_and_pending_work_rewoken_at_epoch_plus_one(world: World):
    path = await world.entity(messages=2)
    first = await world.claim_ok(path)
    assert (await world.get(path))["status"] == "running"
    await world.backdate_lease(path)

    report = await world.svc.recovery.expire_claims()

    assert (report.expired_claims, report.rewakes) == (1, 1)
    claim = await world.db.fetchrow("SELECT * FROM claims WHERE id = $1", first["claim_id"])
    assert claim["status"] == "expired"
    assert claim["end_reason"] == "lease_expired"
    assert claim["released_at"] is not None
    entity = await world.get(path)
    assert entity["status"] == "idle"
    dispatch = entity["dispatch"]
    assert dispatch["active_claim"] is None
    assert dispatch["epoch"] == first["epoch"] + 1
    assert dispatch["acked_offset"] == 0
    new_wake = await world.wake_row(dispatch["outstanding_wake_id"])
    assert (new_wake["epoch"], new_wake["reason"]) == (first["epoch"] + 1, "lease_expired")
    assert new_wake["delivery_status"] == "delivered", "published at once, not at the next sweep"
    assert new_wake["id"] in await world.stream_wake_ids()
    old_wake = await world.wake_row(first["wake_id"])
    assert old_wake["claim_status"] == "expired"

    # The old holder is fenced from now on.
    for action, body in (("done", {"acked_offset": 2}), ("heartbeat", {}), ("release", {})):
        r = await world.holder_call(first, action, **body)
        assert r.status_code == 409, (action, r.text)
        assert r.json()["code"] in {"LEASE_EXPIRED", "FENCED"}, (action, r.text)
    r = await world.http.post(
        f"{path}/events",
        json={"payload": {"late": True}},
        headers={"Authorization": f"Bearer {first['claim_token']}"},
    )
    assert r.status_code == 409, r.text
    assert r.json()["code"] in {"LEASE_EXPIRED", "FENCED"}

    # A second pass finds nothing; the new wake is claimable and completes the work.
    again = await world.svc.recovery.expire_claims()
    assert (again.expired_claims, again.rewakes) == (0, 0)
    second = await world.claim_ok(path)
    assert second["epoch"] == first["epoch"] + 1
    assert [m["offset"] for m in second["messages"]] == [1, 2]
    r = await world.holder_call(second, "done", acked_offset=2)
    assert r.status_code == 200, r.text
    assert r.json() == {"ok": True, "next_wake": False}
    assert (await world.get(path))["status"] == "idle"


async def test_lease_expires_in_real_time_not_before(world: World):
    """The sweep leaves a live lease alone and expires it once the configured lease passed."""
    path = await world.entity(messages=1)
    notification = await world.claim_ok(path)
    lease_s = world.svc.settings.claim_lease_ms / 1000
    assert notification["lease_ms"] == world.svc.settings.claim_lease_ms

    assert (await world.svc.recovery.expire_claims()).expired_claims == 0
    await asyncio.sleep(lease_s / 2)
    assert (await world.svc.recovery.expire_claims()).expired_claims == 0
    assert (await world.get(path))["dispatch"]["active_claim"] is not None
    await asyncio.sleep(lease_s / 2 + 0.2)
    report = await world.svc.recovery.expire_claims()
    assert (report.expired_claims, report.rewakes) == (1, 1)
    r = await world.holder_call(notification, "done", acked_offset=1)
    assert r.status_code == 409
    assert r.json()["code"] == "LEASE_EXPIRED", r.text


async def test_heartbeat_keeps_a_claim_from_expiring(world: World):
    path = await world.entity(messages=1)
    notification = await world.claim_ok(path)
    lease_s = world.svc.settings.claim_lease_ms / 1000
    for _ in range(3):
        await asyncio.sleep(lease_s * 0.5)
        r = await world.holder_call(notification, "heartbeat")
        assert r.status_code == 200, r.text
        assert (await world.svc.recovery.expire_claims()).expired_claims == 0
    r = await world.holder_call(notification, "done", acked_offset=1)
    assert r.status_code == 200, r.text


async def test_expired_claim_of_a_paused_entity_makes_no_wake(world: World):
    path = await world.entity(messages=1)
    await world.claim_ok(path)
    r = await world.http.post(f"{path}/signal", json={"signal": "pause"}, headers=world.headers)
    assert r.status_code == 200, r.text
    await world.backdate_lease(path)
    report = await world.svc.recovery.expire_claims()
    assert (report.expired_claims, report.rewakes) == (1, 0)
    entity = await world.get(path)
    assert entity["status"] == "paused"
    assert entity["dispatch"]["outstanding_wake_id"] is None
    assert entity["dispatch"]["active_claim"] is None


# --- re-delivery -----------------------------------------------------------------------------


async def test_unclaimed_wake_older_than_redeliver_after_is_published_again(world: World):
    path = await world.entity(messages=1)
    wake_id = await world.outstanding(path)
    first = await world.wake_row(wake_id)
    assert first["delivery_status"] == "delivered"
    assert await world.stream_wake_ids() == [wake_id]
    await world.read_as("slow-session")  # delivered to a session that never claims it

    # Not yet due: nothing happens.
    assert (await world.svc.recovery.redeliver()).redelivered == 0
    await world.db.execute(
        "UPDATE wakes SET delivered_at = now() - interval '2 seconds' WHERE id = $1", wake_id
    )
    report = await world.svc.recovery.redeliver()

    assert report.redelivered == 1
    assert await world.stream_wake_ids() == [wake_id, wake_id]
    row = await world.wake_row(wake_id)
    assert row["delivery_status"] == "delivered"
    assert row["claim_status"] == "unclaimed"
    assert row["attempts"] == first["attempts"] + 1
    assert row["stream_entry_id"] != first["stream_entry_id"]
    # Stamped: an immediate second pass (or a concurrent worker) does not publish it again.
    assert (await world.svc.recovery.redeliver()).redelivered == 0
    # Claiming through the second entry works; the first one becomes a harmless duplicate.
    r = await world.claim(wake_id, row["stream_entry_id"])
    assert r.status_code == 200, r.text
    r = await world.claim(wake_id, first["stream_entry_id"])
    assert r.status_code in (204, 409), r.text
    assert await world.pending() == []


async def test_wake_nobody_has_read_yet_is_not_piled_up_again(world: World):
    """No session reads the stream (the runner is offline): publishing the wake again every
    redeliver_after_ms would only queue duplicates for the runner to claim when it is back."""
    path = await world.entity(messages=1)
    wake_id = await world.outstanding(path)
    await world.db.execute(
        "UPDATE wakes SET delivered_at = now() - interval '2 seconds' WHERE id = $1", wake_id
    )

    assert (await world.svc.recovery.redeliver()).redelivered == 0
    assert await world.stream_wake_ids() == [wake_id]
    # Once a session read it and let it sit, it is due again.
    await world.read_as("slow-session")
    await world.db.execute(
        "UPDATE wakes SET delivered_at = now() - interval '2 seconds' WHERE id = $1", wake_id
    )
    assert (await world.svc.recovery.redeliver()).redelivered == 1
    assert await world.stream_wake_ids() == [wake_id, wake_id]


async def test_queued_wake_whose_xadd_failed_is_published_within_a_pass(world: World):
    path = await world.entity(messages=1)
    wake_id = await world.outstanding(path)
    # Simulate "committed in Postgres, XADD failed": no entry, the row still queued.
    entry_id = (await world.wake_row(wake_id))["stream_entry_id"]
    await world.redis.xdel(world.key, entry_id)
    await world.db.execute(
        "UPDATE wakes SET delivery_status = 'queued', stream_entry_id = NULL, delivered_at = NULL,"
        " created_at = now() - interval '2 seconds', last_error = 'publish failed' WHERE id = $1",
        wake_id,
    )
    assert await world.stream_wake_ids() == []

    report = await world.svc.recovery.run_all()

    assert report.redelivered >= 1
    assert await world.stream_wake_ids() == [wake_id]
    row = await world.wake_row(wake_id)
    assert row["delivery_status"] == "delivered"
    assert row["stream_entry_id"] is not None
    assert (await world.claim(wake_id)).status_code == 200


async def test_fresh_queued_wake_is_left_to_the_publisher(world: World):
    """A wake committed a moment ago is still being published by the API: not doubled."""
    path = await world.entity(messages=1)
    wake_id = await world.outstanding(path)
    await world.db.execute(
        "UPDATE wakes SET delivery_status = 'queued', delivered_at = NULL WHERE id = $1", wake_id
    )
    assert (await world.svc.recovery.redeliver()).redelivered == 0


# --- Redis loss ------------------------------------------------------------------------------


@pytest.mark.parametrize("loss", ["del-stream", "destroy-group"])
async def test_lost_stream_or_group_is_rebuilt_with_every_outstanding_wake(world: World, loss: str):
    paths = [await world.entity(messages=1) for _ in range(4)]
    claimed = await world.claim_ok(paths[0])
    outstanding = {await world.outstanding(p) for p in paths[1:]}
    if loss == "del-stream":
        await world.redis.delete(world.key)
    else:
        await world.redis.xgroup_destroy(world.key, GROUP)
    assert not await world.svc.streams.group_exists(world.runner_id)

    report = await world.svc.recovery.repair_streams()

    assert report.streams_repaired == 1
    assert report.errors == []
    assert await world.svc.streams.group_exists(world.runner_id)
    republished = set(await world.stream_wake_ids())
    assert outstanding <= republished
    assert claimed["wake_id"] not in republished or loss == "destroy-group"
    # A runner session created after the rebuild sees every outstanding wake once it reads.
    seen = {f["wake_id"] for _id, f in await world.read_as("after-rebuild")}
    assert outstanding <= seen
    for wake_id in outstanding:
        assert (await world.claim(wake_id)).status_code == 200
    # Nothing is left to rebuild.
    assert (await world.svc.recovery.repair_streams()).streams_repaired == 0


async def test_stream_recreated_empty_by_a_reader_is_refilled_at_once(world: World):
    """After a FLUSH, a connected runner's SSE read recreates an empty group within
    sse_block_ms, before recovery looks: the lost wakes are found by their missing entries and
    re-published in the same pass, not after redeliver_after_ms."""
    paths = [await world.entity(messages=1) for _ in range(3)]
    claimed = await world.claim_ok(paths[0])
    outstanding = {await world.outstanding(p) for p in paths[1:]}
    await world.redis.delete(world.key)
    await world.svc.streams.ensure_group(world.runner_id)  # what the SSE read does on NOGROUP

    report = await world.recovery(redeliver_after_ms=60_000).repair_streams()

    assert report.redelivered == len(outstanding)
    assert set(await world.stream_wake_ids()) == outstanding
    assert claimed["wake_id"] not in await world.stream_wake_ids()
    seen = {f["wake_id"] for _id, f in await world.read_as("reconnected")}
    assert seen == outstanding
    # Nothing is missing any more: the next pass publishes nothing.
    assert (await world.recovery(redeliver_after_ms=60_000).repair_streams()).redelivered == 0


async def test_entry_trimmed_away_from_an_outstanding_wake_is_republished(world: World):
    path = await world.entity(messages=1)
    wake_id = await world.outstanding(path)
    entry_id = (await world.wake_row(wake_id))["stream_entry_id"]
    await world.redis.xdel(world.key, entry_id)  # as MAXLEN trimming or a failover would

    report = await world.svc.recovery.repair_streams()

    assert report.redelivered == 1
    assert await world.stream_wake_ids() == [wake_id]
    assert (await world.wake_row(wake_id))["stream_entry_id"] != entry_id


async def test_lost_entries_are_found_past_the_first_batch(world: World):
    """Stream repair pages through every outstanding wake, not only the oldest batch."""
    paths = [await world.entity(messages=1) for _ in range(7)]
    wake_ids = [await world.outstanding(p) for p in paths]
    newest = wake_ids[-2:]
    for wake_id in newest:  # lost from the stream: only the newest, beyond the first batch
        await world.redis.xdel(world.key, (await world.wake_row(wake_id))["stream_entry_id"])

    report = await world.recovery(recovery_batch=3).repair_streams()

    assert report.redelivered == 2
    published = await world.stream_wake_ids()
    assert sorted(published) == sorted(wake_ids)


# --- stranded entries --------------------------------------------------------------------------


async def test_entry_stranded_on_a_dead_consumer_is_reclaimed_and_republished(world: World):
    path = await world.entity(messages=1)
    wake_id = await world.outstanding(path)
    ((entry_id, fields),) = await world.read_as("dead-session")
    assert fields["wake_id"] == wake_id
    assert [p["consumer"] for p in await world.pending()] == ["dead-session"]

    # Younger than stranded_after_ms: left alone.
    report = await world.svc.recovery.repair_streams()
    assert report.stranded_reclaimed == 0
    await asyncio.sleep(world.svc.settings.stranded_after_ms / 1000 + 0.1)
    report = await world.svc.recovery.repair_streams()

    assert (report.stranded_reclaimed, report.stranded_republished) == (1, 1)
    assert await world.pending() == []
    ids = await world.stream_wake_ids()
    assert ids == [wake_id, wake_id]
    # A live session reads the republished entry and claims it.
    ((new_entry, new_fields),) = await world.read_as("live-session")
    assert new_entry != entry_id
    assert new_fields["wake_id"] == wake_id
    assert (await world.claim(wake_id, new_entry)).status_code == 200
    assert await world.pending() == []


async def test_stranded_entry_no_longer_wanted_is_only_acked(world: World):
    path = await world.entity(messages=1)
    other = await world.entity(messages=1)  # keeps the runner on the "outstanding" list
    wake_id = await world.outstanding(path)
    entries = await world.read_as("dead-session")
    assert {f["wake_id"] for _id, f in entries} == {wake_id, await world.outstanding(other)}
    # The wake gets claimed some other way (the dead session never acked its copy).
    r = await world.claim(wake_id, "1-1")
    assert r.status_code == 200, r.text
    stale = [e for e, f in entries if f["wake_id"] == wake_id]
    assert stale[0] in {p["message_id"] for p in await world.pending()}
    await asyncio.sleep(world.svc.settings.stranded_after_ms / 1000 + 0.1)

    before = await world.stream_wake_ids()
    report = await world.svc.recovery.repair_streams()

    assert report.stranded_reclaimed == 2
    assert report.stranded_republished == 1  # only the other entity's wake
    assert await world.pending() == []
    after = await world.stream_wake_ids()
    assert after.count(wake_id) == before.count(wake_id), "a claimed wake is not republished"


async def test_ghost_entry_of_a_runner_without_outstanding_wakes_is_cleaned_up(world: World):
    """An entry left pending by a dead session for a wake that was handled elsewhere must not
    pin the PEL (and block trimming and consumer cleanup) forever."""
    path = await world.entity(messages=1)
    wake_id = await world.outstanding(path)
    await world.read_as("dead-session")
    r = await world.claim(wake_id, "1-1")  # handled through another copy; this one stays
    assert r.status_code == 200, r.text
    notification = r.json()
    r = await world.holder_call(notification, "done", acked_offset=1)
    assert r.status_code == 200, r.text
    assert len(await world.pending()) == 1
    await asyncio.sleep(world.svc.settings.stranded_after_ms / 1000 + 0.1)

    await world.recovery(consumer_idle_ms=1).run_all()

    assert await world.pending() == []
    assert "dead-session" not in await world.consumers()


# --- hygiene -----------------------------------------------------------------------------------


async def test_hygiene_deletes_idle_consumers_with_empty_pel_only(world: World):
    done_path = await world.entity(messages=1)
    ((done_entry, _f),) = await world.read_as("idle-empty")
    r = await world.claim(await world.outstanding(done_path), done_entry)  # acks its entry
    assert r.status_code == 200, r.text
    path = await world.entity(messages=1)
    wake_id = await world.outstanding(path)
    ((entry_id, _f),) = await world.read_as("idle-with-pending")
    assert {c: v["pending"] for c, v in (await world.consumers()).items()} == {
        "idle-empty": 0,
        "idle-with-pending": 1,
    }
    await asyncio.sleep(0.3)
    # Stranded reclaim must not kick in here: the pending entry stays where it is.
    recovery = world.recovery(consumer_idle_ms=200, stranded_after_ms=60_000)

    report = await recovery.hygiene()

    assert report.consumers_deleted == 1
    consumers = await world.consumers()
    assert set(consumers) == {"idle-with-pending"}
    assert consumers["idle-with-pending"]["pending"] == 1
    assert [p["message_id"] for p in await world.pending()] == [entry_id]
    # Not idle long enough: kept.
    await world.redis.xgroup_createconsumer(world.key, GROUP, "fresh")
    report = await world.recovery(consumer_idle_ms=60_000).hygiene()
    assert report.consumers_deleted == 0
    assert "fresh" in await world.consumers()
    # The pending entry is still claimable after all of this.
    assert (await world.claim(wake_id, entry_id)).status_code == 200
    assert await world.pending() == []


async def test_delete_if_idle_script_refuses_a_consumer_with_pending_entries(world: World):
    """The atomic check itself: XINFO said "empty" a moment ago, but an entry arrived since."""
    await world.entity(messages=1)
    await world.read_as("racer")
    script = world.svc.streams._delete_if_idle
    deleted = await script(keys=[world.key], args=[GROUP, "racer", 0])
    assert deleted == 0
    assert "racer" in await world.consumers()
    assert len(await world.pending()) == 1


async def test_trim_never_drops_a_pending_or_undelivered_entry(world: World):
    await world.svc.streams.ensure_group(world.runner_id)
    base = 1_000_000

    async def add(ms: int, seq: int = 0) -> str:
        entry_id: str = await world.redis.xadd(
            world.key,
            {"v": "1", "wake_id": f"w{ms}-{seq}", "entity": "/x/y", "epoch": "1"},
            id=f"{base + ms}-{seq}",
        )
        return entry_id

    acked_old = [await add(1), await add(2)]
    pending_entry = await add(3)
    acked_new = await add(4)
    for _ in range(4):
        await world.read_as("reader", count=1)
    await world.redis.xack(world.key, GROUP, *acked_old, acked_new)
    undelivered = [await add(5), await add(5, 1)]

    report = await world.recovery(stream_retention_ms=1).hygiene()

    remaining = [entry_id for entry_id, _f in await world.redis.xrange(world.key)]
    assert report.entries_trimmed == 2
    assert remaining == [pending_entry, acked_new, *undelivered]
    assert [p["message_id"] for p in await world.pending()] == [pending_entry]


async def test_trim_keeps_an_undelivered_entry_sharing_the_last_delivered_millisecond(
    world: World,
):
    """XADD can put two entries in one millisecond; the reader may have read only the first."""
    await world.svc.streams.ensure_group(world.runner_id)
    first = await world.redis.xadd(world.key, {"wake_id": "a"}, id="2000000-0")
    second = await world.redis.xadd(world.key, {"wake_id": "b"}, id="2000000-1")
    ((read_id, _f),) = await world.read_as("reader", count=1)
    assert read_id == first
    await world.redis.xack(world.key, GROUP, first)

    await world.recovery(stream_retention_ms=1).hygiene()

    remaining = [entry_id for entry_id, _f in await world.redis.xrange(world.key)]
    assert second in remaining, remaining
    assert [e for e, _f in await world.read_as("reader")] == [second]


# --- concurrency -------------------------------------------------------------------------------


async def test_concurrent_recovery_passes_never_double_expire_or_double_wake(
    world: World, server_settings: Settings
):
    n = 12
    expiring = [await world.entity(messages=2) for _ in range(n)]
    stale = [await world.entity(messages=1) for _ in range(n)]
    for path in expiring:
        await world.claim_ok(path)
        await world.backdate_lease(path)
    stale_wakes = [await world.outstanding(p) for p in stale]
    await world.read_as("slow-session")  # delivered to a session, never claimed
    await world.db.execute(
        "UPDATE wakes SET delivered_at = now() - interval '5 seconds' WHERE id = ANY($1::text[])",
        stale_wakes,
    )
    wakes_before = await world.db.fetchval("SELECT count(*) FROM wakes")
    xlen_before = await world.redis.xlen(world.key)

    # Long enough that the wakes created by this test are not yet due for re-delivery.
    slow = server_settings.with_(redeliver_after_ms=3_000, stranded_after_ms=60_000)
    async with (
        open_services(slow, pool_max=4) as one,
        open_services(slow, pool_max=4) as two,
    ):
        reports: list[RecoveryReport] = []
        for _round in range(3):
            reports += await asyncio.gather(
                one.recovery.run_all(), two.recovery.run_all(), one.recovery.expire_claims()
            )

    assert sum(r.expired_claims for r in reports) == n
    assert sum(r.rewakes for r in reports) == n
    assert await world.db.fetchval("SELECT count(*) FROM wakes") == wakes_before + n
    assert await world.db.fetchval("SELECT count(*) FROM claims WHERE status = 'expired'") == n
    per_entity = await world.db.fetch(
        "SELECT entity_url, count(*) AS n FROM wakes WHERE reason = 'lease_expired' "
        "GROUP BY entity_url"
    )
    assert sorted(r["n"] for r in per_entity) == [1] * n
    redelivered = sum(r.redelivered for r in reports)
    assert redelivered == n, "each stale wake is re-published by exactly one pass"
    # The stream got one entry per new wake and one per re-delivery, nothing more.
    assert await world.redis.xlen(world.key) == xlen_before + 2 * n
    for path in expiring:
        entity = await world.get(path)
        assert entity["status"] == "idle"
        assert entity["dispatch"]["epoch"] == 2


# --- poison work -------------------------------------------------------------------------------


async def test_poison_work_is_parked_after_max_attempts_and_resumed(world: World):
    path = await world.entity(messages=1)
    for attempt in range(1, MAX_ATTEMPTS + 1):
        notification = await world.claim_ok(path)
        r = await world.holder_call(notification, "release", error=f"boom {attempt}")
        assert r.status_code == 200, r.text
        assert r.json()["next_wake"] is (attempt < MAX_ATTEMPTS)

    entity = await world.get(path)
    dispatch = entity["dispatch"]
    assert dispatch["parked_reason"], entity
    assert str(MAX_ATTEMPTS) in dispatch["parked_reason"]
    assert dispatch["outstanding_wake_id"] is None
    assert dispatch["active_claim"] is None
    assert entity["status"] == "idle"
    # Held, visible: a new message does not wake it, the runner health counts it.
    sent = await world.send(path, {"n": "more"})
    assert sent["wake"]["status"] == "held", sent
    r = await world.http.get(f"/v1/runners/{world.runner_id}/health", headers=world.headers)
    assert r.status_code == 200, r.text
    health = r.json()
    assert health["backlog"]["parked_entities"] == 1, health
    assert "parked_entities" in {i["code"] for i in health["health"]["issues"]}
    # Recovery leaves a parked entity alone.
    report = await world.svc.recovery.run_all()
    assert report.rewakes == 0
    assert (await world.get(path))["dispatch"]["outstanding_wake_id"] is None

    # resume clears the park and wakes it.
    r = await world.http.post(f"{path}/signal", json={"signal": "resume"}, headers=world.headers)
    assert r.status_code == 200, r.text
    dispatch = r.json()["dispatch"]
    assert dispatch["parked_reason"] is None
    assert dispatch["outstanding_wake_id"] is not None
    notification = await world.claim_ok(path)
    r = await world.holder_call(notification, "done", acked_offset=2)
    assert r.status_code == 200, r.text
    entity = await world.get(path)
    assert entity["status"] == "idle"
    assert entity["dispatch"]["acked_offset"] == 2


async def test_claims_expiring_without_progress_park_the_entity(world: World):
    path = await world.entity(messages=1)
    for _ in range(MAX_ATTEMPTS):
        await world.claim_ok(path)
        await world.backdate_lease(path)
        assert (await world.svc.recovery.expire_claims()).expired_claims == 1
    dispatch = (await world.get(path))["dispatch"]
    assert dispatch["parked_reason"]
    assert "lease_expired" in dispatch["parked_reason"]
    assert dispatch["outstanding_wake_id"] is None


async def test_progress_resets_the_attempt_count(world: World):
    path = await world.entity(messages=MAX_ATTEMPTS + 2)
    for _ in range(MAX_ATTEMPTS - 1):
        notification = await world.claim_ok(path)
        assert (await world.holder_call(notification, "release")).status_code == 200
    notification = await world.claim_ok(path)
    assert (await world.holder_call(notification, "done", acked_offset=1)).status_code == 200
    for _ in range(MAX_ATTEMPTS - 1):
        notification = await world.claim_ok(path)
        assert (await world.holder_call(notification, "release")).status_code == 200
    dispatch = (await world.get(path))["dispatch"]
    assert dispatch["parked_reason"] is None
    assert dispatch["outstanding_wake_id"] is not None


# --- the arq worker's settings -----------------------------------------------------------------


def test_recovery_runs_outside_the_arq_job_slots(settings: Settings):
    """arq keeps only the webhook deliveries (with their own concurrency): every recovery job
    is a periodic loop of the worker process, so none can wait behind a slow delivery."""
    ws: Any = worker_settings(settings.with_(webhook_concurrency=7))
    assert getattr(ws, "cron_jobs", None) is None
    assert [f.name for f in ws.functions] == ["deliver_webhook"]
    assert ws.max_jobs == 7
    assert {job.name for job in ws.ctx["pullwake_jobs"]} == {
        "expire_claims",
        "redeliver_wakes",
        "repair_streams",
        "stream_hygiene",
        "prune_retention",
    }
