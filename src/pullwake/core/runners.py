"""Runner registry use cases: registration (per-principal cap), ownership and the cached access
check of the hot path, liveness heartbeats, admin status, deletion, health."""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from typing import Any

import msgspec

from pullwake.authcache import RUNNER, AuthCache
from pullwake.config import Settings
from pullwake.core.ports import RunnerStore
from pullwake.core.steps import NewWake, lease_interval, record, step_limits
from pullwake.errors import Forbidden, NotFound
from pullwake.metrics import WAKES_REDELIVERED
from pullwake.model import AdminStatus, Liveness, Principal, liveness
from pullwake.publish import Publisher, wake_entry
from pullwake.store.ops import RunnerBacklog, RunnerRow
from pullwake.store.runners import Registration
from pullwake.streams import WakeStreams
from pullwake.wire import RunnerHeartbeat, RunnerHeartbeatResponse, RunnerRegister, RunnerView

__all__ = ["RunnerAccess", "Runners", "health_issues", "runner_view", "sanitize_diagnostics"]

log = logging.getLogger(__name__)

_DIAG_KEY = re.compile(r"[A-Za-z_][A-Za-z0-9_.-]{0,63}")
_DIAG_MAX_LIST = 20
_DIAG_MAX_STRING = 500
_DIAG_MAX_BYTES = 8_192


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


def _liveness(runner: RunnerRow) -> Liveness:
    return liveness(runner.admin_status, runner.lease_expires_at, runner.now)


def runner_view(runner: RunnerRow) -> RunnerView:
    """The runner as returned to its owner."""
    return RunnerView(
        id=runner.id,
        owner_principal=runner.owner_principal,
        label=runner.label,
        kind=runner.kind,
        admin_status=runner.admin_status,
        liveness=_liveness(runner).value,
        last_seen_at=runner.last_seen_at,
        lease_expires_at=runner.lease_expires_at,
        created_at=runner.created_at,
        updated_at=runner.updated_at,
    )


@dataclass(frozen=True, slots=True)
class RunnerAccess:
    """What the hot path checks of a runner: who owns it and whether it is enabled (cached)."""

    owner_principal: str
    admin_status: str

    @property
    def enabled(self) -> bool:
        return self.admin_status == AdminStatus.ENABLED.value


def health_issues(
    runner: RunnerRow,
    state: Liveness,
    backlog: dict[str, Any],
    *,
    redeliver_after_ms: int,
) -> list[dict[str, str]]:
    """What is wrong with a runner (``backlog``: the health report's backlog section): each
    issue a code, a severity (``degraded`` or ``unhealthy``) and a message."""
    issues: list[dict[str, str]] = []

    def add(code: str, severity: str, message: str) -> None:
        issues.append({"code": code, "severity": severity, "message": message})

    if runner.admin_status != AdminStatus.ENABLED.value:
        add("disabled", "unhealthy", "runner is disabled; its wakes wait")
    elif state is Liveness.EXPIRED:
        add("liveness_expired", "unhealthy", "no heartbeat within the liveness lease")
    elif state is Liveness.OFFLINE:
        add("never_seen", "degraded", "runner has never sent a heartbeat")
    age = backlog["oldest_outstanding_wake_age_ms"]
    if age is not None and age > redeliver_after_ms:
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
    diagnostics = runner.diagnostics
    if isinstance(diagnostics, dict):
        if diagnostics.get("stream_connected") is False:
            add("stream_disconnected", "degraded", "runner reports its wake stream is down")
        reconnects = diagnostics.get("reconnect_count")
        if isinstance(reconnects, int) and reconnects > 5:
            add("many_reconnects", "degraded", f"runner reconnected {reconnects} times")
    return issues


