"""The token, runner and entity type use cases over in-memory fakes of their store
(``core/ports.py``) and a live auth cache: authentication and revocation, the runner cap and
ownership, the cached access check, heartbeats, admin status, deletion and health, without
Postgres or Redis."""

from __future__ import annotations

import dataclasses
import logging
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from _core_fakes import FakePublisher

from pullwake.authcache import RUNNER, TOKEN, AuthCache
from pullwake.config import Settings
from pullwake.core.entity_types import EntityTypes
from pullwake.core.runners import RunnerAccess, Runners
from pullwake.core.tokens import Tokens
from pullwake.errors import Forbidden, InvalidRequest, NotFound
from pullwake.model import AdminStatus, Principal, hash_token
from pullwake.store.entities import EntityTypeRow
from pullwake.store.ops import RunnerBacklog, RunnerRow
from pullwake.store.recovery import OutstandingWake
from pullwake.store.runners import Registration
from pullwake.store.steps import Step, StepLimits
from pullwake.store.tokens import TokenLookup, TokenRow
from pullwake.streams.wakes import StreamInfo
from pullwake.wire import (
    DispatchPolicy,
    RunnerHeartbeat,
    RunnerRegister,
    RunnerTarget,
    WebhookTarget,
)

NOW = datetime(2026, 12, 1, 12, 0, tzinfo=UTC)
ALICE = Principal("user", "alice")
BOB = Principal("user", "bob")
MINUTE_NS = 60 * 1_000_000_000
EMPTY = Step(*[None] * len(dataclasses.fields(Step)))


class Clock:
    def __init__(self) -> None:
        self.now = 1_000 * MINUTE_NS

    def __call__(self) -> int:
        return self.now


def live_cache() -> AuthCache:
    """A cache in use, as while the API's listener holds LISTEN (not strict: no listener)."""
    cache = AuthCache(ttl_ms=3_600_000, max_entries=100, strict=False, clock=Clock())
    cache.activate()
    return cache


# --- tokens --------------------------------------------------------------------------------


class FakeTokenStore:
    """Tokens in memory, keyed by id; records every call."""

    def __init__(self) -> None:
        self.rows: dict[str, TokenRow] = {}
        self.hashes: dict[str, str] = {}  # hash -> id
        self.calls: list[str] = []
        self.touched: list[list[str]] = []
        self.touch_due = True
        self.during_lookup: Any = None

    async def insert_token(
        self, token_id: str, principal: str, token_hash: str, label: str
    ) -> TokenRow:
        self.calls.append("insert")
        row = TokenRow(token_id, principal, label, NOW, None, None)
        self.rows[token_id], self.hashes[token_hash] = row, token_id
        return row

    async def lookup_token(self, token_hash: str) -> TokenLookup | None:
        self.calls.append("lookup")
        if self.during_lookup is not None:
            self.during_lookup()
        token_id = self.hashes.get(token_hash)
        if token_id is None:
            return None
        row = self.rows[token_id]
        return TokenLookup(row.id, row.principal, row.last_used_at, row.revoked_at, self.touch_due)

    async def touch_token(self, token_id: str) -> None:
        self.calls.append("touch")
        self.touched.append([token_id])

    async def touch_tokens(self, token_ids: list[str]) -> None:
        self.calls.append("touch batch")
        self.touched.append(token_ids)

    async def list_tokens(self, principal: str | None) -> list[TokenRow]:
        return [r for r in self.rows.values() if principal in (None, r.principal)]

    async def revoke_token(self, token_id: str) -> TokenRow | None:
        row = self.rows.get(token_id)
        if row is None:
            return None
        self.rows[token_id] = dataclasses.replace(row, revoked_at=row.revoked_at or NOW)
        return self.rows[token_id]


def tokens(cache: AuthCache | None = None) -> tuple[Tokens, FakeTokenStore]:
    store = FakeTokenStore()
    if cache is None:  # (an empty cache is falsy: it has a length)
        cache = AuthCache(ttl_ms=5_000, max_entries=10, strict=False)  # never activated: off
    return Tokens(store, cache), store  # type: ignore[arg-type]


