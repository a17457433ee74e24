"""Typed reads of the operator dashboard (:mod:`pullwake.http.dashboard`): each page's data
region is one statement, scoped to what the viewing principal may see (the runners it owns, the
entities it created or is a member of)."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any

from pullwake.store.access import QueryAccess
from pullwake.store.ops import RunnerRow

__all__ = ["UiEntity", "UiOverview", "UiQueries", "UiRunner"]


@dataclass(frozen=True, slots=True)
class UiOverview:
    """The overview's numbers, and sends / claims / dones per bucket (oldest first)."""

    runners_online: int
    runners_expired: int
    runners_offline: int
    outstanding_wakes: int
    oldest_wake_age_s: float | None
    active_claims: int
    parked_entities: int
    dead_letters: int
    sends: list[int]
    claims: list[int]
    dones: list[int]


@dataclass(frozen=True, slots=True)
class UiRunner:
    """A runner with its backlog (``recent_wakes``: only on the runner's own page)."""

    runner: RunnerRow
    outstanding_wakes: int
    undelivered_wakes: int
    oldest_wake_age_s: float | None
    active_claims: int
    parked_entities: int
    recent_wakes: list[dict[str, Any]]


@dataclass(frozen=True, slots=True)
class UiEntity:
    """An entity, its dispatch state and its story (``timeline``: newest first)."""

    url: str
    type: str
    id: str
    status: str
    target_runner_id: str | None
    created_by: str
    members: list[str]
    created_at: datetime
    tail_offset: int
    acked_offset: int
    epoch: int
    outstanding_wake_id: str | None
    active_claim_id: str | None
    active_runner_id: str | None
    active_epoch: int | None
    active_lease_expires_at: datetime | None
    lease_left_s: float | None
    parked_reason: str | None
    failed_attempts: int
    last_error: str | None
    now: datetime
    timeline: list[dict[str, Any]]


_RUNNER_FIELDS = RunnerRow.__dataclass_fields__


def _runner(row: Any, recent: list[dict[str, Any]]) -> UiRunner:
    return UiRunner(
        runner=RunnerRow(**{name: row[name] for name in _RUNNER_FIELDS}),
        outstanding_wakes=row["outstanding_wakes"],
        undelivered_wakes=row["undelivered_wakes"],
        oldest_wake_age_s=row["oldest_wake_age_s"],
        active_claims=row["active_claims"],
        parked_entities=row["parked_entities"],
        recent_wakes=recent,
    )


class UiQueries(QueryAccess):
    """The dashboard's reads, one statement per page refresh."""

    async def ui_overview(self, viewer: str, bucket_s: int, buckets: int) -> UiOverview:
        """The overview of principal ``viewer``, with ``buckets`` rate buckets of ``bucket_s``."""
        row = await self.fetchrow("ui_overview", viewer, bucket_s, buckets)
        assert row is not None
        return UiOverview(**row)

    async def ui_runners(self, viewer: str) -> list[UiRunner]:
        """The runners ``viewer`` owns, by id, with their backlogs."""
        return [_runner(r, []) for r in await self.fetch("ui_runners", viewer)]

    async def ui_runner(self, runner_id: str, recent: int) -> UiRunner | None:
        """The runner with its backlog and latest ``recent`` wakes (None: no such runner)."""
        row = await self.fetchrow("ui_runner", runner_id, recent)
        return None if row is None else _runner(row, list(row["recent_wakes"]))

    async def ui_entity(self, url: str, recent: int) -> UiEntity | None:
        """The entity with its story: the latest ``recent`` of each kind (None: no entity)."""
        row = await self.fetchrow("ui_entity", url, recent)
        if row is None:
            return None
        values = dict(row)
        values["timeline"] = list(values["timeline"])
        return UiEntity(**values)