def _backlog_section(backlog: RunnerBacklog, stream: dict[str, Any]) -> dict[str, Any]:
    oldest = backlog.oldest_outstanding_ms
    return {
        "outstanding_wakes": backlog.outstanding_wakes,
        "undelivered_wakes": backlog.undelivered_wakes,
        "parked_entities": backlog.parked_entities,
        "oldest_outstanding_wake_age_ms": None if oldest is None else int(oldest),
        "stream": stream,
    }


class Runners:
    """The runner registry over Postgres (truth), Redis (wake streams) and the auth cache."""

    def __init__(
        self,
        store: RunnerStore,
        streams: WakeStreams,
        publisher: Publisher,
        settings: Settings,
        cache: AuthCache,
    ) -> None:
        self.store = store
        self.streams = streams
        self.publisher = publisher
        self.settings = settings
        self.limits = step_limits(settings)
        self.cache = cache
        """Shared with :class:`~pullwake.core.tokens.Tokens`; in use only while a listener
        runs (the API's lifespan)."""

    # --- registration ------------------------------------------------------------------------

    async def register(self, principal: Principal, body: RunnerRegister) -> tuple[RunnerView, bool]:
        """Register or update; another owner's id (even a deleted one) ⇒ 403 ``FORBIDDEN``; never
        re-enables; past ``PULLWAKE_MAX_RUNNERS_PER_PRINCIPAL`` ⇒ 403 ``FORBIDDEN``."""
        cap = self.settings.max_runners_per_principal
        outcome = await self.store.register_runner(
            body.id, principal.key, body.label, body.kind, max_owned=cap
        )
        if outcome is Registration.OWNER_MISMATCH:
            raise Forbidden(f"runner {body.id!r} is owned by another principal")
        if outcome is Registration.AT_CAP:
            raise Forbidden(
                f"{principal.key} already has {cap} runners (PULLWAKE_MAX_RUNNERS_PER_PRINCIPAL);"
                " delete one or raise the limit"
            )
        created = outcome is Registration.CREATED
        if created:
            # A runner id that comes back (deleted, then registered again) gets its waiting work.
            await self._wake_waiting_entities(body.id)
        return await self.get(principal, body.id), created

    # --- ownership ---------------------------------------------------------------------------

    async def owned(self, principal: Principal, runner_id: str) -> RunnerRow:
        """The runner, read now, checking that ``principal`` owns it."""
        runner = await self._read(runner_id)
        if runner is None:
            raise NotFound(f"runner {runner_id!r} does not exist")
        if runner.owner_principal != principal.key:
            raise Forbidden(f"runner {runner_id!r} is owned by another principal")
        return runner

    async def access(
        self, principal: Principal, runner_id: str, *, since: int | None = None
    ) -> RunnerAccess:
        """The runner's owner and admin status, checking that ``principal`` owns it: what a
        claim, a wake stream and a runner heartbeat need, from the cache when it has them."""
        access: RunnerAccess | None = await self.cache.get(RUNNER + runner_id, since)
        if access is None:
            runner = await self._read(runner_id)
            if runner is None:
                raise NotFound(f"runner {runner_id!r} does not exist")
            access = RunnerAccess(runner.owner_principal, runner.admin_status)
        if access.owner_principal != principal.key:
            raise Forbidden(f"runner {runner_id!r} is owned by another principal")
        return access

    async def _read(self, runner_id: str) -> RunnerRow | None:
        """The runner; every read refreshes its cached access."""
        generation = self.cache.generation
        runner = await self.store.get_runner(runner_id)
        if runner is not None:
            access = RunnerAccess(runner.owner_principal, runner.admin_status)
            self.cache.put(RUNNER + runner_id, access, generation)
        return runner

    # --- reads -------------------------------------------------------------------------------

    async def get(self, principal: Principal, runner_id: str) -> RunnerView:
        return runner_view(await self.owned(principal, runner_id))

    async def list_owned(self, principal: Principal) -> list[RunnerView]:
        return [runner_view(r) for r in await self.store.list_runners(principal.key)]

    # --- liveness ----------------------------------------------------------------------------

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
        expires = await self.store.extend_runner_lease(
            runner_id, lease_interval(lease_ms), sanitize_diagnostics(body.diagnostics)
        )
        return RunnerHeartbeatResponse(
            ok=True, liveness=Liveness.ONLINE.value, lease_expires_at=expires
        )

    # --- admin status and deletion -----------------------------------------------------------

    async def set_admin_status(
        self, principal: Principal, runner_id: str, status: AdminStatus
    ) -> RunnerView:
        """Enable or disable; enabling re-publishes the runner's outstanding wakes."""
        await self.owned(principal, runner_id)
        await self.store.set_runner_admin_status(runner_id, status.value)
        self.cache.drop(RUNNER + runner_id)  # here at once; the trigger tells the other replicas
        if status is AdminStatus.ENABLED:
            await self.republish_outstanding(runner_id)
            await self._wake_waiting_entities(runner_id)
        return await self.get(principal, runner_id)

    async def republish_outstanding(self, runner_id: str) -> int:
        """XADD every outstanding wake of the runner again (duplicates are harmless)."""
        outstanding = await self.store.outstanding_wakes(runner_id)
        wakes = [w.to_wake(w.reason) for w in outstanding]
        await self.publisher.publish(wakes)
        WAKES_REDELIVERED.labels("runner_enabled").inc(len(wakes))
        return len(wakes)

    async def _wake_waiting_entities(self, runner_id: str) -> None:
        for url in await self.store.idle_pending_entities(runner_id):
            step = await self.store.wake_entity(url, "runner_registered")
            record(step)
            await self.publisher.publish([step.wake])

    async def delete(self, principal: Principal, runner_id: str) -> None:
        """Deregister: release its active claims, supersede its wakes, drop its stream."""
        await self.owned(principal, runner_id)
        claimed = await self.store.active_claim_entities(runner_id)
        waiting = await self.store.outstanding_wakes(runner_id)
        for url in {*claimed, *(w.entity_url for w in waiting)}:
            record(await self.store.detach_runner(url, runner_id, self.limits))
        await self.store.delete_runner(runner_id)
        self.cache.drop(RUNNER + runner_id)  # here at once; the trigger tells the other replicas
        try:
            await self.streams.delete(runner_id)
        except Exception as exc:
            log.warning("could not delete the stream of runner %s: %s", runner_id, exc)

    # --- health ------------------------------------------------------------------------------

    async def health(self, principal: Principal, runner_id: str) -> dict[str, Any]:
        """Liveness, active claims, backlog, diagnostics and an overall verdict with issues."""
        runner = await self.owned(principal, runner_id)
        state = _liveness(runner)
        counts = await self.store.runner_backlog(runner_id)
        try:
            info = await self.streams.info(runner_id)
            stream: dict[str, Any] = {
                "length": info.length,
                "pending": info.pending,
                "consumers": info.consumers,
            }
        except Exception as exc:
            stream = {"error": f"Redis unavailable: {type(exc).__name__}"}
        backlog = _backlog_section(counts, stream)
        issues = health_issues(
            runner, state, backlog, redeliver_after_ms=self.settings.redeliver_after_ms
        )
        status = "healthy"
        if any(i["severity"] == "unhealthy" for i in issues):
            status = "unhealthy"
        elif issues:
            status = "degraded"
        return {
            "runner_id": runner_id,
            "admin_status": runner.admin_status,
            "liveness": state.value,
            "last_seen_at": runner.last_seen_at,
            "lease_expires_at": runner.lease_expires_at,
            "active_claims": counts.active_claims,
            "backlog": backlog,
            "diagnostics": runner.diagnostics,
            "health": {"status": status, "issues": issues},
        }

    # --- tools -------------------------------------------------------------------------------

    async def stream_entry_for(self, runner_id: str, wake: NewWake) -> str:
        """Publish one wake now (used by tools); returns the entry id."""
        return await self.streams.publish(runner_id, wake_entry(wake))
