"""Typed queries of the runner registry: registration (id reservation, per-principal cap),
listing, liveness leases, admin status, deletion, and the entities and claims a runner holds.

The runner itself and its backlog are read by :meth:`~pullwake.store.ops.OpsQueries.get_runner`
and :meth:`~pullwake.store.ops.OpsQueries.runner_backlog`, its outstanding wakes by
:meth:`~pullwake.store.recovery.RecoveryQueries.outstanding_wakes`."""

from __future__ import annotations

import enum
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any

from pullwake.store.access import QueryAccess
from pullwake.store.ops import RunnerRow

if TYPE_CHECKING:
    from pullwake.store.pg import Conn

__all__ = ["Registration", "RunnerQueries"]


class Registration(enum.Enum):
    """What :meth:`RunnerQueries.register_runner` did."""

    CREATED = "created"
    UPDATED = "updated"
    """The caller's runner existed: its label and kind were updated."""
    OWNER_MISMATCH = "owner_mismatch"
    """The id is (or was, before a delete) another principal's: nothing changed."""
    AT_CAP = "at_cap"
    """The principal already owns the most runners it may: nothing changed."""


class _Refused(Exception):
    """Rolls a registration back (the id reservation included) and says why."""

    def __init__(self, outcome: Registration) -> None:
        self.outcome = outcome


class RunnerQueries(QueryAccess):
    """Runner registration, liveness, admin status and deletion."""

    async def register_runner(
        self, runner_id: str, owner: str, label: str, kind: str, *, max_owned: int
    ) -> Registration:
        """Register or update in one transaction: the id is reserved for its first owner for
        good (even once deleted); an update never re-enables; a new runner is counted against
        ``max_owned`` under the owner's advisory lock (so concurrent registrations cannot both
        pass the cap). A refusal rolls back, the id reservation included."""

        async def work(conn: Conn) -> Registration:
            reserved_for = await conn.fetchval("runner_id_reserve", runner_id, owner)
            if reserved_for != owner:
                raise _Refused(Registration.OWNER_MISMATCH)
            updated = await conn.fetchval("runner_update_meta", runner_id, owner, label, kind)
            if updated is not None:
                return Registration.UPDATED
            await conn.fetchval("principal_lock", owner)
            if await conn.fetchval("runner_count_owned", owner) >= max_owned:
                raise _Refused(Registration.AT_CAP)
            await conn.fetchval("runner_insert", runner_id, owner, label, kind)
            return Registration.CREATED

        try:
            return await self.transact(work)
        except _Refused as refused:
            return refused.outcome

    async def list_runners(self, owner: str) -> list[RunnerRow]:
        """The runners ``owner`` owns, by id, with their liveness leases."""
        return [RunnerRow(**r) for r in await self.fetch("runner_list", owner)]

    async def extend_runner_lease(
        self, runner_id: str, lease: timedelta, diagnostics: dict[str, Any] | None
    ) -> datetime:
        """The runner was seen now: its liveness lease runs ``lease`` from now; its
        diagnostics are replaced unless ``diagnostics`` is None. Returns the lease's end."""
        expires: datetime = await self.fetchval(
            "runner_liveness_upsert", runner_id, lease, diagnostics
        )
        return expires

    async def set_runner_admin_status(self, runner_id: str, admin_status: str) -> bool:
        """Enable or disable (False: no such runner)."""
        return await self.fetchval("runner_set_admin_status", runner_id, admin_status) is not None

    async def delete_runner(self, runner_id: str) -> bool:
        """Delete the runner row (its id stays reserved for its owner); False: no such runner."""
        return await self.fetchval("runner_delete", runner_id) is not None

    async def active_claim_entities(self, runner_id: str) -> list[str]:
        """The entities the runner holds an active claim of."""
        rows = await self.fetch("runner_active_claim_entities", runner_id)
        return [r["entity_url"] for r in rows]

    async def idle_pending_entities(self, runner_id: str) -> list[str]:
        """The runner's entities with pending work but no wake and no claim (nor parked,
        paused or finished): they wait for a wake the runner's return should create."""
        rows = await self.fetch("runner_idle_pending_entities", runner_id)
        return [r["entity_url"] for r in rows]