async def test_a_minted_token_is_stored_as_its_hash_and_authenticates_its_principal() -> None:
    use_case, store = tokens()
    raw, row = await use_case.create(ALICE, "ci")
    assert raw.startswith("pwk_")
    assert len(raw) > 40
    assert (row.principal, row.label, row.revoked_at) == (ALICE.key, "ci", None)
    assert store.hashes == {hash_token(raw): row.id}, "only the hash is stored"
    assert await use_case.authenticate(raw) == ALICE
    assert await use_case.authenticate(raw + "x") is None
    assert await use_case.authenticate("pwk_unknown") is None


async def test_a_revoked_token_no_longer_authenticates() -> None:
    use_case, _store = tokens()
    raw, row = await use_case.create(ALICE, "soon revoked")
    kept, _ = await use_case.create(ALICE, "kept")
    assert await use_case.authenticate(raw) == ALICE
    revoked = await use_case.revoke(row.id)
    assert revoked.revoked_at is not None
    assert await use_case.authenticate(raw) is None
    assert await use_case.authenticate(kept) == ALICE
    listed = {t.id: t for t in await use_case.list_tokens(ALICE.key)}
    assert listed[row.id].revoked_at is not None
    assert await use_case.list_tokens(BOB.key) == []


async def test_revoking_an_unknown_token_is_not_found() -> None:
    use_case, _ = tokens()
    with pytest.raises(NotFound, match="token 'tok_nope' does not exist"):
        await use_case.revoke("tok_nope")


async def test_a_cached_token_costs_no_lookup_until_its_invalidation_arrives() -> None:
    cache = live_cache()
    use_case, store = tokens(cache)
    raw, row = await use_case.create(ALICE, "t")
    assert await use_case.authenticate(raw) == ALICE
    assert await use_case.authenticate(raw) == ALICE
    assert store.calls.count("lookup") == 1, "the second check is a cache hit"

    await use_case.revoke(row.id)
    cache.drop(TOKEN + hash_token(raw))  # what the revoke trigger's notification does
    assert await use_case.authenticate(raw) is None
    assert store.calls.count("lookup") == 2
    assert await use_case.authenticate(raw) is None
    assert store.calls.count("lookup") == 3, "an unknown or revoked token is never cached"


async def test_a_lookup_that_raced_an_invalidation_is_not_cached() -> None:
    cache = live_cache()
    use_case, store = tokens(cache)
    raw, _ = await use_case.create(ALICE, "t")
    store.during_lookup = lambda: cache.drop("t:someone-else")
    assert await use_case.authenticate(raw) == ALICE
    assert cache.peek(TOKEN + hash_token(raw)) is None
    store.during_lookup = None
    assert await use_case.authenticate(raw) == ALICE
    assert cache.peek(TOKEN + hash_token(raw)) is not None


async def test_a_lookup_records_the_use_only_when_due() -> None:
    use_case, store = tokens()
    raw, row = await use_case.create(ALICE, "t")
    store.touch_due = False
    await use_case.authenticate(raw)
    assert "touch" not in store.calls
    store.touch_due = True
    await use_case.authenticate(raw)
    assert store.touched == [[row.id]]


async def test_cached_uses_are_recorded_once_a_minute_in_one_batch() -> None:
    cache = live_cache()
    clock: Clock = cache.clock  # type: ignore[assignment]
    use_case, store = tokens(cache)
    store.touch_due = False
    one, row_one = await use_case.create(ALICE, "one")
    two, row_two = await use_case.create(BOB, "two")
    assert await use_case.authenticate(one) == ALICE  # fills, nothing due
    assert await use_case.authenticate(two) == BOB
    assert await use_case.authenticate(one) == ALICE  # a hit within the minute: silent
    assert use_case._touch_task is None

    clock.now += MINUTE_NS
    assert await use_case.authenticate(one) == ALICE
    assert await use_case.authenticate(two) == BOB
    task = use_case._touch_task
    assert task is not None
    await task
    assert store.touched == [sorted([row_one.id, row_two.id])], "one UPDATE for both"
    assert await use_case.authenticate(one) == ALICE  # recorded just now: silent again
    assert store.touched == [sorted([row_one.id, row_two.id])]


