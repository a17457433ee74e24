"""Typed reads of the worker's recovery passes (re-delivery, stream repair, hygiene) and the
delivery bookkeeping of published wakes that they read back."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any

from pullwake.store.access import QueryAccess
from pullwake.store.steps import NewWake

if TYPE_CHECKING:
    from pullwake.store.pg import Conn

__all__ = ["OutstandingWake", "RecoveryQueries", "StaleWake"]


@dataclass(frozen=True, slots=True)
class StaleWake:
    """A live unclaimed wake never published, or not claimed since its last publish."""

    id: str
    entity_url: str
    epoch: int
    reason: str
    created_at: datetime
    runner_id: str | None
    target: dict[str, Any]
    delivery_status: str
    stream_entry_id: str | None

    def to_wake(self, reason: str) -> NewWake:
        """This wake, to publish again (``reason`` says why)."""
        target_type = str(self.target["type"]) if self.target else "runner"
        return NewWake(
            self.id,
            self.entity_url,
            self.epoch,
            reason,
            self.created_at,
            self.runner_id,
            target_type,
        )


@dataclass(frozen=True, slots=True)
class OutstandingWake:
    """A runner's live unclaimed wake (queued or delivered)."""

    id: str
    entity_url: str
    epoch: int
    reason: str
    created_at: datetime
    runner_id: str | None
    stream_entry_id: str | None

    def to_wake(self, reason: str) -> NewWake:
        """This wake, to publish again to its runner (``reason`` says why)."""
        return NewWake(
            self.id, self.entity_url, self.epoch, reason, self.created_at, self.runner_id, "runner"
        )


class RecoveryQueries(QueryAccess):
    """What recovery reads, and the records of wake deliveries."""

    async def lock_stale_wakes(
        self, queued_after: timedelta, delivered_after: timedelta, limit: int
    ) -> list[StaleWake]:
        """Up to ``limit`` live unclaimed wakes queued for longer than ``queued_after`` or
        delivered longer than ``delivered_after`` ago, oldest first; they are stamped as
        re-delivered now in the same transaction, so another worker skips them."""

        async def work(conn: Conn) -> list[StaleWake]:
            rows = await conn.fetch("stale_wakes_lock", queued_after, delivered_after, limit)
            if rows:
                await conn.execute("wake_stamp_redelivery", [r["id"] for r in rows])
            return [StaleWake(**r) for r in rows]

        return await self.transact(work)

    async def runners_with_outstanding_wakes(self) -> list[str]:
        """The runners some live unclaimed wake targets."""
        return [r["runner_id"] for r in await self.fetch("runners_with_outstanding_wakes")]

    async def outstanding_wakes(self, runner_id: str) -> list[OutstandingWake]:
        """The runner's live unclaimed wakes, oldest first."""
        rows = await self.fetch("runner_outstanding_wakes", runner_id)
        return [OutstandingWake(**r) for r in rows]

    async def wake_is_wanted(self, wake_id: str) -> bool:
        """Whether the wake is still its entity's outstanding wake."""
        return bool(await self.fetchval("wake_is_wanted", wake_id))

    async def runner_ids(self) -> list[str]:
        """Every runner, by id."""
        return [r["id"] for r in await self.fetch("runner_ids")]

    async def mark_delivered(self, wake_ids: list[str], entry_ids: list[str]) -> None:
        """Record published wakes (``wake_ids[i]`` went out as stream entry ``entry_ids[i]``):
        a live one becomes delivered, one superseded or claimed meanwhile keeps its state."""
        await self.execute("wakes_mark_delivered", wake_ids, entry_ids)

    async def mark_publish_failed(self, wake_id: str, error: str) -> None:
        """Record a failed publish (the wake stays queued for re-delivery)."""
        await self.execute("wake_mark_publish_failed", wake_id, error)
