"""Domain records, state enums and pure transition rules (no I/O)."""

from __future__ import annotations

import enum
import hashlib
import re
import secrets
import time
from dataclasses import dataclass
from datetime import datetime

__all__ = [
    "ID_PATTERN",
    "PRINCIPAL_PATTERN",
    "AdminStatus",
    "ClaimStatus",
    "DeliveryStatus",
    "DoneDecision",
    "EntityStatus",
    "Liveness",
    "Principal",
    "Signal",
    "WakeClaimStatus",
    "decide_done",
    "entity_url",
    "hash_token",
    "is_member",
    "liveness",
    "new_claim_token",
    "new_id",
    "next_failed_attempts",
    "pending",
    "signal_outcome",
    "status_after_claim_end",
    "wake_allowed",
]

# "(?!\n)" before "$": Python's "$" also matches before a trailing newline.
ID_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}(?!\n)$"
PRINCIPAL_PATTERN = r"(user|service|system):[^\s/\x00-\x1f\x7f\ud800-\udfff]{1,256}"
_ID_RE = re.compile(ID_PATTERN)


class EntityStatus(enum.StrEnum):
    IDLE = "idle"
    RUNNING = "running"
    PAUSED = "paused"
    STOPPING = "stopping"
    STOPPED = "stopped"
    KILLED = "killed"


TERMINAL = frozenset({EntityStatus.STOPPED, EntityStatus.KILLED})


class AdminStatus(enum.StrEnum):
    ENABLED = "enabled"
    DISABLED = "disabled"


class Liveness(enum.StrEnum):
    ONLINE = "online"
    EXPIRED = "expired"
    OFFLINE = "offline"


class DeliveryStatus(enum.StrEnum):
    QUEUED = "queued"
    DELIVERED = "delivered"
    FAILED = "failed"
    SUPERSEDED = "superseded"


class WakeClaimStatus(enum.StrEnum):
    UNCLAIMED = "unclaimed"
    CLAIMED = "claimed"
    COMPLETED = "completed"
    EXPIRED = "expired"


class ClaimStatus(enum.StrEnum):
    ACTIVE = "active"
    RELEASED = "released"
    EXPIRED = "expired"
    FAILED = "failed"


class Signal(enum.StrEnum):
    PAUSE = "pause"
    RESUME = "resume"
    STOP = "stop"
    KILL = "kill"


@dataclass(frozen=True, slots=True)
class Principal:
    """Who is calling: ``kind:id`` with kind in user, service, system."""

    kind: str
    id: str

    @property
    def key(self) -> str:
        return f"{self.kind}:{self.id}"

    @classmethod
    def parse(cls, key: str) -> Principal:
        """Parse ``kind:id``; raise ValueError when malformed."""
        if not re.fullmatch(PRINCIPAL_PATTERN, key):
            raise ValueError(
                f"principal must look like user:alice, service:x or system:y, got {key!r}"
            )
        kind, _, ident = key.partition(":")
        return cls(kind, ident)

    def __str__(self) -> str:
        return self.key


EVERYONE = "*"
"""The member that grants an entity to every authenticated principal."""


def is_member(principal: str, *, created_by: str, members: list[str]) -> bool:
    """Whether ``principal`` may read and send to an entity: its creator (who, for a runner
    target, owned the runner when the entity was created) or a principal it grants."""
    return principal == created_by or principal in members or EVERYONE in members


def is_valid_id(value: str) -> bool:
    """True when ``value`` is a valid runner, entity type or entity id."""
    return bool(_ID_RE.match(value))


def entity_url(type_name: str, entity_id: str) -> str:
    """The entity's URL, ``/{type}/{id}``."""
    return f"/{type_name}/{entity_id}"


def new_id(prefix: str) -> str:
    """A time-ordered random id such as ``wk_01JD...``: sortable, unguessable enough for ids."""
    millis = int(time.time() * 1000)
    return f"{prefix}_{millis:012x}{secrets.token_hex(8)}"


def new_claim_token() -> str:
    """A fresh claim token (``pwc_`` + 32 random bytes, url-safe)."""
    return "pwc_" + secrets.token_urlsafe(32)


def hash_token(token: str) -> str:
    """The stored form of a token: hex sha256."""
    return hashlib.sha256(token.encode()).hexdigest()


