"""Typed answers of the state-machine functions (migration 0007), one Postgres call each."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any

__all__ = ["LiveClaim", "NewWake", "Step", "StepLimits"]


@dataclass(slots=True)
class NewWake:
    """A wake created by a state change; published after commit."""

    id: str
    entity_url: str
    epoch: int
    reason: str
    created_at: datetime
    runner_id: str | None
    target_type: str


@dataclass(frozen=True, slots=True)
class LiveClaim:
    """A claim found by its token: enough to let its holder read its entity."""

    id: str
    entity_url: str
    status: str
    lease_passed: bool


@dataclass(frozen=True, slots=True)
class StepLimits:
    """The settings every state change needs: poison-work threshold, lease, claim batch."""

    max_attempts: int
    lease_ms: int
    batch_messages: int
    batch_bytes: int


@dataclass(slots=True)
class Step:
    """One ``pullwake_step`` row: ``code`` None when the call did what it was asked, else a
    stable answer code (an API error code, ``NO_WORK``, ``NOT_RUNNABLE`` or ``EXPIRED_NOW``).

    The fields are in the SQL type's order, so a row converts with ``Step(*record)``."""

    code: str | None
    detail: str | None
    claim_id: str | None
    epoch: int | None
    lease_ms: int | None
    lease_expires_at: datetime | None
    url: str | None
    type: str | None
    entity_id: str | None
    status: str | None
    tags: dict[str, str] | None
    created_by: str | None
    acked_offset: int | None
    tail_offset: int | None
    msg_offsets: list[int] | None
    msg_payloads: list[Any] | None
    msg_senders: list[str] | None
    msg_created_at: list[datetime] | None
    more_messages: bool | None
    waited_s: float | None
    msg_offset: int | None
    wake_id: str | None
    wake_status: str | None
    wake_reason: str | None
    duplicate: bool | None
    next_wake: bool | None
    entry_id: str | None
    ended_claim_id: str | None
    ended_reason: str | None
    pub_id: str | None
    pub_url: str | None
    pub_epoch: int | None
    pub_reason: str | None
    pub_created_at: datetime | None
    pub_runner_id: str | None
    pub_target_type: str | None
    held_s: float | None = None
    """How long the claim this call ended was held (migration 0011)."""
    msg_traces: list[str | None] | None = None
    """The claimed messages' W3C ``traceparent`` (migration 0012); None when none has one."""

    @property
    def wake(self) -> NewWake | None:
        """The wake this call created, to publish (None when it created none)."""
        if self.pub_id is None:
            return None
        assert self.pub_url is not None
        assert self.pub_epoch is not None
        assert self.pub_reason is not None
        assert self.pub_created_at is not None
        return NewWake(
            self.pub_id,
            self.pub_url,
            self.pub_epoch,
            self.pub_reason,
            self.pub_created_at,
            self.pub_runner_id,
            self.pub_target_type or "runner",
        )

    @property
    def claimed(self) -> bool:
        """Whether the call handed out a claim (its fields are set)."""
        return self.lease_ms is not None