async def test_a_failed_batch_record_only_logs(caplog: pytest.LogCaptureFixture) -> None:
    cache = live_cache()
    clock: Clock = cache.clock  # type: ignore[assignment]
    use_case, store = tokens(cache)
    store.touch_due = False
    raw, _ = await use_case.create(ALICE, "t")
    await use_case.authenticate(raw)

    async def broken(token_ids: list[str]) -> None:
        raise OSError("database gone")

    store.touch_tokens = broken  # type: ignore[method-assign]
    clock.now += MINUTE_NS
    assert await use_case.authenticate(raw) == ALICE
    assert use_case._touch_task is not None
    with caplog.at_level(logging.WARNING):
        await use_case._touch_task
    assert "could not record the use of 1 API tokens" in caplog.text


# --- runners -------------------------------------------------------------------------------


def runner_row(runner_id: str, owner: str, **fields: Any) -> RunnerRow:
    row: dict[str, Any] = {
        "id": runner_id,
        "owner_principal": owner,
        "label": "",
        "kind": "local",
        "admin_status": "enabled",
        "created_at": NOW,
        "updated_at": NOW,
        "last_seen_at": None,
        "lease_expires_at": None,
        "diagnostics": None,
        "now": NOW,
    }
    return RunnerRow(**{**row, **fields})


def woken(url: str, reason: str) -> Step:
    return dataclasses.replace(
        EMPTY,
        pub_id=f"wk_{url}",
        pub_url=url,
        pub_epoch=1,
        pub_reason=reason,
        pub_created_at=NOW,
        pub_runner_id="r1",
        pub_target_type="runner",
    )


class FakeRunnerStore:
    """The registry in memory: ids reserved for good, the cap counted per owner."""

    def __init__(self) -> None:
        self.reserved: dict[str, str] = {}
        self.runners: dict[str, RunnerRow] = {}
        self.backlog = RunnerBacklog(0, 0, None, 0, 0)
        self.outstanding: dict[str, list[OutstandingWake]] = {}
        self.claimed: dict[str, list[str]] = {}
        self.waiting: dict[str, list[str]] = {}
        self.calls: list[str] = []
        self.leases: list[tuple[str, timedelta, dict[str, Any] | None]] = []
        self.detached: list[str] = []

    async def register_runner(
        self, runner_id: str, owner: str, label: str, kind: str, *, max_owned: int
    ) -> Registration:
        self.calls.append(f"register {runner_id} cap {max_owned}")
        if self.reserved.setdefault(runner_id, owner) != owner:
            return Registration.OWNER_MISMATCH
        if runner_id in self.runners:
            self.runners[runner_id] = dataclasses.replace(
                self.runners[runner_id], label=label, kind=kind
            )
            return Registration.UPDATED
        if sum(r.owner_principal == owner for r in self.runners.values()) >= max_owned:
            del self.reserved[runner_id]  # rolled back with the refusal
            return Registration.AT_CAP
        self.runners[runner_id] = runner_row(runner_id, owner, label=label, kind=kind)
        return Registration.CREATED

    async def get_runner(self, runner_id: str) -> RunnerRow | None:
        self.calls.append(f"get {runner_id}")
        return self.runners.get(runner_id)

    async def list_runners(self, owner: str) -> list[RunnerRow]:
        return sorted(
            (r for r in self.runners.values() if r.owner_principal == owner), key=lambda r: r.id
        )

    async def extend_runner_lease(
        self, runner_id: str, lease: timedelta, diagnostics: dict[str, Any] | None
    ) -> datetime:
        self.leases.append((runner_id, lease, diagnostics))
        return NOW + lease

    async def set_runner_admin_status(self, runner_id: str, admin_status: str) -> bool:
        self.calls.append(f"set {runner_id} {admin_status}")
        runner = self.runners.get(runner_id)
        if runner is None:
            return False
        self.runners[runner_id] = dataclasses.replace(runner, admin_status=admin_status)
        return True

    async def delete_runner(self, runner_id: str) -> bool:
        self.calls.append(f"delete {runner_id}")
        return self.runners.pop(runner_id, None) is not None

    async def runner_backlog(self, runner_id: str) -> RunnerBacklog:
        return self.backlog

    async def outstanding_wakes(self, runner_id: str) -> list[OutstandingWake]:
        return self.outstanding.get(runner_id, [])

    async def active_claim_entities(self, runner_id: str) -> list[str]:
        return self.claimed.get(runner_id, [])

    async def idle_pending_entities(self, runner_id: str) -> list[str]:
        return self.waiting.get(runner_id, [])

    async def wake_entity(self, url: str, reason: str) -> Step:
        self.calls.append(f"wake {url} {reason}")
        return woken(url, reason)

    async def detach_runner(self, url: str, runner_id: str, limits: StepLimits) -> Step:
        self.detached.append(url)
        return EMPTY


