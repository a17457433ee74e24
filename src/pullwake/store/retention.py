"""Typed retention statements: each prune is one autocommit batch that locks only the rows it
deletes (``SKIP LOCKED``); each count is what a dry run reports."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import timedelta

from pullwake.store.access import QueryAccess

__all__ = ["PrunedWakes", "RetentionQueries"]


@dataclass(frozen=True, slots=True)
class PrunedWakes:
    """Finished wakes, and their ended claims, removed (or removable) together."""

    wakes: int
    claims: int


class RetentionQueries(QueryAccess):
    """Prunes (and counts) history older than a window; never live state."""

    async def prune_wakes(self, older_than: timedelta, limit: int) -> PrunedWakes:
        """Delete up to ``limit`` finished wakes resolved more than ``older_than`` ago, with
        their ended claims (never an entity's outstanding, active or latest wake)."""
        row = await self.fetchrow("prune_wakes", older_than, limit)
        assert row is not None
        return PrunedWakes(row["wakes"], row["claims"])

    async def count_prunable_wakes(self, older_than: timedelta) -> PrunedWakes:
        """What :meth:`prune_wakes` would remove over every batch."""
        row = await self.fetchrow("prune_wakes_count", older_than)
        assert row is not None
        return PrunedWakes(row["wakes"], row["claims"])

    async def prune_inbox_messages(self, older_than: timedelta, limit: int) -> int:
        """Delete up to ``limit`` acked inbox messages older than ``older_than``."""
        removed: int = await self.fetchval("prune_inbox_messages", older_than, limit)
        return removed

    async def count_prunable_inbox_messages(self, older_than: timedelta) -> int:
        """What :meth:`prune_inbox_messages` would remove over every batch."""
        count: int = await self.fetchval("prune_inbox_messages_count", older_than)
        return count

    async def prune_entity_events(self, older_than: timedelta, limit: int) -> int:
        """Delete up to ``limit`` events older than ``older_than``."""
        removed: int = await self.fetchval("prune_entity_events", older_than, limit)
        return removed

    async def count_prunable_entity_events(self, older_than: timedelta) -> int:
        """What :meth:`prune_entity_events` would remove over every batch."""
        count: int = await self.fetchval("prune_entity_events_count", older_than)
        return count