def pending(tail_offset: int, acked_offset: int) -> bool:
    """Pending work exists when the inbox tail is past the acked offset."""
    return tail_offset > acked_offset


def wake_allowed(
    status: EntityStatus,
    *,
    tail_offset: int,
    acked_offset: int,
    outstanding_wake: bool,
    active_claim: bool,
    parked: bool,
) -> bool:
    """Whether a new wake must be created now (otherwise the send coalesces or is held)."""
    return (
        status in (EntityStatus.IDLE, EntityStatus.RUNNING)
        and not parked
        and not outstanding_wake
        and not active_claim
        and pending(tail_offset, acked_offset)
    )


def status_after_claim_end(status: EntityStatus) -> EntityStatus:
    """Entity status once its active claim ends (done, release, expiry)."""
    if status is EntityStatus.RUNNING:
        return EntityStatus.IDLE
    if status is EntityStatus.STOPPING:
        return EntityStatus.STOPPED
    return status


@dataclass(frozen=True, slots=True)
class DoneDecision:
    """What a valid done does to the dispatch counters."""

    acked_offset: int
    progressed: bool
    failed_attempts: int


def decide_done(
    *, current_acked: int, tail_offset: int, requested_acked: int, failed_attempts: int
) -> DoneDecision:
    """Validate a done's acked offset: never backwards, never past the tail."""
    from pullwake.errors import InvalidOffset

    if requested_acked > tail_offset:
        raise InvalidOffset(
            f"acked_offset {requested_acked} is past the inbox tail {tail_offset}",
            acked_offset=current_acked,
            tail_offset=tail_offset,
        )
    if requested_acked < current_acked:
        raise InvalidOffset(
            f"acked_offset {requested_acked} is behind the already acked offset {current_acked}",
            acked_offset=current_acked,
            tail_offset=tail_offset,
        )
    progressed = requested_acked > current_acked
    return DoneDecision(
        acked_offset=requested_acked,
        progressed=progressed,
        failed_attempts=next_failed_attempts(
            failed_attempts, progressed=progressed, pending_after=requested_acked < tail_offset
        ),
    )


def next_failed_attempts(failed_attempts: int, *, progressed: bool, pending_after: bool) -> int:
    """Poison-work counter: a claim that ends with work left and no progress is one more
    failed attempt; progress, or nothing left to do, resets it."""
    return failed_attempts + 1 if pending_after and not progressed else 0


@dataclass(frozen=True, slots=True)
class SignalOutcome:
    """Effect of a signal: the new status, and what happens to wakes and the claim."""

    status: EntityStatus
    supersede_outstanding: bool
    fence_claim: bool
    clear_park: bool


def signal_outcome(status: EntityStatus, signal: Signal, *, active_claim: bool) -> SignalOutcome:
    """Pure rule table for entity signals; raises EntityNotRunnable on a terminal entity."""
    from pullwake.errors import EntityNotRunnable

    if status in TERMINAL and signal is not Signal.KILL:
        raise EntityNotRunnable(f"entity is {status.value}; only kill is accepted")
    if signal is Signal.PAUSE:
        # A stop in progress wins: pausing a stopping entity would resurrect it on resume.
        paused = EntityStatus.STOPPING if status is EntityStatus.STOPPING else EntityStatus.PAUSED
        return SignalOutcome(paused, True, False, False)
    if signal is Signal.RESUME:
        resumed = EntityStatus.RUNNING if active_claim else EntityStatus.IDLE
        if status is EntityStatus.STOPPING:
            resumed = status
        return SignalOutcome(resumed, False, False, True)
    if signal is Signal.STOP:
        stopped = EntityStatus.STOPPING if active_claim else EntityStatus.STOPPED
        return SignalOutcome(stopped, True, False, False)
    return SignalOutcome(EntityStatus.KILLED, True, True, False)


def liveness(admin_status: str, lease_expires_at: datetime | None, now: datetime) -> Liveness:
    """Derived liveness: disabled or never seen ⇒ offline; lease passed ⇒ expired."""
    if admin_status != AdminStatus.ENABLED.value or lease_expires_at is None:
        return Liveness.OFFLINE
    return Liveness.ONLINE if lease_expires_at > now else Liveness.EXPIRED
