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
    parked: bool = False
    """Re-delivery found its entry unread and leaves it alone until a reader shows up."""

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

    async def park_unread(self, wakes: list[tuple[str, str]]) -> None:
        """Park wakes ``(wake id, entry id)`` whose entry re-delivery found unread: it passes
        over them while that entry is their last publish."""
        await self.execute("wakes_park_unread", [w for w, _ in wakes], [e for _, e in wakes])

    async def unpark(self, wake_ids: list[str]) -> None:
        """Re-delivery looks at these parked wakes again (``redeliver_after`` from now)."""
        await self.execute("wakes_unpark", wake_ids)

    async def sweep_outstanding_wakes(
        self, after: str, runners: int
    ) -> dict[str, list[OutstandingWake]]:
        """The live unclaimed wakes of the first ``runners`` runners (by id) after ``after``
        that have any, by runner in id order, oldest first."""
        return _by_runner(await self.fetch("sweep_outstanding_wakes", after, runners))

    async def runners_outstanding_wakes(
        self, runner_ids: list[str]
    ) -> dict[str, list[OutstandingWake]]:
        """The live unclaimed wakes of these runners (those that have any), oldest first."""
        return _by_runner(await self.fetch("runners_outstanding_wakes", runner_ids))

    async def count_runners_with_outstanding_wakes(self) -> int:
        """How many runners some live unclaimed wake targets."""
        return int(await self.fetchval("runners_with_outstanding_wakes_count"))

    async def outstanding_wakes(self, runner_id: str) -> list[OutstandingWake]:
        """The runner's live unclaimed wakes, oldest first."""
        rows = await self.fetch("runner_outstanding_wakes", runner_id)
        return [OutstandingWake(**r) for r in rows]

    async def wake_is_wanted(self, wake_id: str) -> bool:
        """Whether the wake is still its entity's outstanding wake."""
        return bool(await self.fetchval("wake_is_wanted", wake_id))

    async def runner_ids_after(self, after: str, limit: int) -> list[str]:
        """Up to ``limit`` runner ids after ``after``, in order."""
        return [r["id"] for r in await self.fetch("runner_ids_after", after, limit)]

    async def count_runners(self) -> int:
        """How many runners are registered."""
        return int(await self.fetchval("runner_count"))

    async def mark_delivered(self, wake_ids: list[str], entry_ids: list[str]) -> None:
        """Record published wakes (``wake_ids[i]`` went out as stream entry ``entry_ids[i]``):
        a live one becomes delivered, one superseded or claimed meanwhile keeps its state."""
        await self.execute("wakes_mark_delivered", wake_ids, entry_ids)

    async def mark_publish_failed(self, wake_id: str, error: str) -> None:
        """Record a failed publish (the wake stays queued for re-delivery)."""
        await self.execute("wake_mark_publish_failed", wake_id, error)


def _by_runner(rows: list[Any]) -> dict[str, list[OutstandingWake]]:
    found: dict[str, list[OutstandingWake]] = {}
    for row in rows:
        found.setdefault(row["runner_id"], []).append(OutstandingWake(**row))
    return found