class FakeStreams:
    def __init__(self, info: StreamInfo | Exception | None = None) -> None:
        self._info = info or StreamInfo(0, 0, 1, None)
        self.deleted: list[str] = []
        self.fail_delete = False

    async def info(self, runner_id: str) -> StreamInfo:
        if isinstance(self._info, Exception):
            raise self._info
        return self._info

    async def delete(self, runner_id: str) -> None:
        if self.fail_delete:
            raise ConnectionError("redis gone")
        self.deleted.append(runner_id)


def runners(
    *, cache: AuthCache | None = None, streams: FakeStreams | None = None, **settings: Any
) -> tuple[Runners, FakeRunnerStore, FakePublisher]:
    store, publisher = FakeRunnerStore(), FakePublisher()
    config = Settings(public_url="http://pw.test", **settings)
    if cache is None:
        cache = live_cache()
    use_case = Runners(store, streams or FakeStreams(), publisher, config, cache)  # type: ignore[arg-type]
    return use_case, store, publisher


async def test_registration_past_the_cap_is_forbidden_and_reserves_nothing() -> None:
    use_case, store, _ = runners(max_runners_per_principal=2)
    for runner_id in ("r1", "r2"):
        view, created = await use_case.register(ALICE, RunnerRegister(id=runner_id))
        assert created
        assert view.owner_principal == ALICE.key
    with pytest.raises(Forbidden, match="user:alice already has 2 runners"):
        await use_case.register(ALICE, RunnerRegister(id="r3"))
    assert store.calls[-1] == "register r3 cap 2", "nothing read after the refusal"
    assert "r3" not in store.reserved
    view, created = await use_case.register(ALICE, RunnerRegister(id="r1", label="renamed"))
    assert (created, view.label) == (False, "renamed"), "an update is not counted"
    _, created = await use_case.register(BOB, RunnerRegister(id="r3"))
    assert created, "the cap is per principal"


async def test_another_owners_runner_id_is_refused_even_once_deleted() -> None:
    use_case, store, _ = runners()
    await use_case.register(ALICE, RunnerRegister(id="r1"))
    with pytest.raises(Forbidden, match="runner 'r1' is owned by another principal"):
        await use_case.register(BOB, RunnerRegister(id="r1"))
    await use_case.delete(ALICE, "r1")
    with pytest.raises(Forbidden):
        await use_case.register(BOB, RunnerRegister(id="r1"))
    assert store.runners == {}


