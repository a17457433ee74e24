"""Typed queries of API tokens: mint, look up, record use, list and revoke (only a token's
hash is ever stored)."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from pullwake.store.access import QueryAccess

__all__ = ["TokenLookup", "TokenQueries", "TokenRow"]


@dataclass(frozen=True, slots=True)
class TokenRow:
    """An API token as listed (never its hash)."""

    id: str
    principal: str
    label: str
    created_at: datetime
    last_used_at: datetime | None
    revoked_at: datetime | None


@dataclass(frozen=True, slots=True)
class TokenLookup:
    """The token found by its hash (``touch_due``: its use was last recorded a minute ago or
    more, or never)."""

    id: str
    principal: str
    last_used_at: datetime | None
    revoked_at: datetime | None
    touch_due: bool


class TokenQueries(QueryAccess):
    """API tokens (the auth cache's invalidation triggers are on their table, migration 0008)."""

    async def insert_token(
        self, token_id: str, principal: str, token_hash: str, label: str
    ) -> TokenRow:
        """Store a new token by its hash."""
        row = await self.fetchrow("token_insert", token_id, principal, token_hash, label)
        assert row is not None
        return TokenRow(**row)

    async def lookup_token(self, token_hash: str) -> TokenLookup | None:
        """The token with this hash, revoked or not (None: no such token)."""
        row = await self.fetchrow("token_lookup", token_hash)
        return None if row is None else TokenLookup(**row)

    async def touch_token(self, token_id: str) -> None:
        """Record the token's use now (``last_used_at``)."""
        await self.execute("token_touch", token_id)

    async def touch_tokens(self, token_ids: list[str]) -> None:
        """Record the use of several tokens now, in one statement."""
        await self.execute("token_touch_batch", token_ids)

    async def list_tokens(self, principal: str | None) -> list[TokenRow]:
        """The tokens of ``principal`` (None: everyone's), oldest first."""
        return [TokenRow(**r) for r in await self.fetch("token_list", principal)]

    async def revoke_token(self, token_id: str) -> TokenRow | None:
        """Revoke the token (a revoked one keeps its first revocation time); None: no such
        token."""
        row = await self.fetchrow("token_revoke", token_id)
        return None if row is None else TokenRow(**row)
