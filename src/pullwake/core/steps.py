"""Helpers shared by the use cases around the state machine (which runs in Postgres)."""

from __future__ import annotations

import logging
from datetime import timedelta

from pullwake.config import Settings
from pullwake.errors import (
    AlreadyClaimed,
    EntityNotRunnable,
    Fenced,
    Forbidden,
    IdempotencyMismatch,
    InvalidOffset,
    LeaseExpired,
    NotFound,
    PullwakeError,
)
from pullwake.metrics import CLAIM_ENDS, CLAIM_TO_DONE, FENCED, WAKES_CREATED
from pullwake.model import Principal, is_member
from pullwake.store.steps import NewWake, Step, StepLimits
from pullwake.wire import MessageView

__all__ = [
    "NewWake",
    "check_member",
    "lease_interval",
    "messages_of",
    "raise_for",
    "record",
    "record_fenced",
    "step_limits",
]

log = logging.getLogger(__name__)

_ERRORS: dict[str, type[PullwakeError]] = {
    "NOT_FOUND": NotFound,
    "FORBIDDEN": Forbidden,
    "FENCED": Fenced,
    "LEASE_EXPIRED": LeaseExpired,
    "EXPIRED_NOW": LeaseExpired,
    "ENTITY_NOT_RUNNABLE": EntityNotRunnable,
    "IDEMPOTENCY_MISMATCH": IdempotencyMismatch,
}


def record(step: Step) -> None:
    """Metrics and logs of a state change (a claim it ended, a wake it created)."""
    if step.ended_reason is not None:
        CLAIM_ENDS.labels(step.ended_reason).inc()
        if step.ended_reason == "done" and step.held_s is not None:
            CLAIM_TO_DONE.observe(step.held_s)
        if step.ended_reason == "lease_expired":
            log.info(
                "claim %s on %s: lease expired",
                step.ended_claim_id,
                step.url or step.pub_url,
                extra={
                    "entity": step.url or step.pub_url,
                    "claim": step.ended_claim_id,
                    **({"wake": step.pub_id, "epoch": step.pub_epoch} if step.pub_id else {}),
                },
            )
    if step.pub_reason is not None:  # also a chained wake, claimed in the same call
        WAKES_CREATED.labels(step.pub_reason).inc()


FENCED_CODES = frozenset({"FENCED", "LEASE_EXPIRED", "EXPIRED_NOW"})


def record_fenced(endpoint: str, code: str | None) -> None:
    """Count a holder's call refused because the claim is no longer theirs."""
    if code in FENCED_CODES:
        FENCED.labels(endpoint, "FENCED" if code == "FENCED" else "LEASE_EXPIRED").inc()


def raise_for(step: Step) -> None:
    """Raise the API error a step's code stands for (a None code raises nothing)."""
    code = step.code
    if code is None or code in ("NO_WORK", "NOT_RUNNABLE"):
        return  # answers, not errors: the caller turns them into NoWork / ClaimDone
    detail = step.detail or code
    if code == "INVALID_OFFSET":
        raise InvalidOffset(detail, acked_offset=step.acked_offset, tail_offset=step.tail_offset)
    if code == "ALREADY_CLAIMED":
        raise AlreadyClaimed(detail, claim_id=step.claim_id)
    raise _ERRORS[code](detail)


def step_limits(settings: Settings) -> StepLimits:
    """What the state-machine calls need from the settings."""
    return StepLimits(
        max_attempts=settings.max_attempts,
        lease_ms=settings.claim_lease_ms,
        batch_messages=settings.claim_batch_messages,
        batch_bytes=settings.claim_batch_bytes,
    )


def check_member(principal: Principal, url: str, created_by: str, members: list[str]) -> None:
    """403 ``FORBIDDEN`` unless the entity grants ``principal``."""
    if not is_member(principal.key, created_by=created_by, members=members):
        raise Forbidden(f"{principal.key} is not a member of entity {url}")


def messages_of(step: Step) -> list[MessageView]:
    """The first messages a claim step carries."""
    messages = [
        MessageView(offset, payload, sender, created_at)
        for offset, payload, sender, created_at in zip(
            step.msg_offsets or (),
            step.msg_payloads or (),
            step.msg_senders or (),
            step.msg_created_at or (),
            strict=True,
        )
    ]
    if step.msg_traces:
        for message, trace in zip(messages, step.msg_traces, strict=True):
            message.traceparent = trace
    return messages


def lease_interval(lease_ms: int) -> timedelta:
    """A lease length for SQL ``interval`` parameters."""
    return timedelta(milliseconds=lease_ms)
