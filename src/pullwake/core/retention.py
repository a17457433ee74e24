"""Retention: finished wakes and claims, acked messages and old events are deleted in batches.

What is never touched, whatever its age: ``dispatch_state`` (offsets, epochs), an entity's
outstanding wake, its active claim (and that claim's wake), its latest wake (the one
``inspect entity`` and a parked entity's dead letter point at) and inbox messages not yet acked.
Each batch is one short autocommit statement that locks only the rows it deletes
(``SKIP LOCKED``), so sends, claims and dones never wait behind a prune.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import timedelta

from pullwake.config import Settings
from pullwake.core.ports import Pruning
from pullwake.metrics import PRUNED

__all__ = ["TABLES", "WORKER_BUDGET_S", "Progress", "Retention", "RetentionReport", "prune_log"]

log = logging.getLogger(__name__)

TABLES = ("wakes", "claims", "inbox_messages", "entity_events")
"""The tables retention prunes, in the order a pass visits them."""

WORKER_BUDGET_S = 30.0
"""A worker pass stops after about this long (a periodic pass is abandoned after 60 s or more);
the next tick goes on where it stopped."""

Progress = Callable[[str, int], None]
"""Called after each full batch with the table and the rows removed from it so far."""


def _zero_counts() -> dict[str, int]:
    return dict.fromkeys(TABLES, 0)


@dataclass(slots=True)
class RetentionReport:
    """Rows removed per table by one pass (in a dry run: rows that would be removed)."""

    dry_run: bool = False
    rows: dict[str, int] = field(default_factory=_zero_counts)
    complete: bool = True
    """False when a time budget ended the pass before every table was done."""

    @property
    def total(self) -> int:
        """Rows removed (or removable) over every table."""
        return sum(self.rows.values())


def prune_log(rows: dict[str, int]) -> dict[str, int]:
    """Log the tables a pass removed rows from (nothing when it removed none); return them."""
    removed = {table: count for table, count in rows.items() if count}
    if removed:
        log.info("prune_retention: %s", removed)
    return removed


class Retention:
    """Prunes history older than ``PULLWAKE_RETENTION_MS`` (0: keeps everything)."""

    def __init__(self, store: Pruning, settings: Settings) -> None:
        self.store = store
        self.settings = settings

    @property
    def enabled(self) -> bool:
        """False when ``PULLWAKE_RETENTION_MS`` is 0 (history is kept for ever)."""
        return self.settings.retention_ms > 0

    async def prune(
        self,
        *,
        dry_run: bool = False,
        progress: Progress | None = None,
        budget_s: float | None = None,
    ) -> RetentionReport:
        """One pass over every table; a dry run counts what would go and deletes nothing.

        Tables take turns, one batch each, so a backlog in one never starves the others. With
        ``budget_s`` the pass stops after the batch that spends it (``complete`` is then False
        and the next pass carries on).
        """
        report = RetentionReport(dry_run=dry_run)
        if not self.enabled:
            return report
        window = timedelta(milliseconds=self.settings.retention_ms)
        if dry_run:
            await self._count(window, report)
            return report
        deadline = None if budget_s is None else time.monotonic() + budget_s
        busy = [self._wakes_batch, self._inbox_batch, self._events_batch]
        while busy:
            for step in list(busy):
                table, full = await step(window, report)
                if not full:
                    busy.remove(step)
                elif progress is not None:
                    progress(table, report.rows[table])
            if busy and deadline is not None and time.monotonic() >= deadline:
                report.complete = False
                break
        return report

    async def _count(self, window: timedelta, report: RetentionReport) -> None:
        wakes = await self.store.count_prunable_wakes(window)
        report.rows["wakes"], report.rows["claims"] = wakes.wakes, wakes.claims
        report.rows["inbox_messages"] = await self.store.count_prunable_inbox_messages(window)
        report.rows["entity_events"] = await self.store.count_prunable_entity_events(window)

    # Each batch is one autocommit statement; it returns (table, whether the batch was full).

    async def _wakes_batch(self, window: timedelta, report: RetentionReport) -> tuple[str, bool]:
        batch = self.settings.retention_batch
        removed = await self.store.prune_wakes(window, batch)
        self._count_removed(report, "claims", removed.claims)
        self._count_removed(report, "wakes", removed.wakes)
        return "wakes", removed.wakes >= batch

    async def _inbox_batch(self, window: timedelta, report: RetentionReport) -> tuple[str, bool]:
        batch = self.settings.retention_batch
        removed = await self.store.prune_inbox_messages(window, batch)
        self._count_removed(report, "inbox_messages", removed)
        return "inbox_messages", removed >= batch

    async def _events_batch(self, window: timedelta, report: RetentionReport) -> tuple[str, bool]:
        batch = self.settings.retention_batch
        removed = await self.store.prune_entity_events(window, batch)
        self._count_removed(report, "entity_events", removed)
        return "entity_events", removed >= batch

    @staticmethod
    def _count_removed(report: RetentionReport, table: str, removed: int) -> None:
        if removed:
            report.rows[table] += removed
            PRUNED.labels(table).inc(removed)
