"""The locked per-entity dispatch row and the transitions shared by every use case."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field, fields
from datetime import datetime, timedelta
from typing import Any

import asyncpg

from pullwake.errors import Forbidden, NotFound
from pullwake.metrics import CLAIM_ENDS
from pullwake.model import (
    ClaimStatus,
    EntityStatus,
    Principal,
    WakeClaimStatus,
    is_member,
    new_id,
    next_failed_attempts,
    status_after_claim_end,
    wake_allowed,
)
from pullwake.store import Conn
from pullwake.wire import MessageView

__all__ = [
    "EntityState",
    "NewWake",
    "check_member",
    "lease_interval",
    "lock_entity",
    "lock_existing",
    "message_view",
]

log = logging.getLogger(__name__)


@dataclass(slots=True)
class NewWake:
    """A wake created in the current transaction; published after commit."""

    id: str
    entity_url: str
    epoch: int
    reason: str
    created_at: datetime
    runner_id: str | None
    target_type: str

    @classmethod
    def from_row(cls, row: Any, reason: str) -> NewWake:
        """An existing wake row, to publish again (the reason says why)."""
        target = row.get("target") if hasattr(row, "get") else None
        target_type = str(target["type"]) if target else "runner"
        return cls(
            row["id"],
            row["entity_url"],
            row["epoch"],
            reason,
            row["created_at"],
            row["runner_id"],
            target_type,
        )


@dataclass(slots=True)
class EntityState:
    """An entity and its dispatch row, locked ``FOR UPDATE`` for one transaction."""

    url: str
    type: str
    id: str
    status: EntityStatus
    dispatch_policy: dict[str, Any]
    target_runner_id: str | None
    tags: dict[str, str]
    created_by: str
    members: list[str]
    tail_offset: int
    acked_offset: int
    events_tail_offset: int
    epoch: int
    outstanding_wake_id: str | None
    outstanding_wake_created_at: datetime | None
    active_claim_id: str | None
    active_epoch: int | None
    active_runner_id: str | None
    active_token_hash: str | None
    active_claimed_at: datetime | None
    active_lease_expires_at: datetime | None
    failed_attempts: int
    parked_reason: str | None
    last_wake_id: str | None
    last_claimed_at: datetime | None
    last_released_at: datetime | None
    last_error: str | None
    now: datetime
    status_changed: bool = field(default=False)

    _SAVED = (
        "tail_offset",
        "acked_offset",
        "events_tail_offset",
        "epoch",
        "outstanding_wake_id",
        "outstanding_wake_created_at",
        "active_claim_id",
        "active_epoch",
        "active_runner_id",
        "active_token_hash",
        "active_claimed_at",
        "active_lease_expires_at",
        "failed_attempts",
        "parked_reason",
        "last_wake_id",
        "last_claimed_at",
        "last_released_at",
        "last_error",
    )

    @classmethod
    def from_record(cls, record: asyncpg.Record) -> EntityState:
        names = {f.name for f in fields(cls)} - {"status_changed"}
        values = {name: record[name] for name in names}
        values["status"] = EntityStatus(values["status"])
        return cls(**values)

    async def save(self, conn: Conn) -> None:
        """Write every mutable dispatch column (and the status when it changed)."""
        status = self.status.value if self.status_changed else None
        await conn.execute(
            "dispatch_save", self.url, *(getattr(self, n) for n in self._SAVED), status
        )
        self.status_changed = False

    def set_status(self, status: EntityStatus) -> None:
        if status is not self.status:
            self.status = status
            self.status_changed = True

    @property
    def has_pending(self) -> bool:
        return self.tail_offset > self.acked_offset

    def lease_passed(self) -> bool:
        expires = self.active_lease_expires_at
        return self.active_claim_id is not None and expires is not None and expires <= self.now

    def _wake_due(self) -> bool:
        return wake_allowed(
            self.status,
            tail_offset=self.tail_offset,
            acked_offset=self.acked_offset,
            outstanding_wake=self.outstanding_wake_id is not None,
            active_claim=self.active_claim_id is not None,
            parked=self.parked_reason is not None,
        )

    async def maybe_wake(self, conn: Conn, reason: str) -> NewWake | None:
        """Create the wake (epoch+1) when the rules say so; otherwise None."""
        if not self._wake_due():
            return None
        target = self.dispatch_policy["targets"][0]
        wake_id = new_id("wk")
        self.epoch += 1
        created_at = await conn.fetchval(
            "wake_insert", wake_id, self.url, self.epoch, target, self.target_runner_id, reason
        )
        self.outstanding_wake_id = wake_id
        self.outstanding_wake_created_at = created_at
        self.last_wake_id = wake_id
        return NewWake(
            wake_id,
            self.url,
            self.epoch,
            reason,
            created_at,
            self.target_runner_id,
            str(target["type"]),
        )

    async def supersede_outstanding(self, conn: Conn, why: str) -> None:
        """Retire the outstanding wake (it will find nothing to do)."""
        if self.outstanding_wake_id is not None:
            await conn.execute("wake_supersede", self.outstanding_wake_id, why)
            self.outstanding_wake_id = None
            self.outstanding_wake_created_at = None

    async def end_active_claim(
        self,
        conn: Conn,
        *,
        claim_status: ClaimStatus,
        reason: str,
        acked_offset: int | None = None,
        error: str | None = None,
        max_attempts: int,
    ) -> None:
        """End the active claim (done/release/expiry/kill), count attempts, park poison work."""
        claim_id = self.active_claim_id
        assert claim_id is not None
        CLAIM_ENDS.labels(reason).inc()
        progressed = acked_offset is not None and acked_offset > self.acked_offset
        if acked_offset is not None:
            self.acked_offset = max(self.acked_offset, acked_offset)
        self.failed_attempts = next_failed_attempts(
            self.failed_attempts, progressed=progressed, pending_after=self.has_pending
        )
        if self.failed_attempts >= max_attempts and self.parked_reason is None:
            self.parked_reason = (
                f"{self.failed_attempts} claims in a row ended without progress (last: {reason})"
            )
        self.active_claim_id = None
        self.active_epoch = None
        self.active_runner_id = None
        self.active_token_hash = None
        self.active_claimed_at = None
        self.active_lease_expires_at = None
        self.last_released_at = self.now
        if error is not None:
            self.last_error = error
        self.set_status(status_after_claim_end(self.status))
        # Recorded so that a retried done answers exactly what the first one did.
        next_wake = self._wake_due()
        resolution = WakeClaimStatus.COMPLETED if reason == "done" else WakeClaimStatus.EXPIRED
        await conn.execute(
            "claim_end",
            claim_id,
            claim_status.value,
            acked_offset,
            reason,
            next_wake,
            error,
            resolution.value,
        )

    async def expire_claim(self, conn: Conn, *, max_attempts: int) -> None:
        """The active claim's lease passed: expire it; its holder is fenced from now on."""
        log.info(
            "claim %s on %s: lease expired at %s",
            self.active_claim_id,
            self.url,
            self.active_lease_expires_at,
        )
        await self.end_active_claim(
            conn,
            claim_status=ClaimStatus.EXPIRED,
            reason="lease_expired",
            max_attempts=max_attempts,
        )


async def lock_entity(conn: Conn, url: str) -> EntityState | None:
    """Lock the entity and its dispatch row; every state change goes through here first."""
    record = await conn.fetchrow("entity_lock", url)
    return None if record is None else EntityState.from_record(record)


async def lock_existing(conn: Conn, url: str) -> EntityState:
    """Like :func:`lock_entity`, raising NotFound for an unknown entity."""
    state = await lock_entity(conn, url)
    if state is None:
        raise NotFound(f"entity {url} does not exist")
    return state


def check_member(principal: Principal, url: str, created_by: str, members: list[str]) -> None:
    """403 ``FORBIDDEN`` unless the entity grants ``principal``."""
    if not is_member(principal.key, created_by=created_by, members=members):
        raise Forbidden(f"{principal.key} is not a member of entity {url}")


def message_view(row: Any) -> MessageView:
    """An inbox row as returned to callers."""
    return MessageView(row["offset"], row["payload"], row["sender"], row["created_at"])


def lease_interval(lease_ms: int) -> timedelta:
    """A lease length for SQL ``interval`` parameters."""
    return timedelta(milliseconds=lease_ms)
