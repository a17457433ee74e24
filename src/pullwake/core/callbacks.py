"""The holder's calls on its claim: heartbeat, done (with chaining), release, event writes.

Each checks the token, the epoch, the claim's status and its lease under the entity lock, and
changes the state, in one Postgres call: a stale holder is refused and changes nothing."""

from __future__ import annotations

import logging
from typing import Any

from pullwake.core.claims import CHAINED, StepRunner, dispatch_fields
from pullwake.core.steps import record_fenced
from pullwake.errors import Fenced, LeaseExpired
from pullwake.metrics import CLAIMS
from pullwake.model import ClaimStatus, hash_token, new_claim_token
from pullwake.store import RawJson
from pullwake.wire import DoneResponse, ReleaseResponse, encode_payload

__all__ = ["ClaimCallbacks"]

log = logging.getLogger(__name__)


class ClaimCallbacks(StepRunner):
    """heartbeat, done, release and event appends of a claim's holder."""

    async def heartbeat(self, claim_id: str, token: str, epoch: int) -> tuple[Any, str]:
        """Extend the claim lease; answers the lease and the entity status."""
        step = await self.store.heartbeat(claim_id, hash_token(token), epoch, self.limits)
        await self._finish(step, "heartbeat")
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
        await self._finish(step, "done")
        if log.isEnabledFor(logging.DEBUG):
            log.debug(
                "claim %s done at offset %d (next wake: %s)",
                claim_id,
                acked_offset,
                bool(step.next_wake),
                extra=dispatch_fields(step, claim=claim_id, epoch=epoch),
            )
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
        await self._finish(step, "release")
        if log.isEnabledFor(logging.DEBUG):
            log.debug(
                "claim %s released (next wake: %s)",
                claim_id,
                bool(step.next_wake),
                extra=dispatch_fields(step, claim=claim_id, epoch=epoch),
            )
        return ReleaseResponse(ok=True, next_wake=bool(step.next_wake))

    async def append_event(self, token: str, url: str, payload: Any, epoch: int | None) -> int:
        """Fenced append to the events log: only the active holder may write."""
        encoded = RawJson(encode_payload(payload, self.settings.max_payload_bytes).decode())
        step = await self.store.append_event(hash_token(token), url, encoded, epoch, self.limits)
        await self._finish(step, "events")
        assert step.msg_offset is not None
        return step.msg_offset

    async def live_claim_of(self, token: str) -> tuple[str, str]:
        """The claim id and entity URL of a claim token whose claim is active and whose lease
        has not passed (a holder whose lease passed reads nothing, swept or not)."""
        claim = await self.store.live_claim(hash_token(token))
        if claim is None or claim.status != ClaimStatus.ACTIVE.value:
            record_fenced("read", "FENCED")
            raise Fenced("claim token is unknown or no longer active")
        if claim.lease_passed:
            record_fenced("read", "LEASE_EXPIRED")
            raise LeaseExpired(f"claim {claim.id} lease expired; its work is handed on")
        return claim.id, claim.entity_url
