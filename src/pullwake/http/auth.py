"""Who is calling: API tokens, claim tokens, dev asserted identity and a host hook."""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from typing import Any

from litestar import Request

from pullwake.config import Settings
from pullwake.core.tokens import Tokens
from pullwake.errors import Unauthorized
from pullwake.model import Principal

__all__ = ["Authenticate", "bearer", "claim_token", "request_since", "resolve_principal"]

Authenticate = Callable[[Request[Any, Any, Any]], Awaitable[Principal | None]]
"""A host application's hook: return the caller's principal, or None to fall through."""

DEV_LOCAL = Principal("system", "dev-local")
ASSERTED_EMAIL = "x-pullwake-asserted-email"
ASSERTED_NAME = "x-pullwake-asserted-name"
_SINCE = "pullwake_auth_since"


def request_since(request: Request[Any, Any, Any]) -> int:
    """When the request's credentials were first checked (``time.monotonic_ns``): the runner
    checks that follow in the same request reuse it, so strict mode's listener round that
    confirmed the token confirms the runner too (see :mod:`pullwake.authcache`)."""
    since: int | None = request.state.get(_SINCE)
    if since is None:
        since = time.monotonic_ns()
        request.state[_SINCE] = since
    return since


def bearer(request: Request[Any, Any, Any]) -> str | None:
    """The bearer credential, if any (the first ``Authorization`` header). Read from the raw
    ASGI headers: ``request.headers`` would decode and keep every header for the request's
    life, a kilobyte per open wake stream."""
    header = next(
        (v.decode("latin-1") for k, v in request.scope["headers"] if k == b"authorization"), None
    )
    if not header:
        return None
    scheme, _, value = header.partition(" ")
    if scheme.lower() != "bearer" or not value.strip():
        raise Unauthorized("Authorization must be 'Bearer <token>'")
    return value.strip()


async def resolve_principal(
    request: Request[Any, Any, Any],
    tokens: Tokens,
    settings: Settings,
    authenticate: Authenticate | None,
    *,
    since: int | None = None,
) -> Principal:
    """Authenticate the caller or raise 401. A known token costs no Postgres lookup (it is
    cached, see :mod:`pullwake.authcache`); ``since`` defaults to :func:`request_since`."""
    if authenticate is not None:
        principal = await authenticate(request)
        if principal is not None:
            return principal
    token = bearer(request)
    if token is not None:
        if token.startswith("pwc_"):
            raise Unauthorized("a claim token (pwc_) cannot be used here; use an API token")
        principal = None
        if token.startswith("pwk_"):
            if since is None:
                since = request_since(request)
            principal = await tokens.authenticate(token, since=since)
        if principal is None:
            raise Unauthorized("the API token is unknown or revoked")
        return principal
    if settings.dev_asserted_auth:
        email = request.headers.get(ASSERTED_EMAIL, "").strip()
        if email:
            try:
                return Principal.parse(f"user:{email}")
            except ValueError as exc:
                raise Unauthorized(f"bad {ASSERTED_EMAIL} header: {exc}") from None
        return DEV_LOCAL
    raise Unauthorized("missing credentials: send 'Authorization: Bearer pwk_...'")


def claim_token(request: Request[Any, Any, Any]) -> str:
    """The claim token of a claim callback, or 401."""
    token = bearer(request)
    if token is None:
        raise Unauthorized("this endpoint needs the claim token: 'Authorization: Bearer pwc_...'")
    if not token.startswith("pwc_"):
        raise Unauthorized("this endpoint needs a claim token (pwc_), not an API token")
    return token