async def test_a_new_registration_wakes_the_runners_waiting_entities_an_update_does_not() -> None:
    use_case, store, publisher = runners()
    store.waiting["r1"] = ["/t/a", "/t/b"]
    await use_case.register(ALICE, RunnerRegister(id="r1"))
    assert [(w.entity_url, w.reason) for w in publisher.published] == [
        ("/t/a", "runner_registered"),
        ("/t/b", "runner_registered"),
    ]
    publisher.published.clear()
    await use_case.register(ALICE, RunnerRegister(id="r1", label="again"))
    assert publisher.published == []


async def test_only_the_owner_reads_a_runner() -> None:
    use_case, store, _ = runners()
    store.runners["r1"] = runner_row("r1", ALICE.key, label="box")
    assert (await use_case.get(ALICE, "r1")).label == "box"
    with pytest.raises(Forbidden):
        await use_case.get(BOB, "r1")
    with pytest.raises(NotFound, match="runner 'r9' does not exist"):
        await use_case.get(ALICE, "r9")
    store.runners["r2"] = runner_row("r2", BOB.key)
    assert [v.id for v in await use_case.list_owned(ALICE)] == ["r1"]


async def test_access_comes_from_the_cache_once_read_and_still_checks_the_owner() -> None:
    cache = live_cache()
    use_case, store, _ = runners(cache=cache)
    store.runners["r1"] = runner_row("r1", ALICE.key)
    access = await use_case.access(ALICE, "r1")
    assert access == RunnerAccess(ALICE.key, "enabled")
    assert access.enabled
    assert cache.peek(RUNNER + "r1") == access
    reads = store.calls.count("get r1")
    assert await use_case.access(ALICE, "r1") == access
    assert store.calls.count("get r1") == reads, "a cache hit reads nothing"
    with pytest.raises(Forbidden):
        await use_case.access(BOB, "r1")
    assert store.calls.count("get r1") == reads, "the cached owner answers the mismatch too"
    with pytest.raises(NotFound):
        await use_case.access(ALICE, "r9")


async def test_disabling_drops_the_cached_access_and_enabling_republishes_its_wakes() -> None:
    cache = live_cache()
    use_case, store, publisher = runners(cache=cache)
    store.runners["r1"] = runner_row("r1", ALICE.key)
    await use_case.access(ALICE, "r1")

    view = await use_case.set_admin_status(ALICE, "r1", AdminStatus.DISABLED)
    assert (view.admin_status, view.liveness) == ("disabled", "offline")
    assert not (await use_case.access(ALICE, "r1")).enabled, "the drop made it read again"
    assert publisher.published == []

    store.outstanding["r1"] = [OutstandingWake("wk_1", "/t/e", 2, "message", NOW, "r1", "1-0")]
    store.waiting["r1"] = ["/t/f"]
    await use_case.set_admin_status(ALICE, "r1", AdminStatus.ENABLED)
    assert [(w.id, w.reason, w.target_type) for w in publisher.published] == [
        ("wk_1", "message", "runner"),
        ("wk_/t/f", "runner_registered", "runner"),
    ]
    with pytest.raises(Forbidden):
        await use_case.set_admin_status(BOB, "r1", AdminStatus.DISABLED)
    assert store.calls.count("set r1 disabled") == 1


async def test_a_heartbeat_caps_the_lease_keeps_clean_diagnostics_and_checks_the_owner() -> None:
    use_case, store, _ = runners(runner_lease_ms=90_000, max_runner_lease_ms=120_000)
    store.runners["r1"] = runner_row("r1", ALICE.key)
    answer = await use_case.heartbeat(
        ALICE, "r1", RunnerHeartbeat(lease_ms=600_000, diagnostics={"ok": 1, "bad key": 2})
    )
    assert answer.ok
    assert answer.liveness == "online"
    assert answer.lease_expires_at == NOW + timedelta(milliseconds=120_000)
    await use_case.heartbeat(ALICE, "r1", RunnerHeartbeat())
    assert store.leases == [
        ("r1", timedelta(milliseconds=120_000), {"ok": 1}),
        ("r1", timedelta(milliseconds=90_000), None),
    ]
    with pytest.raises(Forbidden):
        await use_case.heartbeat(BOB, "r1", RunnerHeartbeat())
    assert len(store.leases) == 2


