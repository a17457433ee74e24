"""Entity use cases of the wake state machine: create, send (wake or coalesce), page, signal."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import msgspec

from pullwake.config import Settings
from pullwake.errors import (
    EntityNotRunnable,
    Forbidden,
    IdempotencyMismatch,
    InvalidRequest,
    NotFound,
    RunnerDisabled,
)
from pullwake.metrics import SENDS
from pullwake.model import (
    TERMINAL,
    ClaimStatus,
    Principal,
    Signal,
    entity_url,
    signal_outcome,
)
from pullwake.publish import Publisher
from pullwake.state import EntityState, NewWake, check_member, lock_existing, message_view
from pullwake.store import Conn, RawJson, Store
from pullwake.streams import WakeStreams
from pullwake.webhooks import check_webhook_url
from pullwake.wire import (
    ActiveClaimView,
    DispatchPolicy,
    DispatchView,
    EntityCreate,
    EntityView,
    EventPage,
    EventView,
    MessagePage,
    SendResponse,
    WakeRef,
    WebhookTarget,
    encode_payload,
    public_policy,
)

__all__ = ["ClaimReader", "Dispatcher", "Reader"]


@dataclass(frozen=True, slots=True)
class ClaimReader:
    """A live claim token reading its own entity (checked by the caller)."""

    claim_id: str


Reader = Principal | ClaimReader
"""Who pages an entity's inbox or events: a principal (members only) or its claim holder."""

log = logging.getLogger(__name__)


