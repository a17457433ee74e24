"""Entity use cases of the wake state machine: create, send (wake or coalesce), page, signal."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import msgspec

from pullwake.config import Settings
from pullwake.core.ports import EntityStore
from pullwake.core.steps import check_member, raise_for, record, step_limits
from pullwake.errors import Forbidden, InvalidRequest, NotFound, RunnerDisabled
from pullwake.metrics import SENDS
from pullwake.model import Principal, Signal, entity_url
from pullwake.publish import Publisher
from pullwake.store import RawJson
from pullwake.store.entities import EntityRow, NewEntity
from pullwake.streams import WakeStreams
from pullwake.webhooks import check_webhook_url
from pullwake.wire import (
    ActiveClaimView,
    DispatchPolicy,
    DispatchView,
    EntityCreate,
    EntityView,
    EventPage,
    FieldError,
    MessagePage,
    SendResponse,
    WakeRef,
    WakeView,
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
        self, store: EntityStore, streams: WakeStreams, publisher: Publisher, settings: Settings
    ):
        self.store = store
        self.streams = streams
        self.publisher = publisher
        self.settings = settings
        self.limits = step_limits(settings)

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
            check_webhook_url(
                target.url,
                allow_private=self.settings.webhook_allow_private,
                key="dispatch_policy.targets[0].url",
            )
        created = await self.store.insert_entity(
            NewEntity(
                url=url,
                type=type_name,
                id=entity_id,
                dispatch_policy=msgspec.to_builtins(policy),
                target_runner_id=runner_id,
                tags=dict(body.tags or {}),
                created_by=principal.key,
                members=sorted(set(body.members or ())),
            )
        )
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
        entity_type = await self.store.get_entity_type(type_name)
        if entity_type is None or entity_type.default_dispatch_policy is None:
            why = f"entity type {type_name!r} has no default policy"
        elif entity_type.owner_principal not in (None, principal.key):
            # Another principal's default never applies: its owner could redirect the entity.
            why = f"the default policy of entity type {type_name!r} is another principal's"
        else:
            return msgspec.convert(entity_type.default_dispatch_policy, DispatchPolicy)
        raise InvalidRequest(
            f"no dispatch_policy given and {why}",
            errors=[FieldError(message="required", key="dispatch_policy", source="body")],
        )

    async def _check_spawn_runner(self, principal: Principal, runner_id: str) -> None:
        runner = await self.store.get_runner(runner_id)
        if runner is None:
            raise NotFound(f"runner {runner_id!r} does not exist")
        if runner.owner_principal != principal.key:
            raise Forbidden(f"runner {runner_id!r} is not owned by {principal.key}")
        if runner.admin_status != "enabled":
            raise RunnerDisabled(f"runner {runner_id!r} is disabled")

    async def get_entity(self, url: str, viewer: Principal | None) -> EntityView:
        """The entity with its dispatch view (``viewer`` None: an operator tool, no check)."""
        entity = await self._visible(url, viewer)
        active = None
        if entity.active_claim_id is not None:
            assert entity.active_epoch is not None
            assert entity.active_lease_expires_at is not None
            active = ActiveClaimView(
                entity.active_claim_id,
                entity.active_runner_id,
                entity.active_epoch,
                entity.active_lease_expires_at,
            )
        policy = msgspec.convert(entity.dispatch_policy, DispatchPolicy)
        return EntityView(
            url=entity.url,
            type=entity.type,
            id=entity.id,
            status=entity.status,
            dispatch_policy=public_policy(policy),
            tags=entity.tags,
            created_by=entity.created_by,
            created_at=entity.created_at,
            members=entity.members,
            dispatch=DispatchView(
                tail_offset=entity.tail_offset,
                acked_offset=entity.acked_offset,
                epoch=entity.epoch,
                outstanding_wake_id=entity.outstanding_wake_id,
                active_claim=active,
                parked_reason=entity.parked_reason,
                failed_attempts=entity.failed_attempts,
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
        traceparent: str | None = None,
    ) -> SendResponse:
        """Append to the inbox and wake or coalesce, in one transaction; publish after commit.

        Only the entity's members may send, unless ``operator`` (the CLI, which holds the
        database credentials anyway). ``traceparent`` (a valid W3C trace context) is kept with
        the message for its claim."""
        encoded = encode_payload(payload, self.settings.max_payload_bytes)
        step = await self.store.send(
            url,
            RawJson(encoded.decode()),
            len(encoded),
            idempotency_key,
            principal.key,
            check_members=not operator,
            limits=self.limits,
            traceparent=traceparent,
        )
        record(step)
        await self.publisher.publish([step.wake])
        raise_for(step)
        assert step.msg_offset is not None
        assert step.wake_status is not None
        wake = WakeRef(step.wake_id, step.wake_status, step.wake_reason)  # type: ignore[arg-type]
        SENDS.labels("duplicate" if step.duplicate else step.wake_status).inc()
        return SendResponse(step.msg_offset, wake, duplicate=bool(step.duplicate))

    async def _visible(self, url: str, viewer: Principal | None) -> EntityRow:
        """The entity, or NotFound / 403 ``FORBIDDEN`` for a principal it does not grant."""
        entity = await self.store.get_entity(url)
        if entity is None:
            raise NotFound(f"entity {url} does not exist")
        if viewer is not None:
            check_member(viewer, url, entity.created_by, entity.members)
        return entity

    async def list_messages(self, url: str, after: int, limit: int, viewer: Reader) -> MessagePage:
        """Page the inbox after an offset."""
        entity = await self._visible(url, viewer if isinstance(viewer, Principal) else None)
        found = await self.store.messages_after(url, after, limit + 1)
        messages = found[:limit]
        next_after = messages[-1].offset if messages else after
        return MessagePage(messages, next_after, entity.tail_offset, more=len(found) > limit)

    async def list_events(self, url: str, after: int, limit: int, viewer: Reader) -> EventPage:
        """Page the events log after an offset."""
        await self._visible(url, viewer if isinstance(viewer, Principal) else None)
        found = await self.store.events_after(url, after, limit + 1)
        events = found[:limit]
        next_after = events[-1].offset if events else after
        return EventPage(events, next_after, more=len(found) > limit)

    async def set_members(self, principal: Principal, url: str, members: list[str]) -> EntityView:
        """Replace the principals an entity grants; only its creator may."""
        entity = await self._visible(url, principal)
        if entity.created_by != principal.key:
            raise Forbidden(f"only the creator ({entity.created_by}) may change who reads {url}")
        await self.store.set_members(url, principal.key, sorted(set(members)))
        return await self.get_entity(url, principal)

    async def get_wake(self, wake_id: str, viewer: Principal | None) -> WakeView:
        """The wake row (audit log), for members of its entity (None: an operator tool)."""
        wake = await self.store.get_wake(wake_id)
        entity = None if wake is None else await self.store.get_entity(wake.entity_url)
        if wake is None or entity is None:
            raise NotFound(f"wake {wake_id!r} does not exist")
        if viewer is not None:
            check_member(viewer, entity.url, entity.created_by, entity.members)
        target = dict(wake.target)
        target.pop("secret", None)
        return WakeView(
            id=wake.id,
            entity_url=wake.entity_url,
            epoch=wake.epoch,
            target=target,
            runner_id=wake.runner_id,
            reason=wake.reason,
            delivery_status=wake.delivery_status,
            claim_status=wake.claim_status,
            stream_entry_id=wake.stream_entry_id,
            attempts=wake.attempts,
            last_error=wake.last_error,
            created_at=wake.created_at,
            delivered_at=wake.delivered_at,
            claimed_at=wake.claimed_at,
            resolved_at=wake.resolved_at,
        )

    # --- signals -----------------------------------------------------------------------------

    async def signal(self, principal: Principal, url: str, signal: Signal) -> EntityView:
        """pause | resume | stop | kill, by the entity's creator."""

        step = await self.store.signal(url, principal.key, signal.value, self.limits)
        record(step)
        await self.publisher.publish([step.wake])
        raise_for(step)
        return await self.get_entity(url, principal)
