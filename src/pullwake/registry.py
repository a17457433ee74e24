"""Runners, entity types and API tokens: registration, ownership, liveness and health."""

from __future__ import annotations

import asyncio
import logging
import re
import secrets
from dataclasses import dataclass
from typing import Any

import msgspec

from pullwake.authcache import RUNNER, TOKEN, AuthCache
from pullwake.config import Settings
from pullwake.core.steps import NewWake, lease_interval, record, step_limits
from pullwake.errors import Forbidden, NotFound, OwnerMismatch
from pullwake.model import (
    AdminStatus,
    Liveness,
    Principal,
    hash_token,
    liveness_of,
    new_id,
)
from pullwake.publish import Publisher, wake_entry
from pullwake.store import Conn, Store
from pullwake.streams import WakeStreams
from pullwake.wire import (
    DispatchPolicy,
    EntityTypeView,
    RunnerHeartbeat,
    RunnerHeartbeatResponse,
    RunnerRegister,
    RunnerView,
)

__all__ = ["Registry", "RunnerAccess", "liveness_of", "sanitize_diagnostics"]

log = logging.getLogger(__name__)

_DIAG_KEY = re.compile(r"[A-Za-z_][A-Za-z0-9_.-]{0,63}")
_DIAG_MAX_LIST = 20
_DIAG_MAX_STRING = 500
_DIAG_MAX_BYTES = 8_192
_TOUCH_EVERY_NS = 60 * 1_000_000_000  # last_used_at is recorded about once a minute per token


def sanitize_diagnostics(raw: dict[str, Any] | None) -> dict[str, Any] | None:
    """Keep only well-named scalar (or short scalar list) values; None when nothing is left."""
    if not raw:
        return None
    clean: dict[str, Any] = {}
    for key, value in raw.items():
        if not _DIAG_KEY.fullmatch(key):
            continue
        if isinstance(value, str):
            clean[key] = value[:_DIAG_MAX_STRING]
        elif isinstance(value, bool | int | float) or value is None:
            clean[key] = value
        elif isinstance(value, list) and len(value) <= _DIAG_MAX_LIST:
            items = [
                v[:_DIAG_MAX_STRING] if isinstance(v, str) else v
                for v in value
                if isinstance(v, str | bool | int | float)
            ]
            if len(items) == len(value):
                clean[key] = items
        elif isinstance(value, dict):
            nested = {
                k: v
                for k, v in value.items()
                if isinstance(k, str)
                and _DIAG_KEY.fullmatch(k)
                and isinstance(v, bool | int | float)
            }
            if nested:
                clean[key] = nested
    while clean and len(msgspec.json.encode(clean)) > _DIAG_MAX_BYTES:
        clean.popitem()
    return clean or None


def _runner_view(row: Any) -> RunnerView:
    return RunnerView(
        id=row["id"],
        owner_principal=row["owner_principal"],
        label=row["label"],
        kind=row["kind"],
        admin_status=row["admin_status"],
        liveness=liveness_of(row).value,
        last_seen_at=row["last_seen_at"],
        lease_expires_at=row["lease_expires_at"],
        created_at=row["created_at"],
        updated_at=row["updated_at"],
    )


@dataclass(frozen=True, slots=True)
class RunnerAccess:
    """What the hot path checks of a runner: who owns it and whether it is enabled (cached)."""

    owner_principal: str
    admin_status: str

    @property
    def enabled(self) -> bool:
        return self.admin_status == AdminStatus.ENABLED.value


@dataclass(slots=True)
class _CachedToken:
    id: str
    principal: Principal
    recorded_at: int
    """When this process last recorded the token's use (``time.monotonic_ns``)."""