class Dispatcher:
    """Entity, inbox and claim use cases over Postgres (truth) and Redis (delivery)."""

    def __init__(
        self, store: Store, streams: WakeStreams, publisher: Publisher, settings: Settings
    ):
        self.store = store
        self.streams = streams
        self.publisher = publisher
        self.settings = settings

    # --- entities ----------------------------------------------------------------------------

    async def create_entity(
        self, principal: Principal, type_name: str, entity_id: str, body: EntityCreate
    ) -> tuple[EntityView, bool]:
        """Create ``/{type}/{id}`` (idempotent PUT); the initial message goes through send."""
        url = entity_url(type_name, entity_id)
        policy = await self._effective_policy(principal, type_name, body.dispatch_policy)
        target = policy.targets[0]
        runner_id = getattr(target, "runner_id", None)
        if runner_id is not None:
            await self._check_spawn_runner(principal, runner_id)
        if isinstance(target, WebhookTarget):
            check_webhook_url(target.url, allow_private=self.settings.webhook_allow_private)
        tags = dict(body.tags or {})

        async def work(conn: Conn) -> bool:
            created = await conn.fetchval(
                "entity_insert",
                url,
                type_name,
                entity_id,
                msgspec.to_builtins(policy),
                runner_id,
                tags,
                principal.key,
                sorted(set(body.members or ())),
            )
            if created is not None:
                await conn.execute("dispatch_insert", url)
            return created is not None

        created = await self.store.transact(work)
        send_result = None
        if created and body.initial_message is not None:
            send_result = await self.send(
                principal, url, body.initial_message.payload, body.initial_message.idempotency_key
            )
        # An existing entity: only a member learns about it (and nothing changes).
        view = await self.get_entity(url, principal)
        view.send_result = send_result
        return view, created

    async def _effective_policy(
        self, principal: Principal, type_name: str, explicit: DispatchPolicy | None
    ) -> DispatchPolicy:
        if explicit is not None:
            return explicit
        row = await self.store.fetchrow("entity_type_get", type_name)
        if row is None or row["default_dispatch_policy"] is None:
            why = f"entity type {type_name!r} has no default policy"
        elif row["owner_principal"] not in (None, principal.key):
            # Another principal's default never applies: its owner could redirect the entity.
            why = f"the default policy of entity type {type_name!r} is another principal's"
        else:
            return msgspec.convert(row["default_dispatch_policy"], DispatchPolicy)
        raise InvalidRequest(
            f"no dispatch_policy given and {why}",
            errors=[{"field": "dispatch_policy", "message": "required"}],
        )

    async def _check_spawn_runner(self, principal: Principal, runner_id: str) -> None:
        runner = await self.store.fetchrow("runner_get", runner_id)
        if runner is None:
            raise NotFound(f"runner {runner_id!r} does not exist")
        if runner["owner_principal"] != principal.key:
            raise Forbidden(f"runner {runner_id!r} is not owned by {principal.key}")
        if runner["admin_status"] != "enabled":
            raise RunnerDisabled(f"runner {runner_id!r} is disabled")

    async def get_entity(self, url: str, viewer: Principal | None) -> EntityView:
        """The entity with its dispatch view (``viewer`` None: an operator tool, no check)."""
        row = await self._visible(url, viewer)
        active = None
        if row["active_claim_id"] is not None:
            active = ActiveClaimView(
                row["active_claim_id"],
                row["active_runner_id"],
                row["active_epoch"],
                row["active_lease_expires_at"],
            )
        policy = msgspec.convert(row["dispatch_policy"], DispatchPolicy)
        return EntityView(
            url=row["url"],
            type=row["type"],
            id=row["id"],
            status=row["status"],
            dispatch_policy=public_policy(policy),
            tags=row["tags"],
            created_by=row["created_by"],
            created_at=row["created_at"],
            members=row["members"],
            dispatch=DispatchView(
                tail_offset=row["tail_offset"],
                acked_offset=row["acked_offset"],
                epoch=row["epoch"],
                outstanding_wake_id=row["outstanding_wake_id"],
                active_claim=active,
                parked_reason=row["parked_reason"],
                failed_attempts=row["failed_attempts"],
            ),
        )

    # --- send --------------------------------------------------------------------------------

    async def send(
        self,
        principal: Principal,
        url: str,
        payload: Any,
        idempotency_key: str | None,
        *,
        operator: bool = False,
    ) -> SendResponse:
        """Append to the inbox and wake or coalesce, in one transaction; publish after commit.

        Only the entity's members may send, unless ``operator`` (the CLI, which holds the
        database credentials anyway)."""
        sender = None if operator else principal
        encoded = encode_payload(payload, self.settings.max_payload_bytes)

        async def work(conn: Conn) -> tuple[SendResponse, NewWake | None]:
            state = await self._lock(conn, url)
            if sender is not None:
                check_member(sender, url, state.created_by, state.members)
            if idempotency_key is not None:
                previous = await conn.fetchrow("message_by_idempotency_key", url, idempotency_key)
                if previous is not None:
                    if previous["payload"] != msgspec.json.decode(encoded):
                        raise IdempotencyMismatch(
                            f"idempotency key {idempotency_key!r} was used for another payload "
                            f"(offset {previous['offset']} of {url})"
                        )
                    ref = WakeRef(previous["wake_id"], previous["wake_status"])
                    return SendResponse(previous["offset"], ref, duplicate=True), None
            if state.status in TERMINAL:
                raise EntityNotRunnable(f"entity {url} is {state.status.value}")
            if state.lease_passed():
                await state.expire_claim(conn, max_attempts=self.settings.max_attempts)
            state.tail_offset += 1
            wake = await state.maybe_wake(conn, "message")
            ref = self._wake_ref(state, wake)
            await conn.execute(
                "message_insert",
                url,
                state.tail_offset,
                RawJson(encoded.decode()),
                len(encoded),
                principal.key,
                idempotency_key,
                ref.id,
                ref.status,
            )
            await state.save(conn)
            return SendResponse(state.tail_offset, ref), wake

        response, wake = await self.store.transact(work)
        SENDS.labels("duplicate" if response.duplicate else response.wake.status).inc()
        await self.publisher.publish([wake])
        return response

    @staticmethod
    def _wake_ref(state: EntityState, wake: NewWake | None) -> WakeRef:
        if wake is not None:
            return WakeRef(wake.id, "queued")
        if state.active_claim_id is not None:
            return WakeRef(state.active_claim_id, "coalesced", "active-claim")
        if state.outstanding_wake_id is not None:
            return WakeRef(state.outstanding_wake_id, "coalesced", "outstanding-wake")
        if state.parked_reason is not None:
            return WakeRef(None, "held", "parked")
        return WakeRef(None, "held", state.status.value)

    async def _visible(self, url: str, viewer: Principal | None) -> Any:
        """The entity's row, or NotFound / 403 ``FORBIDDEN`` for a principal it does not grant."""
        row = await self.store.fetchrow("entity_get", url)
        if row is None:
            raise NotFound(f"entity {url} does not exist")
        if viewer is not None:
            check_member(viewer, url, row["created_by"], row["members"])
        return row

    async def list_messages(self, url: str, after: int, limit: int, viewer: Reader) -> MessagePage:
        """Page the inbox after an offset."""
        row = await self._visible(url, viewer if isinstance(viewer, Principal) else None)
        rows = await self.store.fetch("messages_after", url, after, limit + 1)
        messages = [message_view(r) for r in rows[:limit]]
        next_after = messages[-1].offset if messages else after
        return MessagePage(messages, next_after, row["tail_offset"], more=len(rows) > limit)

    async def list_events(self, url: str, after: int, limit: int, viewer: Reader) -> EventPage:
        """Page the events log after an offset."""
        await self._visible(url, viewer if isinstance(viewer, Principal) else None)
        rows = await self.store.fetch("events_after", url, after, limit + 1)
        events = [
            EventView(r["offset"], r["payload"], r["sender"], r["claim_id"], r["created_at"])
            for r in rows[:limit]
        ]
        next_after = events[-1].offset if events else after
        return EventPage(events, next_after, more=len(rows) > limit)

    async def _lock(self, conn: Conn, url: str) -> EntityState:
        return await lock_existing(conn, url)

    async def set_members(self, principal: Principal, url: str, members: list[str]) -> EntityView:
        """Replace the principals an entity grants; only its creator may."""
        row = await self._visible(url, principal)
        if row["created_by"] != principal.key:
            raise Forbidden(f"only the creator ({row['created_by']}) may change who reads {url}")
        await self.store.execute("entity_set_members", url, principal.key, sorted(set(members)))
        return await self.get_entity(url, principal)

    # --- signals -----------------------------------------------------------------------------

    async def signal(self, principal: Principal, url: str, signal: Signal) -> EntityView:
        """pause | resume | stop | kill, by the entity's creator."""

        async def work(conn: Conn) -> NewWake | None:
            state = await self._lock(conn, url)
            if state.created_by != principal.key:
                raise Forbidden(f"only the creator ({state.created_by}) may signal {url}")
            outcome = signal_outcome(
                state.status, signal, active_claim=state.active_claim_id is not None
            )
            if outcome.supersede_outstanding:
                await state.supersede_outstanding(conn, f"entity {signal.value}")
            if outcome.fence_claim and state.active_claim_id is not None:
                await state.end_active_claim(
                    conn,
                    claim_status=ClaimStatus.FAILED,
                    reason=f"signal:{signal.value}",
                    max_attempts=self.settings.max_attempts,
                )
            if outcome.clear_park:
                state.parked_reason = None
                state.failed_attempts = 0
            state.set_status(outcome.status)
            wake = await state.maybe_wake(conn, signal.value)
            await state.save(conn)
            return wake

        wake = await self.store.transact(work)
        await self.publisher.publish([wake])
        return await self.get_entity(url, principal)
