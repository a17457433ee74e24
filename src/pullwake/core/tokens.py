"""API token use cases: mint, authenticate (through the auth cache), list, revoke, and the
batched record of cached tokens' use."""

from __future__ import annotations

import asyncio
import logging
import secrets
from dataclasses import dataclass

from pullwake.authcache import TOKEN, AuthCache
from pullwake.core.ports import TokenStore
from pullwake.errors import NotFound
from pullwake.model import Principal, hash_token, new_id
from pullwake.store.tokens import TokenRow

__all__ = ["Tokens"]

log = logging.getLogger(__name__)

_TOUCH_EVERY_NS = 60 * 1_000_000_000  # last_used_at is recorded about once a minute per token


@dataclass(slots=True)
class _CachedToken:
    id: str
    principal: Principal
    recorded_at: int
    """When this process last recorded the token's use (``time.monotonic_ns``)."""


class Tokens:
    """API tokens: ``pwk_`` + 32 random bytes, stored as a hash, cached once seen."""

    def __init__(self, store: TokenStore, cache: AuthCache) -> None:
        self.store = store
        self.cache = cache
        """Shared with :class:`~pullwake.core.runners.Runners`; in use only while a listener
        runs (the API's lifespan)."""
        self._touch_ids: set[str] = set()
        self._touch_task: asyncio.Task[None] | None = None

    async def create(self, principal: Principal, label: str) -> tuple[str, TokenRow]:
        """Mint a ``pwk_`` API token; only its hash is stored. Returns (raw token, its row)."""
        raw = "pwk_" + secrets.token_urlsafe(32)
        row = await self.store.insert_token(new_id("tok"), principal.key, hash_token(raw), label)
        return raw, row

    async def authenticate(self, raw: str, *, since: int | None = None) -> Principal | None:
        """The principal of a live API token, or None.

        A cache hit costs no lookup (see :mod:`pullwake.authcache`; ``since`` is when the request
        came in); a miss looks the token up and records its use when the last record is a minute
        old. A hit records it too, at most once a minute, in the background."""
        return await self.authenticate_hash(hash_token(raw), since=since)

    async def authenticate_hash(
        self, token_hash: str, *, since: int | None = None
    ) -> Principal | None:
        """:meth:`authenticate` by the token's stored hash (the dashboard's session keeps the
        hash, never the token): None once the token is revoked."""
        key = TOKEN + token_hash
        cached: _CachedToken | None = await self.cache.get(key, since)
        if cached is not None:
            now = self.cache.clock()
            if now - cached.recorded_at >= _TOUCH_EVERY_NS:
                cached.recorded_at = now
                self._touch_later(cached.id)
            return cached.principal
        generation = self.cache.generation
        found = await self.store.lookup_token(token_hash)
        if found is None or found.revoked_at is not None:
            return None
        if found.touch_due:
            await self.store.touch_token(found.id)
        principal = Principal.parse(found.principal)
        self.cache.put(key, _CachedToken(found.id, principal, self.cache.clock()), generation)
        return principal

    def _touch_later(self, token_id: str) -> None:
        self._touch_ids.add(token_id)
        if self._touch_task is None or self._touch_task.done():
            self._touch_task = asyncio.create_task(self._record_uses())

    async def _record_uses(self) -> None:
        """One UPDATE for every cached token whose use is due to be recorded (fire and forget:
        a failure only leaves ``last_used_at`` a little older)."""
        while self._touch_ids:
            ids = sorted(self._touch_ids)
            self._touch_ids.clear()
            try:
                await self.store.touch_tokens(ids)
            except Exception as exc:
                log.warning("could not record the use of %d API tokens: %s", len(ids), exc)

    async def list_tokens(self, principal: str | None = None) -> list[TokenRow]:
        """The tokens of ``principal`` (None: everyone's), oldest first; never their hashes."""
        return await self.store.list_tokens(principal)

    async def id_of(self, raw: str) -> str | None:
        """The id of the API token ``raw``, revoked or not, looked up by its hash (None: no
        token has it). Records no use: an operator naming a token is not a request with it."""
        found = await self.store.lookup_token(hash_token(raw))
        return None if found is None else found.id

    async def revoke(self, token_id: str) -> TokenRow:
        """Revoke at once: the database trigger tells every API process to forget the token."""
        row = await self.store.revoke_token(token_id)
        if row is None:
            raise NotFound(f"token {token_id!r} does not exist")
        return row