async def test_deleting_lets_go_of_each_entity_once_and_drops_the_stream_and_cache() -> None:
    cache = live_cache()
    streams = FakeStreams()
    use_case, store, _ = runners(cache=cache, streams=streams)
    store.runners["r1"] = runner_row("r1", ALICE.key)
    store.claimed["r1"] = ["/t/a"]
    store.outstanding["r1"] = [
        OutstandingWake("wk_1", "/t/a", 2, "message", NOW, "r1", None),
        OutstandingWake("wk_2", "/t/b", 1, "message", NOW, "r1", None),
    ]
    with pytest.raises(Forbidden):
        await use_case.delete(BOB, "r1")
    assert store.detached == []
    assert "r1" in store.runners
    await use_case.access(ALICE, "r1")

    await use_case.delete(ALICE, "r1")
    assert sorted(store.detached) == ["/t/a", "/t/b"]
    assert "r1" not in store.runners
    assert cache.peek(RUNNER + "r1") is None
    assert streams.deleted == ["r1"]
    with pytest.raises(NotFound):
        await use_case.access(ALICE, "r1")


async def test_a_stream_that_cannot_be_dropped_does_not_fail_the_delete(
    caplog: pytest.LogCaptureFixture,
) -> None:
    streams = FakeStreams()
    streams.fail_delete = True
    use_case, store, _ = runners(streams=streams)
    store.runners["r1"] = runner_row("r1", ALICE.key)
    with caplog.at_level(logging.WARNING):
        await use_case.delete(ALICE, "r1")
    assert "r1" not in store.runners
    assert "could not delete the stream of runner r1" in caplog.text


async def test_a_seen_runner_with_nothing_waiting_is_healthy() -> None:
    use_case, store, _ = runners()
    store.runners["r1"] = runner_row(
        "r1", ALICE.key, last_seen_at=NOW, lease_expires_at=NOW + timedelta(seconds=30)
    )
    store.backlog = RunnerBacklog(2, 1, 1_234.9, 0, 0)
    report = await use_case.health(ALICE, "r1")
    assert report["health"] == {"status": "healthy", "issues": []}
    assert (report["liveness"], report["active_claims"]) == ("online", 2)
    assert report["backlog"] == {
        "outstanding_wakes": 1,
        "undelivered_wakes": 0,
        "parked_entities": 0,
        "oldest_outstanding_wake_age_ms": 1_234,
        "stream": {"length": 0, "pending": 0, "consumers": 1},
    }


def _codes(report: dict[str, Any]) -> dict[str, str]:
    return {i["code"]: i["severity"] for i in report["health"]["issues"]}


async def test_health_names_every_issue_and_the_worst_severity_wins() -> None:
    use_case, store, _ = runners(
        streams=FakeStreams(ConnectionError("down")), redeliver_after_ms=15_000
    )
    store.runners["r1"] = runner_row(
        "r1",
        ALICE.key,
        last_seen_at=NOW - timedelta(minutes=5),
        lease_expires_at=NOW - timedelta(minutes=1),
        diagnostics={"stream_connected": False, "reconnect_count": 6},
    )
    store.backlog = RunnerBacklog(0, 3, 20_000.0, 1, 2)
    report = await use_case.health(ALICE, "r1")
    assert _codes(report) == {
        "liveness_expired": "unhealthy",
        "stale_wakes": "degraded",
        "parked_entities": "degraded",
        "undelivered_wakes": "degraded",
        "redis_unavailable": "degraded",
        "stream_disconnected": "degraded",
        "many_reconnects": "degraded",
    }
    assert report["health"]["status"] == "unhealthy"
    assert report["backlog"]["stream"] == {"error": "Redis unavailable: ConnectionError"}
    assert report["liveness"] == "expired"


