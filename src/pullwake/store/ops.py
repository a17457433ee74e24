"""Typed reads for operators (``/metrics``, ``pullwake inspect``, worker status) and the
runner checks of entity creation."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from pullwake.store.access import QueryAccess

__all__ = [
    "EntityCounts",
    "OpsQueries",
    "RunnerBacklog",
    "RunnerGauges",
    "RunnerRow",
    "StuckClaim",
    "StuckEntity",
    "StuckRunner",
    "StuckWake",
    "WakeSummary",
    "WorkerStatus",
]


def _float(value: Any) -> float | None:
    """``extract(epoch ...)`` is numeric (a Decimal) since Postgres 14."""
    return None if value is None else float(value)


@dataclass(frozen=True, slots=True)
class RunnerRow:
    """A runner with its liveness lease (``now``: the database's clock, to compare it)."""

    id: str
    owner_principal: str
    label: str
    kind: str
    admin_status: str
    created_at: datetime
    updated_at: datetime
    last_seen_at: datetime | None
    lease_expires_at: datetime | None
    diagnostics: dict[str, Any] | None
    now: datetime


@dataclass(frozen=True, slots=True)
class RunnerBacklog:
    """What a runner has to do and holds."""

    active_claims: int
    outstanding_wakes: int
    oldest_outstanding_ms: float | None
    undelivered_wakes: int
    parked_entities: int


@dataclass(frozen=True, slots=True)
class WakeSummary:
    """One line of an entity's wake history."""

    id: str
    epoch: int
    reason: str
    delivery_status: str
    claim_status: str
    created_at: datetime


@dataclass(frozen=True, slots=True)
class RunnerGauges:
    """One of the top runners by backlog (``id`` set, ``runners`` 1), or the rest of the runners
    of one liveness state summed (``id`` None), for ``/metrics``."""

    id: str | None
    liveness: str
    runners: int
    outstanding_wakes: int
    oldest_wake_age_s: float | None
    active_claims: int


@dataclass(frozen=True, slots=True)
class EntityCounts:
    """Entities of one status, for ``/metrics``."""

    status: str
    entities: int
    parked: int
    with_pending: int
    pending_messages: int


@dataclass(frozen=True, slots=True)
class StuckWake:
    """A live wake still unclaimed past the threshold (``pullwake inspect stuck``)."""

    id: str
    entity_url: str
    runner_id: str | None
    target_type: str | None
    epoch: int
    reason: str
    delivery_status: str
    attempts: int
    stream_entry_id: str | None
    parked: bool
    age_s: float
    delivered_age_s: float | None


@dataclass(frozen=True, slots=True)
class StuckClaim:
    """An active claim whose lease passed or is about to (``lease_left_s`` < 0: passed)."""

    id: str
    entity_url: str
    runner_id: str | None
    epoch: int
    held_s: float
    lease_left_s: float
    heartbeat_age_s: float | None


@dataclass(frozen=True, slots=True)
class StuckEntity:
    """An entity whose dispatch is parked."""

    entity_url: str
    status: str
    parked_reason: str
    failed_attempts: int
    pending_messages: int
    target_runner_id: str | None
    last_error: str | None
    since_s: float


@dataclass(frozen=True, slots=True)
class StuckRunner:
    """A runner that is not online while wakes wait for it."""

    id: str
    admin_status: str
    liveness: str
    expired_s: float | None
    seen_age_s: float | None
    outstanding_wakes: int
    oldest_wake_age_s: float


@dataclass(frozen=True, slots=True)
class WorkerStatus:
    """A worker process's last recorded status (``silent``: it missed about five probes)."""

    worker_id: str
    redis_ok: bool
    failing_jobs: list[str]
    last_recovery_at: datetime | None
    seen_age_s: float
    silent: bool


class OpsQueries(QueryAccess):
    """Operator reads and the worker's status rows."""

    # --- runners and entities (inspect, entity creation) ---------------------------------

    async def get_runner(self, runner_id: str) -> RunnerRow | None:
        """The runner ``runner_id`` with its liveness lease (None: no such runner)."""
        row = await self.fetchrow("runner_get", runner_id)
        return None if row is None else RunnerRow(**row)

    async def runner_backlog(self, runner_id: str) -> RunnerBacklog:
        """Active claims, outstanding wakes and parked entities of a runner."""
        row = await self.fetchrow("runner_backlog", runner_id)
        assert row is not None
        return RunnerBacklog(
            active_claims=row["active_claims"],
            outstanding_wakes=row["outstanding_wakes"],
            oldest_outstanding_ms=_float(row["oldest_outstanding_ms"]),
            undelivered_wakes=row["undelivered_wakes"],
            parked_entities=row["parked_entities"],
        )

    async def last_wakes(self, url: str, limit: int) -> list[WakeSummary]:
        """The entity's latest ``limit`` wakes, newest first."""
        return [WakeSummary(**r) for r in await self.fetch("entity_last_wakes", url, limit)]

    # --- pullwake inspect stuck: one query per section -------------------------------------

    # ``viewer`` (a principal key, the dashboard's caller): only the entities it may see and
    # the runners it owns; None (the CLI, an operator): everything.

    async def stuck_wakes(
        self, older_than: timedelta, limit: int, viewer: str | None = None
    ) -> list[StuckWake]:
        """Live wakes unclaimed for longer than ``older_than``, oldest first."""
        rows = await self.fetch("stuck_wakes", older_than, limit, viewer)
        return [StuckWake(**r) for r in rows]

    async def stuck_claims(
        self, margin: timedelta, limit: int, viewer: str | None = None
    ) -> list[StuckClaim]:
        """Active claims whose lease passed or passes within ``margin``, soonest first."""
        return [StuckClaim(**r) for r in await self.fetch("stuck_claims", margin, limit, viewer)]

    async def parked_entities(self, limit: int, viewer: str | None = None) -> list[StuckEntity]:
        """Entities whose dispatch is parked, longest parked first."""
        rows = await self.fetch("stuck_parked_entities", limit, viewer)
        return [StuckEntity(**r) for r in rows]

    async def stuck_runners(self, limit: int, viewer: str | None = None) -> list[StuckRunner]:
        """Runners not online with wakes waiting, the longest waiting first."""
        return [StuckRunner(**r) for r in await self.fetch("stuck_runners", limit, viewer)]

    # --- /metrics ------------------------------------------------------------------------

    async def runner_gauges(self, top: int) -> list[RunnerGauges]:
        """The ``top`` runners with the most unclaimed wakes (then the oldest, then by id), one
        row each; every other runner summed into one row per liveness state (id None)."""
        return [
            RunnerGauges(
                id=r["id"],
                liveness=r["liveness"],
                runners=r["runners"],
                outstanding_wakes=r["outstanding_wakes"],
                oldest_wake_age_s=_float(r["oldest_wake_age_s"]),
                active_claims=r["active_claims"],
            )
            for r in await self.fetch("metrics_runners", top)
        ]

    async def entity_counts(self) -> list[EntityCounts]:
        """Entities, parked ones and pending messages, per status (statuses with none left
        out)."""
        return [
            EntityCounts(
                status=r["status"],
                entities=r["entities"],
                parked=r["parked"],
                with_pending=r["with_pending"],
                pending_messages=int(r["pending_messages"]),
            )
            for r in await self.fetch("metrics_entities")
        ]

    async def dead_letters(self) -> int:
        """Wakes whose delivery failed for good."""
        count: int = await self.fetchval("metrics_dead_letters")
        return count

    # --- worker status -------------------------------------------------------------------

    async def worker_statuses(self, limit: int) -> list[WorkerStatus]:
        """Up to ``limit`` workers' status, most recently seen first."""
        return [WorkerStatus(**r) for r in await self.fetch("metrics_workers", limit)]

    async def record_worker_status(
        self,
        worker_id: str,
        *,
        host: str,
        pid: int,
        interval_ms: int,
        redis_ok: bool,
        failing_jobs: list[str],
        last_recovery_at: datetime | None,
    ) -> None:
        """Upsert a worker's status row (``seen_at`` becomes now)."""
        await self.execute(
            "worker_status_record",
            worker_id,
            host,
            pid,
            interval_ms,
            redis_ok,
            failing_jobs,
            last_recovery_at,
        )

    async def forget_workers(self, silent_for: timedelta) -> None:
        """Delete the status rows of workers not seen for ``silent_for``."""
        await self.execute("worker_status_prune", silent_for)

    async def remove_worker_status(self, worker_id: str) -> None:
        """Delete a worker's status row (it is stopping)."""
        await self.execute("worker_status_remove", worker_id)
