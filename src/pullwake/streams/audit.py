"""The wake reader's credential check: every open session of a process re-checked together, with
one batched Postgres lookup of their API tokens and runners (instead of one lookup per session
per keep-alive)."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

from pullwake.model import AdminStatus
from pullwake.store.sessions import SessionAccess
from pullwake.streams.reader import WakeSession

__all__ = ["AccessStore", "Credential", "check_sessions"]

_HOOK_CONCURRENCY = 16


@dataclass(frozen=True, slots=True)
class Credential:
    """Who opened a session and how to check they still may: the API token's hash (looked up
    with every other session's), or ``recheck`` (a host's authentication hook, asked again:
    a reason to close, or None). Neither: the principal stands (dev mode's asserted identity).
    The runner's owner and admin status are checked for every session."""

    principal: str
    token_hash: str | None = None
    recheck: Callable[[], Awaitable[str | None]] | None = None


class AccessStore(Protocol):
    async def sse_access(self, token_hashes: list[str], runner_ids: list[str]) -> SessionAccess: ...


async def check_sessions(store: AccessStore, sessions: Sequence[WakeSession]) -> list[str | None]:
    """Why each session must close (None: it may stay): its token revoked or gone, its runner
    deleted, disabled or owned by another principal now."""
    credentials = [_credential(s) for s in sessions]
    hashes = sorted({c.token_hash for c in credentials if c.token_hash is not None})
    runner_ids = sorted({s.runner_id for s in sessions})
    access = await store.sse_access(hashes, runner_ids)
    reasons: list[str | None] = []
    for session, credential in zip(sessions, credentials, strict=True):
        reasons.append(_reason(access, session.runner_id, credential))
    hooks = [
        (i, c.recheck)
        for i, c in enumerate(credentials)
        if c.recheck is not None and reasons[i] is None
    ]
    if hooks:
        limit = asyncio.Semaphore(_HOOK_CONCURRENCY)

        async def ask(recheck: Callable[[], Awaitable[str | None]]) -> str | None:
            async with limit:
                return await recheck()

        answers = await asyncio.gather(*(ask(recheck) for _, recheck in hooks))
        for (i, _), answer in zip(hooks, answers, strict=True):
            reasons[i] = answer
    return reasons


def _credential(session: WakeSession) -> Credential:
    credential = session.credential
    assert isinstance(credential, Credential), "a wake session without its credential"
    return credential


def _reason(access: SessionAccess, runner_id: str, credential: Credential) -> str | None:
    if credential.token_hash is not None:
        holder = access.tokens.get(credential.token_hash)
        if holder is None:
            return "the API token is unknown or revoked"
        if holder != credential.principal:
            return "the API token belongs to another principal"
    runner = access.runners.get(runner_id)
    if runner is None:
        return f"runner {runner_id!r} does not exist"
    owner, admin_status = runner
    if owner != credential.principal:
        return f"runner {runner_id!r} is owned by another principal"
    if admin_status != AdminStatus.ENABLED.value:
        return f"runner {runner_id!r} is disabled"
    return None
