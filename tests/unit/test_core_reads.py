"""The entity, recovery and retention use cases over fakes of their store reads
(``core/ports.py``): membership checks, paging, the wake audit view, re-delivery choices and
retention batches, without Postgres or Redis."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from pullwake.config import Settings
from pullwake.core.entities import ClaimReader, Dispatcher
from pullwake.core.recovery import Recovery, RecoveryReport
from pullwake.core.retention import Retention
from pullwake.errors import Forbidden, InvalidRequest, NotFound
from pullwake.model import Principal
from pullwake.store.entities import EntityRow, EntityTypeRow, NewEntity, WakeRow
from pullwake.store.ops import RunnerRow
from pullwake.store.recovery import OutstandingWake, StaleWake
from pullwake.store.retention import PrunedWakes
from pullwake.store.steps import NewWake
from pullwake.streams.probe import GroupState, StreamState
from pullwake.wire import EntityCreate, EventView, MessageView

NOW = datetime(2026, 12, 1, 12, 0, tzinfo=UTC)
ALICE = Principal("user", "alice")
BOB = Principal("user", "bob")
SETTINGS = Settings(public_url="http://pw.test")
RUNNER_POLICY = {"targets": [{"type": "runner", "runner_id": "r1"}]}
WEBHOOK_TARGET = {"type": "webhook", "url": "https://hooks.test/x", "secret": "s" * 16}


def entity(url: str = "/t/e", **fields: Any) -> EntityRow:
    row: dict[str, Any] = {
        "url": url,
        "type": url.split("/")[1],
        "id": url.split("/")[2],
        "status": "idle",
        "dispatch_policy": RUNNER_POLICY,
        "target_runner_id": "r1",
        "tags": {},
        "created_by": ALICE.key,
        "members": [],
        "created_at": NOW,
        "tail_offset": 3,
        "acked_offset": 1,
        "epoch": 2,
        "outstanding_wake_id": None,
        "active_claim_id": None,
        "active_runner_id": None,
        "active_epoch": None,
        "active_lease_expires_at": None,
        "parked_reason": None,
        "failed_attempts": 0,
    }
    return EntityRow(**{**row, **fields})


def wake(wake_id: str = "wk_1", url: str = "/t/e", **fields: Any) -> WakeRow:
    row: dict[str, Any] = {
        "id": wake_id,
        "entity_url": url,
        "epoch": 2,
        "target": {"type": "runner", "runner_id": "r1"},
        "runner_id": "r1",
        "reason": "message",
        "delivery_status": "delivered",
        "claim_status": "unclaimed",
        "stream_entry_id": "5-0",
        "attempts": 1,
        "last_error": None,
        "created_at": NOW,
        "delivered_at": NOW,
        "claimed_at": None,
        "resolved_at": None,
    }
    return WakeRow(**{**row, **fields})


def message(offset: int) -> MessageView:
    return MessageView(offset, {"n": offset}, ALICE.key, NOW)


class FakeEntityStore:
    """Entity reads over dicts; records which reads were made."""

    def __init__(self, *entities: EntityRow) -> None:
        self.entities = {e.url: e for e in entities}
        self.types: dict[str, EntityTypeRow] = {}
        self.runners: dict[str, RunnerRow] = {}
        self.messages: dict[str, list[MessageView]] = {}
        self.events: dict[str, list[EventView]] = {}
        self.wakes: dict[str, WakeRow] = {}
        self.inserted: list[NewEntity] = []
        self.reads: list[str] = []

    async def insert_entity(self, new: NewEntity) -> bool:
        self.inserted.append(new)
        return True

    async def get_entity_type(self, name: str) -> EntityTypeRow | None:
        return self.types.get(name)

    async def get_runner(self, runner_id: str) -> RunnerRow | None:
        return self.runners.get(runner_id)

    async def get_entity(self, url: str) -> EntityRow | None:
        self.reads.append(f"entity {url}")
        return self.entities.get(url)

    async def set_members(self, url: str, created_by: str, members: list[str]) -> bool:
        raise AssertionError("not expected here")

    async def messages_after(self, url: str, after: int, limit: int) -> list[MessageView]:
        self.reads.append(f"messages {url} after {after} limit {limit}")
        return [m for m in self.messages.get(url, []) if m.offset > after][:limit]

    async def events_after(self, url: str, after: int, limit: int) -> list[EventView]:
        self.reads.append(f"events {url} after {after} limit {limit}")
        return [e for e in self.events.get(url, []) if e.offset > after][:limit]

    async def get_wake(self, wake_id: str) -> WakeRow | None:
        return self.wakes.get(wake_id)


def dispatcher(store: FakeEntityStore) -> Dispatcher:
    return Dispatcher(store, None, None, SETTINGS)  # type: ignore[arg-type]


# --- entities ------------------------------------------------------------------------------


async def test_a_non_member_reads_neither_the_inbox_nor_the_events() -> None:
    store = FakeEntityStore(entity())
    store.messages["/t/e"] = [message(2)]
    use_case = dispatcher(store)
    with pytest.raises(Forbidden, match="user:bob is not a member of entity /t/e"):
        await use_case.list_messages("/t/e", 0, 10, BOB)
    with pytest.raises(Forbidden):
        await use_case.list_events("/t/e", 0, 10, BOB)
    assert store.reads == ["entity /t/e", "entity /t/e"], "no page is read for a non-member"


async def test_a_granted_principal_and_a_claim_holder_page_the_inbox() -> None:
    store = FakeEntityStore(entity(members=[BOB.key], tail_offset=3))
    store.messages["/t/e"] = [message(1), message(2), message(3)]
    use_case = dispatcher(store)
    page = await use_case.list_messages("/t/e", 0, 2, BOB)
    assert [m.offset for m in page.messages] == [1, 2]
    assert (page.next_after, page.tail_offset, page.more) == (2, 3, True)
    assert store.reads[-1] == "messages /t/e after 0 limit 3", "one more row tells if there's more"
    # A claim token reads its own entity without being a member (its caller checked it).
    page = await use_case.list_messages("/t/e", 2, 2, ClaimReader("wk_1"))
    assert ([m.offset for m in page.messages], page.next_after, page.more) == ([3], 3, False)
    empty = await use_case.list_messages("/t/e", 3, 2, ALICE)
    assert (empty.messages, empty.next_after, empty.more) == ([], 3, False)


async def test_an_events_page_keeps_its_offsets() -> None:
    store = FakeEntityStore(entity(members=["*"]))
    store.events["/t/e"] = [EventView(o, {"e": o}, "runner", "wk_1", NOW) for o in (1, 2)]
    page = await dispatcher(store).list_events("/t/e", 0, 5, BOB)
    assert ([e.offset for e in page.events], page.next_after, page.more) == ([1, 2], 2, False)


async def test_a_missing_entity_is_not_found_even_for_an_operator() -> None:
    with pytest.raises(NotFound, match="entity /t/x does not exist"):
        await dispatcher(FakeEntityStore()).get_entity("/t/x", None)


async def test_the_entity_view_shows_the_active_claim_and_hides_webhook_secrets() -> None:
    row = entity(
        dispatch_policy={"targets": [WEBHOOK_TARGET]},
        target_runner_id=None,
        status="running",
        active_claim_id="wk_7",
        active_epoch=3,
        active_lease_expires_at=NOW,
    )
    view = await dispatcher(FakeEntityStore(row)).get_entity("/t/e", None)
    assert view.dispatch_policy == {"targets": [{"type": "webhook", "url": WEBHOOK_TARGET["url"]}]}
    claim = view.dispatch.active_claim
    assert claim is not None
    assert (claim.claim_id, claim.runner_id, claim.epoch) == ("wk_7", None, 3)
    assert (view.dispatch.tail_offset, view.dispatch.acked_offset) == (3, 1)


async def test_a_wake_is_shown_to_members_of_its_entity_without_its_secret() -> None:
    store = FakeEntityStore(entity(members=[BOB.key]), entity("/t/other"))
    store.wakes["wk_1"] = wake(target=WEBHOOK_TARGET, runner_id=None)
    store.wakes["wk_2"] = wake("wk_2", "/t/other")
    store.wakes["wk_3"] = wake("wk_3", "/t/gone")
    use_case = dispatcher(store)
    view = await use_case.get_wake("wk_1", BOB)
    assert view.target == {"type": "webhook", "url": WEBHOOK_TARGET["url"]}
    assert store.wakes["wk_1"].target["secret"], "the stored row is left as it is"
    assert (view.id, view.entity_url, view.stream_entry_id) == ("wk_1", "/t/e", "5-0")
    with pytest.raises(Forbidden):
        await use_case.get_wake("wk_2", BOB)
    with pytest.raises(NotFound, match="wk_3"):
        await use_case.get_wake("wk_3", None)
    with pytest.raises(NotFound, match="wk_9"):
        await use_case.get_wake("wk_9", None)


async def test_another_principals_default_policy_never_applies() -> None:
    store = FakeEntityStore()
    store.types["t"] = EntityTypeRow("t", RUNNER_POLICY, BOB.key, NOW, NOW)
    with pytest.raises(InvalidRequest, match="is another principal's"):
        await dispatcher(store).create_entity(ALICE, "t", "e", EntityCreate())
    with pytest.raises(InvalidRequest, match="has no default policy"):
        await dispatcher(store).create_entity(ALICE, "u", "e", EntityCreate())
    assert store.inserted == []


async def test_an_entity_targets_only_an_enabled_runner_of_its_creator() -> None:
    store = FakeEntityStore()
    store.types["t"] = EntityTypeRow("t", RUNNER_POLICY, None, NOW, NOW)
    runner = RunnerRow("r1", BOB.key, "", "local", "enabled", NOW, NOW, None, None, None, NOW)
    use_case = dispatcher(store)
    with pytest.raises(NotFound, match="runner 'r1' does not exist"):
        await use_case.create_entity(ALICE, "t", "e", EntityCreate())
    store.runners["r1"] = runner
    with pytest.raises(Forbidden, match="not owned by user:alice"):
        await use_case.create_entity(ALICE, "t", "e", EntityCreate())
    assert store.inserted == []


async def test_a_new_entity_is_inserted_with_its_policy_and_sorted_members() -> None:
    store = FakeEntityStore(entity(members=[BOB.key]))
    store.runners["r1"] = RunnerRow(
        "r1", ALICE.key, "", "local", "enabled", NOW, NOW, None, None, None, NOW
    )
    store.types["t"] = EntityTypeRow("t", RUNNER_POLICY, ALICE.key, NOW, NOW)
    body = EntityCreate(tags={"k": "v"}, members=[BOB.key, "*", BOB.key])
    view, created = await dispatcher(store).create_entity(ALICE, "t", "e", body)
    assert created
    assert store.inserted == [
        NewEntity("/t/e", "t", "e", RUNNER_POLICY, "r1", {"k": "v"}, ALICE.key, ["*", BOB.key])
    ]
    assert view.url == "/t/e"


# --- recovery ------------------------------------------------------------------------------


def stale(wake_id: str, entry_id: str | None, status: str = "delivered") -> StaleWake:
    target = {"type": "runner", "runner_id": "r1"}
    return StaleWake(wake_id, "/t/e", 1, "message", NOW, "r1", target, status, entry_id)


class FakeRecoveryStore:
    def __init__(self, stale: list[StaleWake]) -> None:
        self.stale = stale
        self.asked: list[tuple[timedelta, timedelta, int]] = []
        self.parked: list[tuple[str, str]] = []
        self.unparked: list[str] = []

    async def lock_stale_wakes(
        self, queued_after: timedelta, delivered_after: timedelta, limit: int
    ) -> list[StaleWake]:
        self.asked.append((queued_after, delivered_after, limit))
        batch, self.stale = self.stale[:limit], self.stale[limit:]
        return batch

    async def park_unread(self, wakes: list[tuple[str, str]]) -> None:
        self.parked += wakes

    async def unpark(self, wake_ids: list[str]) -> None:
        self.unparked += wake_ids

    def outstanding(self, runner_id: str) -> list[OutstandingWake]:
        return [
            OutstandingWake("wk_1", "/t/e", 1, "message", NOW, runner_id, "1-0", parked=True),
            OutstandingWake("wk_2", "/t/f", 1, "message", NOW, runner_id, None),
            OutstandingWake("wk_3", "/t/g", 1, "message", NOW, runner_id, "3-0", parked=True),
        ]


class FakeProbe:
    """The stream probe: every stream has the ``pullwake`` group, read up to ``last_delivered``
    (no group when None); ``present`` says which entries it still holds (default: all)."""

    def __init__(self, last_delivered: str | None, present: dict[str, bool] | None = None):
        self.last_delivered = last_delivered
        self.present = present

    async def states(self, entries: Any, *, first_entry: bool = False) -> dict[str, StreamState]:
        group = None
        if self.last_delivered is not None:
            group = GroupState(pending=0, consumers=1, last_delivered_id=self.last_delivered)
        return {
            runner_id: StreamState(
                exists=True,
                group=group,
                present={
                    e: True if self.present is None else self.present.get(e, False) for e in ids
                },
            )
            for runner_id, ids in entries.items()
        }


class RecordingPublisher:
    def __init__(self) -> None:
        self.published: list[NewWake] = []

    async def publish(self, wakes: Any) -> None:
        self.published.extend(w for w in wakes if w is not None)

    async def flush(self) -> None:
        pass


def recovery(store: Any, probe: FakeProbe, **settings: Any) -> tuple[Recovery, Any]:
    publisher = RecordingPublisher()
    config = Settings(public_url="http://pw.test", **settings)
    use_case = Recovery(store, None, publisher, config, probe)  # type: ignore[arg-type]
    return use_case, publisher


async def test_redelivery_skips_entries_no_session_has_read_yet() -> None:
    store = FakeRecoveryStore(
        [stale("wk_read", "5-0"), stale("wk_unread", "9-1"), stale("wk_queued", None, "queued")]
    )
    use_case, publisher = recovery(store, FakeProbe("7-0"), recovery_batch=2)
    report = await use_case.redeliver()
    assert [w.id for w in publisher.published] == ["wk_read", "wk_queued"]
    assert {w.reason for w in publisher.published} == {"redelivery"}
    assert report.redelivered == 2
    assert [limit for _, _, limit in store.asked] == [2, 2], "batches until one is not full"
    assert store.asked[0][1] == timedelta(milliseconds=SETTINGS.redeliver_after_ms)
    # The unread one is parked (left out of later passes) rather than published again.
    assert (store.parked, report.wakes_parked) == ([("wk_unread", "9-1")], 1)


async def test_redelivery_parks_entries_of_a_stream_without_a_group_and_republishes_lost_ones():
    """No group: no session ever read the stream (the runner never connected)."""
    store = FakeRecoveryStore([stale("wk_waiting", "5-0"), stale("wk_lost", "6-0")])
    use_case, publisher = recovery(store, FakeProbe(None, present={"5-0": True}))
    report = await use_case.redeliver()
    assert [w.id for w in publisher.published] == ["wk_lost"]
    assert (report.redelivered, store.parked) == (1, [("wk_waiting", "5-0")])


async def test_outstanding_wakes_whose_entry_is_gone_are_published_again() -> None:
    store = FakeRecoveryStore([])
    use_case, publisher = recovery(store, FakeProbe("2-0", present={"1-0": True}))
    report = RecoveryReport()
    await use_case._check({"r1": store.outstanding("r1")}, report)
    assert [(w.id, w.reason, w.target_type) for w in publisher.published] == [
        ("wk_3", "redis_rebuild", "runner")
    ]
    assert (report.streams_repaired, report.redelivered) == (1, 1)
    # wk_1's entry was read (1-0 <= 2-0): looked at by re-delivery again; wk_3 was re-published.
    assert store.unparked == ["wk_1"]


# --- retention -----------------------------------------------------------------------------


class FakePruning:
    """Each prune removes up to ``limit`` of what is left."""

    def __init__(self, wakes: int, messages: int, events: int) -> None:
        self.left = {"wakes": wakes, "messages": messages, "events": events}
        self.calls: list[str] = []

    def _take(self, table: str, limit: int) -> int:
        self.calls.append(table)
        taken = min(limit, self.left[table])
        self.left[table] -= taken
        return taken

    async def prune_wakes(self, older_than: timedelta, limit: int) -> PrunedWakes:
        taken = self._take("wakes", limit)
        return PrunedWakes(taken, taken - 1 if taken else 0)

    async def count_prunable_wakes(self, older_than: timedelta) -> PrunedWakes:
        return PrunedWakes(self.left["wakes"], 1)

    async def prune_inbox_messages(self, older_than: timedelta, limit: int) -> int:
        return self._take("messages", limit)

    async def count_prunable_inbox_messages(self, older_than: timedelta) -> int:
        return self.left["messages"]

    async def prune_entity_events(self, older_than: timedelta, limit: int) -> int:
        return self._take("events", limit)

    async def count_prunable_entity_events(self, older_than: timedelta) -> int:
        return self.left["events"]


def retention(store: FakePruning) -> Retention:
    config = Settings(public_url="http://pw.test", retention_ms=60_000, retention_batch=2)
    return Retention(store, config)  # type: ignore[arg-type]


async def test_retention_takes_turns_until_every_table_is_done() -> None:
    store = FakePruning(wakes=5, messages=1, events=2)
    report = await retention(store).prune()
    assert report.rows == {"wakes": 5, "claims": 2, "inbox_messages": 1, "entity_events": 2}
    assert store.calls[:3] == ["wakes", "messages", "events"], "one batch each, in turn"
    assert store.calls.count("wakes") == 3
    assert report.complete


async def test_a_dry_run_counts_and_deletes_nothing() -> None:
    store = FakePruning(wakes=5, messages=1, events=2)
    report = await retention(store).prune(dry_run=True)
    assert report.dry_run
    assert report.rows == {"wakes": 5, "claims": 1, "inbox_messages": 1, "entity_events": 2}
    assert store.calls == []