class Registry:
    """Runner registry, entity types and API tokens."""

    def __init__(
        self,
        store: Store,
        streams: WakeStreams,
        publisher: Publisher,
        settings: Settings,
        cache: AuthCache | None = None,
    ):
        self.store = store
        self.streams = streams
        self.publisher = publisher
        self.settings = settings
        self.limits = step_limits(settings)
        self.cache = cache or AuthCache.from_settings(settings)
        """Tokens and runner access; in use only while a listener runs (the API's lifespan)."""
        self._touch_ids: set[str] = set()
        self._touch_task: asyncio.Task[None] | None = None

    # --- tokens ------------------------------------------------------------------------------

    async def create_token(self, principal: Principal, label: str) -> tuple[str, Any]:
        """Mint a ``pwk_`` API token; only its hash is stored. Returns (raw token, row)."""
        raw = "pwk_" + secrets.token_urlsafe(32)
        row = await self.store.fetchrow(
            "token_insert", new_id("tok"), principal.key, hash_token(raw), label
        )
        return raw, row

    async def authenticate_token(self, raw: str, *, since: int | None = None) -> Principal | None:
        """The principal of a live API token, or None.

        A cache hit costs no lookup (see :mod:`pullwake.authcache`; ``since`` is when the request
        came in); a miss looks the token up and records its use when the last record is a minute
        old. A hit records it too, at most once a minute, in the background."""
        token_hash = hash_token(raw)
        key = TOKEN + token_hash
        cached: _CachedToken | None = await self.cache.get(key, since)
        if cached is not None:
            now = self.cache.clock()
            if now - cached.recorded_at >= _TOUCH_EVERY_NS:
                cached.recorded_at = now
                self._touch_later(cached.id)
            return cached.principal
        generation = self.cache.generation
        row = await self.store.fetchrow("token_lookup", token_hash)
        if row is None or row["revoked_at"] is not None:
            return None
        if row["touch_due"]:
            await self.store.execute("token_touch", row["id"])
        principal = Principal.parse(row["principal"])
        self.cache.put(key, _CachedToken(row["id"], principal, self.cache.clock()), generation)
        return principal

    def _touch_later(self, token_id: str) -> None:
        self._touch_ids.add(token_id)
        if self._touch_task is None or self._touch_task.done():
            self._touch_task = asyncio.create_task(self._record_uses())

    async def _record_uses(self) -> None:
        """One UPDATE for every cached token whose use is due to be recorded (fire and forget:
        a failure only leaves ``last_used_at`` a little older)."""
        while self._touch_ids:
            ids = sorted(self._touch_ids)
            self._touch_ids.clear()
            try:
                await self.store.execute("token_touch_batch", ids)
            except Exception as exc:
                log.warning("could not record the use of %d API tokens: %s", len(ids), exc)

    async def list_tokens(self, principal: str | None = None) -> list[Any]:
        return await self.store.fetch("token_list", principal)

    async def revoke_token(self, token_id: str) -> Any:
        """Revoke at once: the database trigger tells every API process to forget the token."""
        row = await self.store.fetchrow("token_revoke", token_id)
        if row is None:
            raise NotFound(f"token {token_id!r} does not exist")
        return row

    # --- runners -----------------------------------------------------------------------------

    async def register(self, principal: Principal, body: RunnerRegister) -> tuple[RunnerView, bool]:
        """Register or update; another owner's id (even a deleted one) ⇒ OWNER_MISMATCH; never
        re-enables; past ``PULLWAKE_MAX_RUNNERS_PER_PRINCIPAL`` ⇒ 403 ``FORBIDDEN``."""

        async def work(conn: Conn) -> bool:
            owner = await conn.fetchval("runner_id_reserve", body.id, principal.key)
            if owner != principal.key:
                raise OwnerMismatch(f"runner {body.id!r} is owned by another principal")
            updated = await conn.fetchval(
                "runner_update_meta", body.id, principal.key, body.label, body.kind
            )
            if updated is not None:
                return False
            await self._check_runner_cap(conn, principal)
            await conn.fetchval("runner_insert", body.id, principal.key, body.label, body.kind)
            return True

        created = await self.store.transact(work)
        if created:
            # A runner id that comes back (deleted, then registered again) gets its waiting work.
            await self._wake_waiting_entities(body.id)
        return await self.get(principal, body.id), created

    async def _check_runner_cap(self, conn: Conn, principal: Principal) -> None:
        cap = self.settings.max_runners_per_principal
        await conn.fetchval("principal_lock", principal.key)
        if await conn.fetchval("runner_count_owned", principal.key) >= cap:
            raise Forbidden(
                f"{principal.key} already has {cap} runners (PULLWAKE_MAX_RUNNERS_PER_PRINCIPAL);"
                " delete one or raise the limit"
            )

    async def owned(self, principal: Principal, runner_id: str) -> Any:
        """The runner row, read now, checking that ``principal`` owns it."""
        row = await self._runner_row(runner_id)
        if row is None:
            raise NotFound(f"runner {runner_id!r} does not exist")
        if row["owner_principal"] != principal.key:
            raise OwnerMismatch(f"runner {runner_id!r} is owned by another principal")
        return row

    async def access(
        self, principal: Principal, runner_id: str, *, since: int | None = None
    ) -> RunnerAccess:
        """The runner's owner and admin status, checking that ``principal`` owns it: what a
        claim, a wake stream and a runner heartbeat need, from the cache when it has them."""
        access: RunnerAccess | None = await self.cache.get(RUNNER + runner_id, since)
        if access is None:
            row = await self._runner_row(runner_id)
            if row is None:
                raise NotFound(f"runner {runner_id!r} does not exist")
            access = RunnerAccess(row["owner_principal"], row["admin_status"])
        if access.owner_principal != principal.key:
            raise OwnerMismatch(f"runner {runner_id!r} is owned by another principal")
        return access

    async def _runner_row(self, runner_id: str) -> Any:
        """The runner row; every read refreshes its cached access."""
        generation = self.cache.generation
        row = await self.store.fetchrow("runner_get", runner_id)
        if row is not None:
            access = RunnerAccess(row["owner_principal"], row["admin_status"])
            self.cache.put(RUNNER + runner_id, access, generation)
        return row

    async def get(self, principal: Principal, runner_id: str) -> RunnerView:
        return _runner_view(await self.owned(principal, runner_id))

    async def list_owned(self, principal: Principal) -> list[RunnerView]:
        return [_runner_view(r) for r in await self.store.fetch("runner_list", principal.key)]

    async def heartbeat(
        self,
        principal: Principal,
        runner_id: str,
        body: RunnerHeartbeat,
        *,
        since: int | None = None,
    ) -> RunnerHeartbeatResponse:
        """Extend the liveness lease and store sanitized diagnostics."""
        await self.access(principal, runner_id, since=since)
        lease_ms = min(
            body.lease_ms or self.settings.runner_lease_ms, self.settings.max_runner_lease_ms
        )
        expires = await self.store.fetchval(
            "runner_liveness_upsert",
            runner_id,
            lease_interval(lease_ms),
            sanitize_diagnostics(body.diagnostics),
        )
        return RunnerHeartbeatResponse(
            ok=True, liveness=Liveness.ONLINE.value, lease_expires_at=expires
        )

    async def set_admin_status(
        self, principal: Principal, runner_id: str, status: AdminStatus
    ) -> RunnerView:
        """Enable or disable; enabling re-publishes the runner's outstanding wakes."""
        await self.owned(principal, runner_id)
        await self.store.execute("runner_set_admin_status", runner_id, status.value)
        self.cache.drop(RUNNER + runner_id)  # here at once; the trigger tells the other replicas
        if status is AdminStatus.ENABLED:
            await self.republish_outstanding(runner_id)
            await self._wake_waiting_entities(runner_id)
        return await self.get(principal, runner_id)

    async def republish_outstanding(self, runner_id: str) -> int:
        """XADD every outstanding wake of the runner again (duplicates are harmless)."""
        rows = await self.store.fetch("runner_outstanding_wakes", runner_id)
        wakes = [NewWake.from_row(r, r["reason"]) for r in rows]
        await self.publisher.publish(wakes)
        return len(wakes)

    async def _wake_waiting_entities(self, runner_id: str) -> None:
        rows = await self.store.fetch("runner_idle_pending_entities", runner_id)
        for row in rows:
            step = await self.store.wake_entity(row["entity_url"], "runner_registered")
            await self.publisher.publish([step.wake])

    async def delete(self, principal: Principal, runner_id: str) -> None:
        """Deregister: release its active claims, supersede its wakes, drop its stream."""
        await self.owned(principal, runner_id)
        claimed = await self.store.fetch("runner_active_claim_entities", runner_id)
        waiting = await self.store.fetch("runner_outstanding_wakes", runner_id)
        for url in {row["entity_url"] for row in [*claimed, *waiting]}:
            record(await self.store.detach_runner(url, runner_id, self.limits))
        await self.store.execute("runner_delete", runner_id)
        self.cache.drop(RUNNER + runner_id)  # here at once; the trigger tells the other replicas
        try:
            await self.streams.delete(runner_id)
        except Exception as exc:
            log.warning("could not delete the stream of runner %s: %s", runner_id, exc)

    async def health(self, principal: Principal, runner_id: str) -> dict[str, Any]:
        """Liveness, active claims, backlog, diagnostics and an overall verdict with issues."""
        row = await self.owned(principal, runner_id)
        liveness = liveness_of(row)
        backlog_row = await self.store.fetchrow("runner_backlog", runner_id)
        assert backlog_row is not None
        try:
            info = await self.streams.info(runner_id)
            stream: dict[str, Any] = {
                "length": info.length,
                "pending": info.pending,
                "consumers": info.consumers,
            }
        except Exception as exc:
            stream = {"error": f"Redis unavailable: {type(exc).__name__}"}
        oldest = backlog_row["oldest_outstanding_ms"]
        backlog = {
            "outstanding_wakes": backlog_row["outstanding_wakes"],
            "undelivered_wakes": backlog_row["undelivered_wakes"],
            "parked_entities": backlog_row["parked_entities"],
            "oldest_outstanding_wake_age_ms": None if oldest is None else int(oldest),
            "stream": stream,
        }
        diagnostics = row["diagnostics"]
        issues = self._issues(row, liveness, backlog, diagnostics)
        status = "healthy"
        if any(i["severity"] == "unhealthy" for i in issues):
            status = "unhealthy"
        elif issues:
            status = "degraded"
        return {
            "runner_id": runner_id,
            "admin_status": row["admin_status"],
            "liveness": liveness.value,
            "last_seen_at": row["last_seen_at"],
            "lease_expires_at": row["lease_expires_at"],
            "active_claims": backlog_row["active_claims"],
            "backlog": backlog,
            "diagnostics": diagnostics,
            "health": {"status": status, "issues": issues},
        }

    def _issues(
        self, row: Any, liveness: Liveness, backlog: dict[str, Any], diagnostics: Any
    ) -> list[dict[str, str]]:
        issues: list[dict[str, str]] = []

        def add(code: str, severity: str, message: str) -> None:
            issues.append({"code": code, "severity": severity, "message": message})

        if row["admin_status"] != AdminStatus.ENABLED.value:
            add("disabled", "unhealthy", "runner is disabled; its wakes wait")
        elif liveness is Liveness.EXPIRED:
            add("liveness_expired", "unhealthy", "no heartbeat within the liveness lease")
        elif liveness is Liveness.OFFLINE:
            add("never_seen", "degraded", "runner has never sent a heartbeat")
        age = backlog["oldest_outstanding_wake_age_ms"]
        if age is not None and age > self.settings.redeliver_after_ms:
            add("stale_wakes", "degraded", f"oldest unclaimed wake is {age} ms old")
        if backlog["parked_entities"]:
            add(
                "parked_entities",
                "degraded",
                f"{backlog['parked_entities']} entities parked (poison work); "
                "see GET /v1/entities/{type}/{id} and signal resume",
            )
        if backlog["undelivered_wakes"]:
            add("undelivered_wakes", "degraded", "some wakes are not in Redis yet")
        if "error" in backlog["stream"]:
            add("redis_unavailable", "degraded", backlog["stream"]["error"])
        if isinstance(diagnostics, dict):
            if diagnostics.get("stream_connected") is False:
                add("stream_disconnected", "degraded", "runner reports its wake stream is down")
            reconnects = diagnostics.get("reconnect_count")
            if isinstance(reconnects, int) and reconnects > 5:
                add("many_reconnects", "degraded", f"runner reconnected {reconnects} times")
        return issues

    # --- entity types ------------------------------------------------------------------------

    async def put_entity_type(
        self, principal: Principal, name: str, policy: DispatchPolicy | None
    ) -> tuple[EntityTypeView, bool]:
        """Create or replace an entity type's default policy; only its owner may change it."""
        raw = None if policy is None else msgspec.to_builtins(policy)
        row = await self.store.fetchrow("entity_type_upsert", name, raw, principal.key)
        if row is None:
            raise OwnerMismatch(f"entity type {name!r} is owned by another principal")
        return _type_view(row), bool(row["inserted"])

    async def get_entity_type(self, principal: Principal, name: str) -> EntityTypeView:
        """The type, for its owner (anyone may read a type from before owners existed)."""
        row = await self.store.fetchrow("entity_type_get", name)
        if row is None:
            raise NotFound(f"entity type {name!r} does not exist")
        if row["owner_principal"] not in (None, principal.key):
            raise OwnerMismatch(f"entity type {name!r} is owned by another principal")
        return _type_view(row)

    async def stream_entry_for(self, runner_id: str, wake: NewWake) -> str:
        """Publish one wake now (used by tools); returns the entry id."""
        return await self.streams.publish(runner_id, wake_entry(wake))


def _type_view(row: Any) -> EntityTypeView:
    policy = row["default_dispatch_policy"]
    if policy is not None:
        policy = {
            "targets": [{k: v for k, v in t.items() if k != "secret"} for t in policy["targets"]]
        }
    return EntityTypeView(
        row["name"], policy, row["created_at"], row["updated_at"], row["owner_principal"]
    )
