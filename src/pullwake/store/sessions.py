"""Typed query of open wake streams' credentials: the live API tokens and the runners of many
sessions at once (the wake reader re-checks every session of a process with one query)."""

from __future__ import annotations

from dataclasses import dataclass

from pullwake.store.access import QueryAccess

__all__ = ["SessionAccess", "SessionQueries"]


@dataclass(frozen=True, slots=True)
class SessionAccess:
    """``tokens``: token hash → principal, for the tokens that exist and are not revoked;
    ``runners``: runner id → (owner principal, admin status), for the runners that exist."""

    tokens: dict[str, str]
    runners: dict[str, tuple[str, str]]


class SessionQueries(QueryAccess):
    """Wake-stream sessions' credentials, checked together."""

    async def sse_access(self, token_hashes: list[str], runner_ids: list[str]) -> SessionAccess:
        """The live tokens among ``token_hashes`` and the runners among ``runner_ids``, in one
        statement."""
        tokens: dict[str, str] = {}
        runners: dict[str, tuple[str, str]] = {}
        for row in await self.fetch("sse_access_check", token_hashes, runner_ids):
            if row["kind"] == "t":
                tokens[row["key"]] = row["owner"]
            else:
                runners[row["key"]] = (row["owner"], row["admin_status"])
        return SessionAccess(tokens, runners)
