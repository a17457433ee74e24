"""``PullWake``: pullwake's use cases for a host app's own handlers, in-process.

A host app that mounts :class:`~pullwake.http.plugin.PullWakePlugin` gets a ``pullwake``
dependency (the name is ``PullWakeConfig.dependency_key``) holding one of these::

    @post("/tickets/{ticket_id:str}/reply")
    async def reply(ticket_id: str, data: Reply, pullwake: PullWake) -> dict[str, int]:
        sent = await pullwake.send(f"/ticket/{ticket_id}", data.text, sender=ME)
        return {"offset": sent.offset}

Each call does what its HTTP route does for that principal (membership, the send rate, the
payload limit) without an HTTP round trip or a token; errors are the same
:class:`~pullwake.errors.PullwakeError` subclasses, which the plugin's exception handlers
answer as problem+json.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from pullwake.errors import InvalidRequest
from pullwake.model import Principal, Signal, is_valid_id
from pullwake.services import Services
from pullwake.wire import (
    BatchItem,
    BatchResult,
    DispatchPolicy,
    EntityCreate,
    EntityView,
    InitialMessage,
    SendResponse,
)

__all__ = ["PullWake"]


def _split(entity: str) -> tuple[str, str]:
    """``/type/id`` as (type, id); InvalidRequest for anything else."""
    parts = entity.split("/")
    if len(parts) != 3 or parts[0] or not is_valid_id(parts[1]) or not is_valid_id(parts[2]):
        raise InvalidRequest(f"an entity is addressed as /type/id, got {entity!r}")
    return parts[1], parts[2]


class PullWake:
    """In-process access to one running plugin's services (see the module docstring)."""

    __slots__ = ("services",)

    def __init__(self, services: Services) -> None:
        self.services = services
        """The whole service graph, for what the methods here do not cover."""

    async def create_entity(
        self,
        entity: str,
        *,
        creator: Principal,
        dispatch_policy: DispatchPolicy | None = None,
        tags: dict[str, str] | None = None,
        members: list[str] | None = None,
        initial_message: Any = None,
        idempotency_key: str | None = None,
    ) -> tuple[EntityView, bool]:
        """Create ``entity`` (``/type/id``) as ``creator``, like ``PUT /v1/entities/{type}/{id}``;
        returns the entity and whether it was created (an existing one is answered unchanged).
        ``initial_message`` (any JSON value; None: none) counts against the send rate."""
        type_name, entity_id = _split(entity)
        first = None
        if initial_message is not None:
            first = InitialMessage(initial_message, idempotency_key)
            await self.services.limits.check_send(creator)
        body = EntityCreate(
            dispatch_policy=dispatch_policy, tags=tags, initial_message=first, members=members
        )
        return await self.services.dispatcher.create_entity(creator, type_name, entity_id, body)

    async def get_entity(self, entity: str, *, viewer: Principal) -> EntityView:
        """The entity with its dispatch state, as ``GET /v1/entities/{type}/{id}`` answers it."""
        _split(entity)
        return await self.services.dispatcher.get_entity(entity, viewer)

    async def send(
        self,
        entity: str,
        payload: Any,
        *,
        sender: Principal,
        idempotency_key: str | None = None,
    ) -> SendResponse:
        """Send ``payload`` (any JSON value) to ``entity`` as ``sender``: a member of it, under
        the sender's send rate, as ``POST /v1/entities/{type}/{id}/messages`` does."""
        _split(entity)
        await self.services.limits.check_send(sender)
        return await self.services.dispatcher.send(sender, entity, payload, idempotency_key)

    async def send_batch(
        self, messages: Sequence[BatchItem], *, sender: Principal
    ) -> list[BatchResult]:
        """Send many messages in one Postgres round trip, as ``POST /v1/messages`` does: one
        result per message (an item that cannot be sent carries its ``problem``)."""
        self.services.batch.check_size(len(messages))
        await self.services.limits.check_send(sender, len(messages))
        return await self.services.batch.send(sender, messages)

    async def signal(self, entity: str, signal: Signal | str, *, sender: Principal) -> EntityView:
        """pause | resume | stop | kill ``entity``, by its creator."""
        try:
            value = Signal(signal)
        except ValueError:
            valid = ", ".join(s.value for s in Signal)
            raise InvalidRequest(f"unknown signal {signal!r}: expected one of {valid}") from None
        _split(entity)
        return await self.services.dispatcher.signal(sender, entity, value)
