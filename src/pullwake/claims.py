"""Claim use cases: claim a wake, then the holder's heartbeat, done, release and event writes."""

from __future__ import annotations

import logging
from dataclasses import dataclass, replace
from typing import Any

from pullwake.config import Settings
from pullwake.errors import Fenced, LeaseExpired, NotFound
from pullwake.metrics import CLAIMS, WAKE_TO_CLAIM
from pullwake.model import ClaimStatus, Principal, hash_token, new_claim_token
from pullwake.publish import Publisher
from pullwake.state import check_member, messages_of, raise_for, record, step_limits
from pullwake.store import RawJson, Store
from pullwake.store.steps import Step
from pullwake.streams import WakeStreams
from pullwake.wire import (
    Callbacks,
    ClaimDone,
    DoneResponse,
    NotificationEntity,
    ReleaseResponse,
    WakeNotification,
    WakeView,
    encode_payload,
)

__all__ = ["CHAINED", "ClaimOutcome", "Claims", "NoWork"]

CHAINED = "chained"
"""The reason of a follow-up wake claimed by ``done`` with ``claim_next`` (never published)."""

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class NoWork:
    """Claim answer 204: the wake found nothing left to do."""

    reason: str


ClaimOutcome = WakeNotification | ClaimDone | NoWork


