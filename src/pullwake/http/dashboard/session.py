"""The dashboard's sessions and CSRF tokens, kept in Redis.

A browser holds a random session id in a cookie (``HttpOnly; SameSite=Strict; Path=<dashboard
path>``, ``Secure`` over https). Redis keeps the session under
``<prefix>:ui:session:<sha256 of the id>`` with a TTL (a Redis reader cannot use the key as a
cookie) holding who the session is for (an API token's hash and principal, never the token), and
its CSRF token. Each request checks the token again (through the auth cache, so a revoked token
ends the session on the next request).

Litestar's ``CSRFConfig`` is app-wide: it would check every unsafe request of the host app too
(and pullwake's own JSON API, whose callers send bearer tokens, not cookies). The dashboard
checks its own CSRF token on its own router instead.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from dataclasses import dataclass
from typing import Any

import msgspec
from litestar import Request

from pullwake.services import Services

__all__ = ["COOKIE", "CSRF_FIELD", "CSRF_HEADER", "LOGIN_COOKIE", "Session", "Sessions"]

COOKIE = "pullwake_session"
LOGIN_COOKIE = "pullwake_login"
"""The login form's own session (its CSRF token): a cookie apart, so that showing the form never
replaces a session cookie the browser did not send (``SameSite=Strict`` from another site)."""
CSRF_HEADER = "x-csrf-token"
CSRF_FIELD = "csrf_token"
SESSION_TTL_S = 8 * 3600
"""A session ends after this long without a request."""
ANONYMOUS_TTL_S = 15 * 60
"""A login form's session (only its CSRF token) lasts this long."""


class Session(msgspec.Struct, frozen=True, kw_only=True):
    """What Redis keeps of a session."""

    kind: str
    """``token`` (logged in with an API token), ``dev`` (dev mode's asserted identity),
    ``hook`` (the host's ``authenticate`` hook) or ``anonymous`` (a login form)."""
    csrf: str
    principal: str | None = None
    token_hash: str | None = None


@dataclass(frozen=True, slots=True)
class Sessions:
    """Sessions of one deployment (its Redis key prefix)."""

    services: Services

    def _key(self, session_id: str) -> str:
        digest = hashlib.sha256(session_id.encode()).hexdigest()
        return f"{self.services.settings.redis_key_prefix}:ui:session:{digest}"

    async def load(
        self, request: Request[Any, Any, Any], cookie: str = COOKIE
    ) -> tuple[str, Session] | None:
        """The request's session (its id and data), its TTL renewed; None without one."""
        session_id = request.cookies.get(cookie)
        if not session_id or len(session_id) > 100:
            return None
        raw = await self.services.redis.getex(self._key(session_id), ex=SESSION_TTL_S)
        if raw is None:
            return None
        try:
            session = msgspec.json.decode(raw, type=Session)
        except msgspec.DecodeError:
            return None
        if session.kind == "anonymous":  # a login form's session keeps its short life
            await self.services.redis.expire(self._key(session_id), ANONYMOUS_TTL_S)
        return session_id, session

    async def create(
        self, kind: str, *, principal: str | None = None, token_hash: str | None = None
    ) -> tuple[str, Session]:
        """A new session with a fresh id and CSRF token (a login never reuses an id)."""
        session_id = secrets.token_urlsafe(32)
        session = Session(
            kind=kind, csrf=secrets.token_urlsafe(32), principal=principal, token_hash=token_hash
        )
        ttl = ANONYMOUS_TTL_S if kind == "anonymous" else SESSION_TTL_S
        await self.services.redis.set(self._key(session_id), msgspec.json.encode(session), ex=ttl)
        return session_id, session

    async def end(self, session_id: str) -> None:
        await self.services.redis.delete(self._key(session_id))


def csrf_ok(session: Session | None, sent: str | None) -> bool:
    """Whether ``sent`` is the session's CSRF token (constant-time)."""
    if session is None or not sent:
        return False
    return hmac.compare_digest(session.csrf.encode(), sent.encode())
