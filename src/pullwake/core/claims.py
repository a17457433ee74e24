"""A runner claims a wake: the outstanding wake becomes an active, leased claim."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

from pullwake.config import Settings
from pullwake.core.ports import StateMachine
from pullwake.core.steps import messages_of, raise_for, record, record_fenced, step_limits
from pullwake.metrics import CLAIMS, WAKE_TO_CLAIM
from pullwake.model import hash_token, new_claim_token
from pullwake.publish import Publisher
from pullwake.store.steps import Step
from pullwake.streams import WakeStreams
from pullwake.wire import Callbacks, ClaimDone, NotificationEntity, WakeNotification

__all__ = ["CHAINED", "ClaimOutcome", "Claims", "NoWork", "StepRunner", "answer_of"]

CHAINED = "chained"
"""The reason of a follow-up wake claimed by ``done`` with ``claim_next`` (never published)."""

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class NoWork:
    """Claim answer 204: the wake found nothing left to do."""

    reason: str


ClaimOutcome = WakeNotification | ClaimDone | NoWork


def answer_of(step: Step) -> NoWork | ClaimDone | None:
    """The claim answers that hand out no claim (None: the step holds a claim)."""
    if step.code == "NO_WORK":
        return NoWork(step.detail or "")
    if step.code == "NOT_RUNNABLE":
        return ClaimDone(True, step.status or "")
    return None


class StepRunner:
    """Shared by the claim use cases: settings, publishing after a step, the holder's view."""

    def __init__(self, store: StateMachine, publisher: Publisher, settings: Settings) -> None:
        self.store = store
        self.publisher = publisher
        self.settings = settings
        self.limits = step_limits(settings)

    async def _finish(self, step: Step, endpoint: str | None = None) -> Step:
        """Record and publish what a step did; raise its error, if any (a holder's call to
        ``endpoint`` refused as fenced is counted)."""
        record(step)
        if endpoint is not None:
            record_fenced(endpoint, step.code)
        await self.publisher.publish([step.wake])
        raise_for(step)
        return step

    def _notification(self, step: Step, token: str, *, chained: bool = False) -> WakeNotification:
        """The claim a step handed out, as its holder gets it."""
        assert step.claim_id is not None
        assert step.epoch is not None
        assert step.lease_ms is not None
        assert step.lease_expires_at is not None
        assert step.url is not None
        assert step.type is not None
        assert step.entity_id is not None
        if step.waited_s is not None and not chained:  # a chained claim never waited
            WAKE_TO_CLAIM.observe(step.waited_s)
        return WakeNotification(
            claim_id=step.claim_id,
            wake_id=step.claim_id,
            epoch=step.epoch,
            claim_token=token,
            lease_ms=step.lease_ms,
            lease_expires_at=step.lease_expires_at,
            entity=NotificationEntity(
                step.url,
                step.type,
                step.entity_id,
                step.status or "",
                step.tags or {},
                step.created_by or "",
            ),
            acked_offset=step.acked_offset or 0,
            tail_offset=step.tail_offset or 0,
            messages=messages_of(step),
            more_messages=bool(step.more_messages),
            callbacks=self._callbacks(step.type, step.entity_id, step.claim_id),
        )

    def _callbacks(self, type_name: str, entity_id: str, claim_id: str) -> Callbacks:
        base = self.settings.public_url.rstrip("/") + "/v1"
        entity = f"{base}/entities/{type_name}/{entity_id}"
        return Callbacks(
            heartbeat=f"{base}/claims/{claim_id}/heartbeat",
            done=f"{base}/claims/{claim_id}/done",
            release=f"{base}/claims/{claim_id}/release",
            events=f"{entity}/events",
            messages=f"{entity}/messages",
        )


class Claims(StepRunner):
    """Runner claims: the check (owner, outstanding wake, status, pending work) and the change
    are one Postgres call; the stream entry is acked whatever the answer."""

    def __init__(
        self, store: StateMachine, streams: WakeStreams, publisher: Publisher, settings: Settings
    ) -> None:
        super().__init__(store, publisher, settings)
        self.streams = streams

    async def claim(
        self, runner_id: str, wake_id: str, entry_id: str | None, *, owner: str | None = None
    ) -> ClaimOutcome:
        """Turn an outstanding wake into an active, leased claim (the caller checked that
        ``owner`` owns the runner)."""
        token = new_claim_token()
        step = await self.store.claim(
            runner_id, wake_id, entry_id, owner, hash_token(token), self.limits
        )
        await self.ack_entry(runner_id, step.entry_id)
        if step.code is not None and answer_of(step) is None:  # refused: counted by its code
            CLAIMS.labels(step.code.lower()).inc()
        await self._finish(step)
        outcome = answer_of(step) or self._notification(step, token)
        CLAIMS.labels(_outcome_label(outcome)).inc()
        if log.isEnabledFor(logging.DEBUG):
            log.debug(
                "runner %s claim of wake %s: %s",
                runner_id,
                wake_id,
                _outcome_label(outcome),
                extra=dispatch_fields(step, runner=runner_id, wake=wake_id),
            )
        return outcome

    async def ack_entry(self, runner_id: str, entry_id: str | None) -> None:
        """XACK a stream entry; a failure only leaves a hint pending (recovery acks it)."""
        if entry_id is None:
            return
        try:
            await self.streams.ack(runner_id, [entry_id])
        except Exception as exc:
            log.warning(
                "XACK %s on runner %s failed: %s",
                entry_id,
                runner_id,
                exc,
                extra={"runner": runner_id, "entry": entry_id},
            )


def dispatch_fields(step: Step, **known: Any) -> dict[str, Any]:
    """The structured log fields of a state change: entity, wake, claim, epoch, runner."""
    fields: dict[str, Any] = {
        "entity": step.url or step.pub_url,
        "claim": step.claim_id or step.ended_claim_id,
        "epoch": step.epoch,
        **known,
    }
    return {k: v for k, v in fields.items() if v is not None}


def _outcome_label(outcome: ClaimOutcome) -> str:
    if isinstance(outcome, NoWork):
        return "no_work"
    if isinstance(outcome, ClaimDone):
        return "entity_not_runnable"
    return "claimed"
