"""What the typed query mixins need of :class:`~pullwake.store.pg.Store`: its named-query
helpers. Each mixin (``store/entities.py``, ``store/recovery.py``, ``store/retention.py``,
``store/ops.py``, ``store/runners.py``, ``store/tokens.py``) turns named queries into typed
calls over these, so no query name, argument list or row leaves ``store/``; ``Store`` inherits
every mixin and implements the helpers."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any, Protocol, TypeVar

import asyncpg

if TYPE_CHECKING:
    from pullwake.store.pg import Conn

__all__ = ["QueryAccess"]

T = TypeVar("T")


class QueryAccess(Protocol):
    """The named-query helpers of ``Store``: one pooled connection per call, or a
    transaction."""

    async def transact(self, work: Callable[[Conn], Awaitable[T]], *, attempts: int = 3) -> T: ...

    async def fetchrow(self, name: str, *args: Any) -> asyncpg.Record | None: ...

    async def fetch(self, name: str, *args: Any) -> list[asyncpg.Record]: ...

    async def fetchval(self, name: str, *args: Any) -> Any: ...

    async def execute(self, name: str, *args: Any) -> str: ...