async def test_health_of_a_never_seen_runner_is_degraded_and_a_disabled_one_unhealthy() -> None:
    use_case, store, _ = runners()
    store.runners["r1"] = runner_row("r1", ALICE.key, diagnostics={"reconnect_count": 5})
    report = await use_case.health(ALICE, "r1")
    assert _codes(report) == {"never_seen": "degraded"}, "five reconnects are not many yet"
    assert report["health"]["status"] == "degraded"

    store.runners["r1"] = runner_row("r1", ALICE.key, admin_status="disabled")
    report = await use_case.health(ALICE, "r1")
    assert _codes(report) == {"disabled": "unhealthy"}
    with pytest.raises(Forbidden):
        await use_case.health(BOB, "r1")


# --- entity types --------------------------------------------------------------------------


class FakeEntityTypeStore:
    def __init__(self) -> None:
        self.types: dict[str, EntityTypeRow] = {}

    async def put_entity_type(
        self, name: str, default_dispatch_policy: dict[str, Any] | None, owner: str
    ) -> tuple[EntityTypeRow, bool] | None:
        existing = self.types.get(name)
        if existing is not None and existing.owner_principal not in (None, owner):
            return None
        created_at = NOW if existing is None else existing.created_at
        row = EntityTypeRow(name, default_dispatch_policy, owner, created_at, NOW)
        self.types[name] = row
        return row, existing is None

    async def get_entity_type(self, name: str) -> EntityTypeRow | None:
        return self.types.get(name)


def entity_types() -> tuple[EntityTypes, FakeEntityTypeStore]:
    store = FakeEntityTypeStore()
    return EntityTypes(store), store  # type: ignore[arg-type]


async def test_an_entity_type_is_its_owners_and_its_webhook_secret_is_write_only() -> None:
    use_case, store = entity_types()
    policy = DispatchPolicy([WebhookTarget("https://hooks.test/x", "s" * 32)])
    view, created = await use_case.put(ALICE, "t", policy)
    assert created
    assert view.owner_principal == ALICE.key
    assert view.default_dispatch_policy == {
        "targets": [{"type": "webhook", "url": "https://hooks.test/x"}]
    }
    stored = store.types["t"].default_dispatch_policy
    assert stored is not None
    assert stored["targets"][0]["secret"] == "s" * 32

    _, created = await use_case.put(ALICE, "t", DispatchPolicy([RunnerTarget("r1")]))
    assert not created
    with pytest.raises(Forbidden, match="entity type 't' is owned by another principal"):
        await use_case.put(BOB, "t", None)
    with pytest.raises(Forbidden):
        await use_case.get(BOB, "t")
    assert (await use_case.get(ALICE, "t")).default_dispatch_policy == {
        "targets": [{"type": "runner", "runner_id": "r1"}]
    }


async def test_an_entity_type_refuses_a_private_webhook_url_unless_allowed() -> None:
    """The URL of a default webhook target is checked when the type is put, not at each
    entity creation; nothing is stored when it is refused."""
    use_case, store = entity_types()
    policy = DispatchPolicy([WebhookTarget("http://127.0.0.1:9/x", "s" * 32)])
    with pytest.raises(InvalidRequest) as refused:
        await use_case.put(ALICE, "t", policy)
    assert refused.value.errors is not None
    assert refused.value.errors[0].key == "default_dispatch_policy.targets[0].url"
    assert store.types == {}
    allowed = EntityTypes(store, allow_private_webhooks=True)  # type: ignore[arg-type]
    _, created = await allowed.put(ALICE, "t", policy)
    assert created


async def test_a_type_from_before_owners_is_readable_by_anyone_and_missing_is_not_found() -> None:
    use_case, store = entity_types()
    store.types["old"] = EntityTypeRow("old", None, None, NOW, NOW)
    view = await use_case.get(BOB, "old")
    assert (view.name, view.default_dispatch_policy, view.owner_principal) == ("old", None, None)
    with pytest.raises(NotFound, match="entity type 'nope' does not exist"):
        await use_case.get(ALICE, "nope")