class Claims:
    """Claims: every check (token, epoch, status, lease) and change is one Postgres call."""

    def __init__(
        self, store: Store, streams: WakeStreams, publisher: Publisher, settings: Settings
    ):
        self.store = store
        self.streams = streams
        self.publisher = publisher
        self.settings = settings
        self.limits = step_limits(settings)

    async def _finish(self, step: Step) -> Step:
        """Record and publish what a step did; raise its error, if any."""
        record(step)
        await self.publisher.publish([step.wake])
        raise_for(step)
        return step

    # --- claim -------------------------------------------------------------------------------

    async def claim(
        self, runner_id: str, wake_id: str, entry_id: str | None, *, owner: str | None = None
    ) -> ClaimOutcome:
        """Turn an outstanding wake into an active, leased claim (caller checked that ``owner``
        owns the runner)."""
        token = new_claim_token()
        step = await self.store.claim(
            runner_id, wake_id, entry_id, owner, hash_token(token), self.limits
        )
        await self.ack_entry(runner_id, step.entry_id)
        if step.code == "ALREADY_CLAIMED":
            CLAIMS.labels("already_claimed").inc()
        await self._finish(step)
        outcome = self._outcome(step) or self._notification(step, token)
        CLAIMS.labels(_outcome_label(outcome)).inc()
        return outcome

    @staticmethod
    def _outcome(step: Step) -> NoWork | ClaimDone | None:
        """The claim answers that hand out no claim."""
        if step.code == "NO_WORK":
            return NoWork(step.detail or "")
        if step.code == "NOT_RUNNABLE":
            return ClaimDone(True, step.status or "")
        return None

    def _notification(self, step: Step, token: str, *, chained: bool = False) -> WakeNotification:
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

    # --- webhook targets (the worker claims on the target's behalf) ---------------------------

    async def claim_for_webhook(self, wake_id: str, lease_ms: int) -> ClaimOutcome:
        """Claim a webhook wake; a retry of the same wake re-issues the claim with a new token
        (the previous attempt's token stops working)."""
        token = new_claim_token()
        limits = replace(self.limits, lease_ms=lease_ms)
        step = await self.store.claim_webhook(wake_id, hash_token(token), limits)
        await self._finish(step)
        return self._outcome(step) or self._notification(step, token)

    async def record_attempt(self, wake_id: str, error: str | None) -> None:
        """Count a delivery attempt; a success marks the wake delivered."""
        await self.store.execute("wake_record_attempt", wake_id, error)

    async def fail_webhook(self, wake_id: str, error: str, attempts: int) -> None:
        """Dead letter: the wake failed, its claim failed, the entity is parked until resume."""
        step = await self.store.fail_webhook(wake_id, error, attempts, self.limits)
        record(step)

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

    async def ack_entry(self, runner_id: str, entry_id: str | None) -> None:
        if entry_id is None:
            return
        try:
            await self.streams.ack(runner_id, [entry_id])
        except Exception as exc:  # a missed XACK only leaves a hint pending; recovery acks it
            log.warning("XACK %s on runner %s failed: %s", entry_id, runner_id, exc)

    # --- claim callbacks ---------------------------------------------------------------------

    async def heartbeat(self, claim_id: str, token: str, epoch: int) -> tuple[Any, str]:
        """Extend the claim lease; answers the lease and the entity status."""
        step = await self.store.heartbeat(claim_id, hash_token(token), epoch, self.limits)
        await self._finish(step)
        return step.lease_expires_at, step.status or ""

    async def done(
        self, claim_id: str, token: str, epoch: int, acked_offset: int, *, claim_next: bool = False
    ) -> DoneResponse:
        """Ack, release, and create the follow-up wake when work is still pending; with
        ``claim_next`` the same holder gets the follow-up claim itself instead. A retried done
        (its first answer was lost) answers what the first one did."""
        next_token = new_claim_token() if claim_next else None
        step = await self.store.done(
            claim_id,
            hash_token(token),
            epoch,
            acked_offset,
            None if next_token is None else hash_token(next_token),
            self.limits,
        )
        await self._finish(step)
        chained = None
        if step.claimed and next_token is not None:
            chained = self._notification(step, next_token, chained=True)
            CLAIMS.labels(CHAINED).inc()
        return DoneResponse(ok=True, next_wake=bool(step.next_wake), next_claim=chained)

    async def release(
        self, claim_id: str, token: str, epoch: int, error: str | None
    ) -> ReleaseResponse:
        """Give the claim up without acking; re-wake if work is pending."""
        step = await self.store.release(claim_id, hash_token(token), epoch, error, self.limits)
        await self._finish(step)
        return ReleaseResponse(ok=True, next_wake=bool(step.next_wake))

    async def append_event(self, token: str, url: str, payload: Any, epoch: int | None) -> int:
        """Fenced append to the events log: only the active holder may write."""
        encoded = RawJson(encode_payload(payload, self.settings.max_payload_bytes).decode())
        step = await self.store.append_event(hash_token(token), url, encoded, epoch, self.limits)
        await self._finish(step)
        assert step.msg_offset is not None
        return step.msg_offset

    async def live_claim_of(self, token: str) -> tuple[str, str]:
        """The claim id and entity URL of a claim token whose claim is active and whose lease
        has not passed (a holder whose lease passed reads nothing, swept or not)."""
        claim = await self.store.fetchrow("claim_by_token", hash_token(token))
        if claim is None or claim["status"] != ClaimStatus.ACTIVE.value:
            raise Fenced("claim token is unknown or no longer active")
        if claim["lease_expires_at"] <= claim["now"]:
            raise LeaseExpired(f"claim {claim['id']} lease expired; its work is handed on")
        return str(claim["id"]), str(claim["entity_url"])

    async def get_wake(self, wake_id: str, viewer: Principal | None) -> WakeView:
        """The wake row (audit log), for members of its entity (None: an operator tool)."""
        row = await self.store.fetchrow("wake_get", wake_id)
        entity = None if row is None else await self.store.fetchrow("entity_get", row["entity_url"])
        if row is None or entity is None:
            raise NotFound(f"wake {wake_id!r} does not exist")
        if viewer is not None:
            check_member(viewer, entity["url"], entity["created_by"], entity["members"])
        target = dict(row["target"])
        target.pop("secret", None)
        return WakeView(**{**dict(row), "target": target})


def _outcome_label(outcome: ClaimOutcome) -> str:
    if isinstance(outcome, NoWork):
        return "no_work"
    if isinstance(outcome, ClaimDone):
        return "entity_not_runnable"
    return "claimed"
