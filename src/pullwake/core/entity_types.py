"""Entity type use cases: put and read a type's default dispatch policy (its owner's alone)."""

from __future__ import annotations

import msgspec

from pullwake.core.ports import EntityTypeStore
from pullwake.errors import Forbidden, NotFound
from pullwake.model import Principal
from pullwake.store.entities import EntityTypeRow
from pullwake.webhooks import check_webhook_url
from pullwake.wire import DispatchPolicy, EntityTypeView, WebhookTarget

__all__ = ["EntityTypes", "entity_type_view"]


def entity_type_view(entity_type: EntityTypeRow) -> EntityTypeView:
    """The type as returned to callers: webhook secrets are write-only."""
    policy = entity_type.default_dispatch_policy
    if policy is not None:
        policy = {
            "targets": [{k: v for k, v in t.items() if k != "secret"} for t in policy["targets"]]
        }
    return EntityTypeView(
        entity_type.name,
        policy,
        entity_type.created_at,
        entity_type.updated_at,
        entity_type.owner_principal,
    )


class EntityTypes:
    """Entity types: a name with a default dispatch policy for entities created without one."""

    def __init__(self, store: EntityTypeStore, *, allow_private_webhooks: bool = False) -> None:
        self.store = store
        self.allow_private_webhooks = allow_private_webhooks
        """``PULLWAKE_WEBHOOK_ALLOW_PRIVATE``: webhook targets may be private addresses."""

    async def put(
        self, principal: Principal, name: str, policy: DispatchPolicy | None
    ) -> tuple[EntityTypeView, bool]:
        """Create or replace an entity type's default policy; only its owner may change it.
        Returns (the type, whether it was created). A webhook target's URL is checked now
        rather than at each entity creation (``INVALID_REQUEST`` naming it)."""
        for target in policy.targets if policy else []:
            if isinstance(target, WebhookTarget):
                check_webhook_url(
                    target.url,
                    allow_private=self.allow_private_webhooks,
                    key="default_dispatch_policy.targets[0].url",
                )
        raw = None if policy is None else msgspec.to_builtins(policy)
        put = await self.store.put_entity_type(name, raw, principal.key)
        if put is None:
            raise Forbidden(f"entity type {name!r} is owned by another principal")
        entity_type, created = put
        return entity_type_view(entity_type), created

    async def get(self, principal: Principal, name: str) -> EntityTypeView:
        """The type, for its owner (anyone may read a type from before owners existed)."""
        entity_type = await self.store.get_entity_type(name)
        if entity_type is None:
            raise NotFound(f"entity type {name!r} does not exist")
        if entity_type.owner_principal not in (None, principal.key):
            raise Forbidden(f"entity type {name!r} is owned by another principal")
        return entity_type_view(entity_type)
