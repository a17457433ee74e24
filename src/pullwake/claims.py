"""Claim use cases: claim a wake, then the holder's heartbeat, done, release and event writes."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

from pullwake.config import Settings
from pullwake.errors import AlreadyClaimed, Fenced, Forbidden, LeaseExpired, NotFound
from pullwake.metrics import CLAIMS, WAKE_TO_CLAIM
from pullwake.model import (
    TERMINAL,
    ClaimStatus,
    EntityStatus,
    Principal,
    decide_done,
    hash_token,
    new_claim_token,
)
from pullwake.publish import Publisher
from pullwake.state import (
    EntityState,
    NewWake,
    check_member,
    lease_interval,
    lock_existing,
    message_view,
)
from pullwake.store import Conn, RawJson, Store
from pullwake.streams import WakeStreams
from pullwake.wire import (
    Callbacks,
    ClaimDone,
    DoneResponse,
    MessageView,
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


@dataclass(frozen=True, slots=True)
class _Expired:
    """Marker: the claim's lease had passed and it was expired in this transaction."""

    wake: NewWake | None


class Claims:
    """Claims: each check (token, epoch, status, lease) runs under the entity lock."""

    def __init__(
        self, store: Store, streams: WakeStreams, publisher: Publisher, settings: Settings
    ):
        self.store = store
        self.streams = streams
        self.publisher = publisher
        self.settings = settings

    async def _lock(self, conn: Conn, url: str) -> EntityState:
        return await lock_existing(conn, url)

    # --- claim -------------------------------------------------------------------------------

    async def claim(
        self, runner_id: str, wake_id: str, entry_id: str | None, *, owner: str | None = None
    ) -> ClaimOutcome:
        """Turn an outstanding wake into an active, leased claim (caller checked that ``owner``
        owns the runner)."""
        wake_row = await self.store.fetchrow("wake_get", wake_id)
        if wake_row is None or wake_row["runner_id"] != runner_id:
            await self.ack_entry(runner_id, entry_id)
            raise NotFound(f"wake {wake_id!r} does not exist for runner {runner_id!r}")
        token = new_claim_token()

        async def work(conn: Conn) -> tuple[ClaimOutcome, NewWake | None]:
            state = await self._lock(conn, wake_row["entity_url"])
            if owner is not None and state.created_by != owner:
                # A runner target's entities are created by the runner's owner: an id that
                # changed hands (possible only before ids were reserved for good) gains nothing,
                # and the entity is parked rather than woken for the new owner again and again.
                await state.supersede_outstanding(conn, "runner changed owner")
                state.parked_reason = f"runner {runner_id!r} now belongs to another principal"
                await state.save(conn)
                return NoWork("the entity belongs to the runner's previous owner"), None
            if state.outstanding_wake_id != wake_id:
                if state.lease_passed():
                    # The holder died; hand the work on now rather than at the next sweep.
                    return NoWork("wake is no longer outstanding"), (
                        await self._expire_now(conn, state)
                    ).wake
                if state.active_claim_id is not None:
                    raise AlreadyClaimed(
                        f"entity {state.url} is already claimed (claim {state.active_claim_id})",
                        claim_id=state.active_claim_id,
                    )
                if state.status in TERMINAL or state.status is EntityStatus.PAUSED:
                    return ClaimDone(True, state.status.value), None
                return NoWork("wake is no longer outstanding"), None
            if state.status in TERMINAL or state.status is EntityStatus.PAUSED:
                await state.supersede_outstanding(conn, f"entity {state.status.value}")
                await state.save(conn)
                return ClaimDone(True, state.status.value), None
            if not state.has_pending:
                await state.supersede_outstanding(conn, "no pending work")
                await state.save(conn)
                return NoWork("no pending work"), None
            notification = await self._activate(conn, state, wake_id, runner_id, token)
            return notification, None

        try:
            outcome, wake = await self.store.transact(work)
        except AlreadyClaimed:
            CLAIMS.labels("already_claimed").inc()
            await self.ack_entry(runner_id, entry_id or wake_row["stream_entry_id"])
            raise
        await self.ack_entry(runner_id, entry_id or wake_row["stream_entry_id"])
        await self.publisher.publish([wake])
        CLAIMS.labels(_outcome_label(outcome)).inc()
        return outcome

    async def _activate(
        self,
        conn: Conn,
        state: EntityState,
        wake_id: str,
        runner_id: str | None,
        token: str,
        lease_ms: int | None = None,
    ) -> WakeNotification:
        lease_ms = lease_ms or self.settings.claim_lease_ms
        expires = state.now + lease_interval(lease_ms)
        await conn.execute(
            "claim_insert",
            wake_id,
            state.epoch,
            state.url,
            runner_id,
            hash_token(token),
            expires,
            state.acked_offset,
        )
        if state.outstanding_wake_created_at is not None:
            waited = state.now - state.outstanding_wake_created_at
            WAKE_TO_CLAIM.observe(max(waited.total_seconds(), 0.0))
        state.outstanding_wake_id = None
        state.outstanding_wake_created_at = None
        state.active_claim_id = wake_id
        state.active_epoch = state.epoch
        state.active_runner_id = runner_id
        state.active_token_hash = hash_token(token)
        state.active_claimed_at = state.now
        state.active_lease_expires_at = expires
        state.last_claimed_at = state.now
        if state.status is EntityStatus.IDLE:
            state.set_status(EntityStatus.RUNNING)
        return await self._notification(conn, state, wake_id, token, lease_ms)

    async def _notification(
        self, conn: Conn, state: EntityState, claim_id: str, token: str, lease_ms: int
    ) -> WakeNotification:
        messages, more = await self._first_messages(conn, state)
        await state.save(conn)
        assert state.active_lease_expires_at is not None
        return WakeNotification(
            claim_id=claim_id,
            wake_id=claim_id,
            epoch=state.epoch,
            claim_token=token,
            lease_ms=lease_ms,
            lease_expires_at=state.active_lease_expires_at,
            entity=NotificationEntity(
                state.url, state.type, state.id, state.status.value, state.tags, state.created_by
            ),
            acked_offset=state.acked_offset,
            tail_offset=state.tail_offset,
            messages=messages,
            more_messages=more,
            callbacks=self._callbacks(state, claim_id),
        )

    # --- webhook targets (the worker claims on the target's behalf) ---------------------------

    async def claim_for_webhook(self, wake_id: str, lease_ms: int) -> ClaimOutcome:
        """Claim a webhook wake; a retry of the same wake re-issues the claim with a new token
        (the previous attempt's token stops working)."""
        token = new_claim_token()

        async def work(conn: Conn) -> tuple[ClaimOutcome, NewWake | None]:
            wake = await conn.fetchrow("wake_get", wake_id)
            if wake is None or wake["target"].get("type") != "webhook":
                return NoWork("not a webhook wake"), None
            state = await self._lock(conn, wake["entity_url"])
            if state.active_claim_id == wake_id and state.lease_passed():
                # Expire *and* hand the work on (epoch+1), as the lease sweep would: expiring
                # alone left the entity idle with pending work and no wake.
                expired = await self._expire_now(conn, state)
                return NoWork("lease expired between attempts"), expired.wake
            if state.active_claim_id == wake_id and wake["delivery_status"] == "delivered":
                # A job retried after a worker crash that followed a 2xx: the target holds the
                # claim and its token; re-issuing would fence it and deliver twice.
                return NoWork("already delivered; the target holds the claim"), None
            if state.active_claim_id == wake_id:
                expires = await conn.fetchval(
                    "claim_reissue", wake_id, hash_token(token), lease_interval(lease_ms)
                )
                state.active_token_hash = hash_token(token)
                state.active_lease_expires_at = expires
                return await self._notification(conn, state, wake_id, token, lease_ms), None
            if state.outstanding_wake_id != wake_id:
                return NoWork("wake is no longer outstanding"), None
            if state.status in TERMINAL or state.status is EntityStatus.PAUSED:
                await state.supersede_outstanding(conn, f"entity {state.status.value}")
                await state.save(conn)
                return ClaimDone(True, state.status.value), None
            if not state.has_pending:
                await state.supersede_outstanding(conn, "no pending work")
                await state.save(conn)
                return NoWork("no pending work"), None
            return await self._activate(conn, state, wake_id, None, token, lease_ms), None

        outcome, wake = await self.store.transact(work)
        await self.publisher.publish([wake])
        return outcome

    async def record_attempt(self, wake_id: str, error: str | None) -> None:
        """Count a delivery attempt; a success marks the wake delivered."""
        await self.store.execute("wake_record_attempt", wake_id, error)

    async def fail_webhook(self, wake_id: str, error: str, attempts: int) -> None:
        """Dead letter: the wake failed, its claim failed, the entity is parked until resume."""

        async def work(conn: Conn) -> None:
            wake = await conn.fetchrow("wake_get", wake_id)
            if wake is None:
                return
            state = await self._lock(conn, wake["entity_url"])
            if state.active_claim_id != wake_id:
                # The claim expired meanwhile and the work was handed on (a newer wake): record
                # the failure of this wake, but do not park the entity under the newer one.
                await conn.execute("wake_fail", wake_id, error)
                return
            await state.end_active_claim(
                conn,
                claim_status=ClaimStatus.FAILED,
                reason="webhook_failed",
                error=error,
                max_attempts=self.settings.max_attempts,
            )
            state.parked_reason = f"webhook delivery failed after {attempts} attempts: {error}"
            await conn.execute("wake_fail", wake_id, error)
            await state.save(conn)

        await self.store.transact(work)

    async def _first_messages(
        self, conn: Conn, state: EntityState
    ) -> tuple[list[MessageView], bool]:
        rows = await conn.fetch(
            "messages_after", state.url, state.acked_offset, self.settings.claim_batch_messages
        )
        budget = self.settings.claim_batch_bytes
        messages: list[MessageView] = []
        for row in rows:
            if messages and row["payload_bytes"] > budget:
                break
            budget -= row["payload_bytes"]
            messages.append(message_view(row))
        last = messages[-1].offset if messages else state.acked_offset
        return messages, last < state.tail_offset

    def _callbacks(self, state: EntityState, claim_id: str) -> Callbacks:
        base = self.settings.public_url.rstrip("/") + "/v1"
        entity = f"{base}/entities/{state.type}/{state.id}"
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

    async def _holder(
        self, conn: Conn, claim_id: str, token: str, epoch: int
    ) -> tuple[EntityState, Any]:
        """Lock the claim's entity and check the token, epoch, status and lease."""
        claim = await conn.fetchrow("claim_get", claim_id)
        if claim is None:
            raise NotFound(f"claim {claim_id!r} does not exist")
        if claim["token_hash"] != hash_token(token):
            raise Forbidden("the claim token does not belong to this claim")
        state = await self._lock(conn, claim["entity_url"])
        claim = await conn.fetchrow("claim_get", claim_id)
        assert claim is not None
        if epoch != claim["epoch"]:
            raise Fenced(f"epoch {epoch} is stale; this claim holds epoch {claim['epoch']}")
        return state, claim

    def _check_active(self, state: EntityState, claim: Any) -> None:
        if claim["status"] == ClaimStatus.EXPIRED.value:
            raise LeaseExpired(f"claim {claim['id']} expired; its work was handed on")
        if claim["status"] != ClaimStatus.ACTIVE.value or state.active_claim_id != claim["id"]:
            raise Fenced(f"claim {claim['id']} is {claim['status']}; it no longer holds the entity")

    async def _expire_now(self, conn: Conn, state: EntityState) -> _Expired:
        await state.expire_claim(conn, max_attempts=self.settings.max_attempts)
        wake = await state.maybe_wake(conn, "lease_expired")
        await state.save(conn)
        return _Expired(wake)

    async def _callback(
        self, claim_id: str, token: str, epoch: int, action: Any, replay: Any = None
    ) -> Any:
        """Shared skeleton: lock, check, expire a passed lease inline, run ``action``.

        ``replay(conn, state, claim)`` may answer a retried call that already took effect.
        """

        async def work(conn: Conn) -> Any:
            state, claim = await self._holder(conn, claim_id, token, epoch)
            if replay is not None and (early := await replay(conn, state, claim)) is not None:
                return early
            self._check_active(state, claim)
            if state.lease_passed():
                return await self._expire_now(conn, state)
            return await action(conn, state, claim)

        result = await self.store.transact(work)
        if isinstance(result, _Expired):
            await self.publisher.publish([result.wake])
            raise LeaseExpired(f"claim {claim_id} lease expired before this call")
        return result

    async def heartbeat(self, claim_id: str, token: str, epoch: int) -> tuple[Any, str]:
        """Extend the claim lease; answers the lease and the entity status."""

        async def action(conn: Conn, state: EntityState, claim: Any) -> tuple[Any, str]:
            lease = lease_interval(self.settings.claim_lease_ms)
            expires = await conn.fetchval("claim_heartbeat", claim_id, lease)
            state.active_lease_expires_at = expires
            await state.save(conn)
            return expires, state.status.value

        result: tuple[Any, str] = await self._callback(claim_id, token, epoch, action)
        return result

    async def _let_go(
        self,
        conn: Conn,
        state: EntityState,
        reason: str,
        wake_reason: str,
        *,
        acked_offset: int | None = None,
        error: str | None = None,
    ) -> NewWake | None:
        """The holder gives the claim back (done or release); the next wake if work remains."""
        await state.end_active_claim(
            conn,
            claim_status=ClaimStatus.RELEASED,
            reason=reason,
            acked_offset=acked_offset,
            error=error,
            max_attempts=self.settings.max_attempts,
        )
        wake = await state.maybe_wake(conn, wake_reason)
        await state.save(conn)
        return wake

    async def done(
        self, claim_id: str, token: str, epoch: int, acked_offset: int, *, claim_next: bool = False
    ) -> DoneResponse:
        """Ack, release, and create the follow-up wake when work is still pending; with
        ``claim_next`` the same holder gets the follow-up claim itself instead."""

        async def replay(conn: Conn, state: EntityState, claim: Any) -> Any:
            # A retried done (its first response was lost) answers what the first one did.
            if (
                claim["status"] == ClaimStatus.RELEASED.value
                and claim["end_reason"] == "done"
                and claim["acked_offset"] == acked_offset
            ):
                chained = await self._chained_again(conn, state, claim) if claim_next else None
                next_wake = bool(claim["next_wake"])
                return DoneResponse(ok=True, next_wake=next_wake, next_claim=chained), None
            return None

        async def action(conn: Conn, state: EntityState, claim: Any) -> Any:
            decide_done(
                current_acked=state.acked_offset,
                tail_offset=state.tail_offset,
                requested_acked=acked_offset,
                failed_attempts=state.failed_attempts,
            )
            chain = claim_next and await self._may_chain(conn, state, claim)
            reason = CHAINED if chain else "follow_up"
            wake = await self._let_go(conn, state, "done", reason, acked_offset=acked_offset)
            if wake is None or not chain:
                return DoneResponse(ok=True, next_wake=wake is not None), wake
            # Never published: the holder claims the follow-up in this same transaction.
            note = await self._activate(conn, state, wake.id, claim["runner_id"], new_claim_token())
            CLAIMS.labels(CHAINED).inc()
            return DoneResponse(ok=True, next_wake=True, next_claim=note), None

        response, wake = await self._callback(claim_id, token, epoch, action, replay)
        await self.publisher.publish([wake])
        return response  # type: ignore[no-any-return]

    async def _may_chain(self, conn: Conn, state: EntityState, claim: Any) -> bool:
        """Whether the holder may take the follow-up claim: what a runner claim checks (the
        runner is enabled and still its entities' owner) holds for chaining too."""
        if claim["runner_id"] is None:
            return True  # a webhook target's claim
        runner = await conn.fetchrow("runner_get", claim["runner_id"])
        return (
            runner is not None
            and runner["admin_status"] == "enabled"
            and runner["owner_principal"] == state.created_by
        )

    async def _chained_again(
        self, conn: Conn, state: EntityState, claim: Any
    ) -> WakeNotification | None:
        """A retried chaining done (its answer was lost): the chained claim again, with a
        fresh token and the same lease, while nobody has used it yet and its lease holds."""
        chained_id = state.active_claim_id
        if chained_id is None or state.active_epoch != claim["epoch"] + 1 or state.lease_passed():
            return None
        if not await conn.fetchval("claim_chained_unused", chained_id):
            return None
        token = new_claim_token()
        state.active_token_hash = hash_token(token)
        await conn.execute("claim_token_replace", chained_id, state.active_token_hash)
        assert state.active_lease_expires_at is not None
        left_ms = int((state.active_lease_expires_at - state.now).total_seconds() * 1000)
        return await self._notification(conn, state, chained_id, token, max(left_ms, 1))

    async def release(
        self, claim_id: str, token: str, epoch: int, error: str | None
    ) -> ReleaseResponse:
        """Give the claim up without acking; re-wake if work is pending."""

        async def action(conn: Conn, state: EntityState, claim: Any) -> Any:
            wake = await self._let_go(conn, state, "release", "released", error=error)
            return ReleaseResponse(ok=True, next_wake=wake is not None), wake

        response, wake = await self._callback(claim_id, token, epoch, action)
        await self.publisher.publish([wake])
        return response  # type: ignore[no-any-return]

    async def append_event(self, token: str, url: str, payload: Any, epoch: int | None) -> int:
        """Fenced append to the events log: only the active holder may write."""
        claim = await self.store.fetchrow("claim_by_token", hash_token(token))
        if claim is None:
            raise Fenced("claim token is unknown or no longer valid")
        if claim["entity_url"] != url:
            raise Forbidden(f"this claim token is for {claim['entity_url']}, not {url}")
        encoded = RawJson(encode_payload(payload, self.settings.max_payload_bytes).decode())

        async def action(conn: Conn, state: EntityState, claim_row: Any) -> Any:
            state.events_tail_offset += 1
            await conn.fetchval(
                "event_insert",
                url,
                state.events_tail_offset,
                encoded,
                f"claim:{claim_row['id']}",
                claim_row["id"],
            )
            await state.save(conn)
            return state.events_tail_offset

        offset: int = await self._callback(
            claim["id"], token, epoch if epoch is not None else claim["epoch"], action
        )
        return offset

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
