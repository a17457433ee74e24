"""Typed reads and small writes of entities: create, read, members, inbox and events pages, the
entity type's default policy (read and put) and the wake audit row."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import TYPE_CHECKING, Any

from pullwake.store.access import QueryAccess
from pullwake.store.steps import NewWake
from pullwake.wire import EventView, MessageView

if TYPE_CHECKING:
    from pullwake.store.pg import Conn

__all__ = ["EntityQueries", "EntityRow", "EntityTypeRow", "NewEntity", "WakeRow"]


@dataclass(frozen=True, slots=True)
class NewEntity:
    """An entity to create (with its dispatch state)."""

    url: str
    type: str
    id: str
    dispatch_policy: dict[str, Any]
    """The policy as JSON builtins (``msgspec.to_builtins``), secrets included."""
    target_runner_id: str | None
    tags: dict[str, str]
    created_by: str
    members: list[str]


@dataclass(frozen=True, slots=True)
class EntityTypeRow:
    """An entity type: its default dispatch policy and its owner."""

    name: str
    default_dispatch_policy: dict[str, Any] | None
    owner_principal: str | None
    created_at: datetime
    updated_at: datetime


@dataclass(frozen=True, slots=True)
class EntityRow:
    """An entity with its dispatch state (offsets, epoch, outstanding wake, active claim)."""

    url: str
    type: str
    id: str
    status: str
    dispatch_policy: dict[str, Any]
    target_runner_id: str | None
    tags: dict[str, str]
    created_by: str
    members: list[str]
    created_at: datetime
    tail_offset: int
    acked_offset: int
    epoch: int
    outstanding_wake_id: str | None
    active_claim_id: str | None
    active_runner_id: str | None
    active_epoch: int | None
    active_lease_expires_at: datetime | None
    parked_reason: str | None
    failed_attempts: int


@dataclass(frozen=True, slots=True)
class WakeRow:
    """A wake as stored (its target still carries a webhook secret)."""

    id: str
    entity_url: str
    epoch: int
    target: dict[str, Any]
    runner_id: str | None
    reason: str
    delivery_status: str
    claim_status: str
    stream_entry_id: str | None
    attempts: int
    last_error: str | None
    created_at: datetime
    delivered_at: datetime | None
    claimed_at: datetime | None
    resolved_at: datetime | None

    def to_wake(self, reason: str) -> NewWake:
        """This wake, to publish again (``reason`` says why)."""
        target_type = str(self.target["type"]) if self.target else "runner"
        return NewWake(
            self.id,
            self.entity_url,
            self.epoch,
            reason,
            self.created_at,
            self.runner_id,
            target_type,
        )


class EntityQueries(QueryAccess):
    """Entity reads and small writes (the state changes are the ``Store`` steps)."""

    async def insert_entity(self, entity: NewEntity) -> bool:
        """Create the entity and its dispatch state in one transaction; False when the URL
        exists already (nothing changes then)."""

        async def work(conn: Conn) -> bool:
            created = await conn.fetchval(
                "entity_insert",
                entity.url,
                entity.type,
                entity.id,
                entity.dispatch_policy,
                entity.target_runner_id,
                entity.tags,
                entity.created_by,
                entity.members,
            )
            if created is None:
                return False
            await conn.execute("dispatch_insert", entity.url)
            return True

        return await self.transact(work)

    async def get_entity_type(self, name: str) -> EntityTypeRow | None:
        """The entity type ``name`` (None: no such type)."""
        row = await self.fetchrow("entity_type_get", name)
        return None if row is None else EntityTypeRow(**row)

    async def put_entity_type(
        self, name: str, default_dispatch_policy: dict[str, Any] | None, owner: str
    ) -> tuple[EntityTypeRow, bool] | None:
        """Create or replace the type's default policy, owned by ``owner`` from then on;
        ``(type, created)``, or None when another principal owns it (nothing changes then; a
        type from before owners existed goes to its next writer)."""
        row = await self.fetchrow("entity_type_upsert", name, default_dispatch_policy, owner)
        if row is None:
            return None
        fields = dict(row)
        inserted = bool(fields.pop("inserted"))
        return EntityTypeRow(**fields), inserted

    async def get_entity(self, url: str) -> EntityRow | None:
        """The entity at ``url`` with its dispatch state (None: no such entity)."""
        row = await self.fetchrow("entity_get", url)
        return None if row is None else EntityRow(**row)

    async def set_members(self, url: str, created_by: str, members: list[str]) -> bool:
        """Replace who else may read and send; only when ``created_by`` is the creator (False
        otherwise, or when there is no such entity)."""
        return await self.fetchval("entity_set_members", url, created_by, members) is not None

    async def messages_after(self, url: str, after: int, limit: int) -> list[MessageView]:
        """Up to ``limit`` inbox messages past offset ``after``, in offset order."""
        rows = await self.fetch("messages_after", url, after, limit)
        return [
            MessageView(r["offset"], r["payload"], r["sender"], r["created_at"], r["traceparent"])
            for r in rows
        ]

    async def events_after(self, url: str, after: int, limit: int) -> list[EventView]:
        """Up to ``limit`` events past offset ``after``, in offset order."""
        rows = await self.fetch("events_after", url, after, limit)
        return [EventView(**r) for r in rows]

    async def get_wake(self, wake_id: str) -> WakeRow | None:
        """The wake ``wake_id`` (None: no such wake)."""
        row = await self.fetchrow("wake_get", wake_id)
        return None if row is None else WakeRow(**row)
