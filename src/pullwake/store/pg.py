"""asyncpg pool, named-query access and driver-error translation."""

from __future__ import annotations

import asyncio
import logging
import re
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from functools import cache
from importlib import resources
from typing import Any, TypeVar

import asyncpg
import msgspec

from pullwake.errors import Unavailable

__all__ = ["Conn", "RawJson", "Store", "load_queries", "q"]

log = logging.getLogger(__name__)
T = TypeVar("T")

_NAME_RE = re.compile(r"^-- name: (\w+)\s*$", re.MULTILINE)
# Errors that mean "Postgres is not there right now": answered with 503 UNAVAILABLE.
_UNAVAILABLE = (
    OSError,
    asyncio.TimeoutError,
    asyncpg.PostgresConnectionError,
    asyncpg.InterfaceError,
    asyncpg.CannotConnectNowError,
    asyncpg.TooManyConnectionsError,
    asyncpg.AdminShutdownError,
    asyncpg.CrashShutdownError,
    # A pooled connection whose backend was terminated while idle fails its next use with
    # "cannot switch to state ..; another operation (2) is in progress" (the FATAL notice is
    # being consumed) before asyncpg sees the socket close: the same outage, not a bug.
    asyncpg.InternalClientError,
)
_RETRYABLE_SQLSTATES = {"40001", "40P01"}  # serialization failure, deadlock


class RawJson(str):
    """Already-encoded JSON text, stored as is into a jsonb column."""


_encode = msgspec.json.Encoder().encode
_decode = msgspec.json.Decoder().decode


def _jsonb_encode(value: Any) -> str:
    if isinstance(value, RawJson):
        return str(value)
    return _encode(value).decode()


@cache
def load_queries() -> dict[str, str]:
    """Parse ``queries.sql`` into ``{name: sql}``."""
    text = resources.files("pullwake.store").joinpath("queries.sql").read_text()
    parts = _NAME_RE.split(text)
    return {parts[i]: parts[i + 1].strip() for i in range(1, len(parts), 2)}


def q(name: str) -> str:
    """The SQL of the named query (KeyError names the missing query)."""
    return load_queries()[name]


async def _init_connection(conn: asyncpg.Connection) -> None:
    for type_name in ("jsonb", "json"):
        await conn.set_type_codec(
            type_name, encoder=_jsonb_encode, decoder=_decode, schema="pg_catalog"
        )


_ROLLBACK = "ROLLBACK"


async def _reset_connection(conn: asyncpg.Connection) -> None:
    # asyncpg's default reset costs a round trip per release (RESET ALL, UNLISTEN, ...); pullwake
    # keeps no session state, so only a transaction left open by a cancelled request matters.
    if conn.is_in_transaction():
        await conn.execute(_ROLLBACK)


class Conn:
    """One connection (usually inside a transaction); runs named queries."""

    def __init__(self, raw: Any) -> None:
        self.raw = raw

    async def fetchrow(self, name: str, *args: Any) -> asyncpg.Record | None:
        row: asyncpg.Record | None = await self.raw.fetchrow(q(name), *args)
        return row

    async def fetch(self, name: str, *args: Any) -> list[asyncpg.Record]:
        rows: list[asyncpg.Record] = await self.raw.fetch(q(name), *args)
        return rows

    async def fetchval(self, name: str, *args: Any) -> Any:
        return await self.raw.fetchval(q(name), *args)

    async def execute(self, name: str, *args: Any) -> str:
        status: str = await self.raw.execute(q(name), *args)
        return status


class Store:
    """The Postgres side of pullwake: a pool plus transactional helpers."""

    def __init__(self, pool: asyncpg.Pool) -> None:
        self.pool = pool
        self.observer: Callable[[Any], None] | None = None
        """Called with every statement sent (asyncpg's query logger): tests count round trips."""

    @classmethod
    async def connect(cls, dsn: str, *, min_size: int = 1, max_size: int = 10) -> Store:
        """Open a pool with the JSON codecs installed."""
        try:
            pool = await asyncpg.create_pool(
                dsn,
                min_size=min_size,
                max_size=max_size,
                init=_init_connection,
                reset=_reset_connection,
                command_timeout=30,
            )
        except _UNAVAILABLE as exc:
            raise Unavailable(f"cannot connect to Postgres: {type(exc).__name__}") from exc
        return cls(pool)

    async def close(self, timeout_s: float = 10) -> None:
        """Close the pool gracefully; connections still in use after ``timeout_s`` are
        terminated, so a shutdown never hangs on a stuck query."""
        try:
            await asyncio.wait_for(self.pool.close(), timeout_s)
        except TimeoutError:
            log.warning("Postgres pool did not close within %.0f s; terminating it", timeout_s)
            self.pool.terminate()

    @asynccontextmanager
    async def connection(self) -> AsyncIterator[Conn]:
        """A pooled connection without a transaction; driver outages become Unavailable."""
        try:
            async with self.pool.acquire(timeout=10) as raw:
                observer = self.observer
                if observer is None:
                    yield Conn(raw)
                    return
                raw.add_query_logger(observer)
                try:
                    yield Conn(raw)
                finally:
                    raw.remove_query_logger(observer)
        except _UNAVAILABLE as exc:
            raise Unavailable(f"Postgres unavailable: {type(exc).__name__}") from exc

    async def transact(self, work: Callable[[Conn], Awaitable[T]], *, attempts: int = 3) -> T:
        """Run ``work`` in one transaction, retrying on deadlock/serialization failures."""
        for attempt in range(1, attempts + 1):
            try:
                async with self.connection() as conn, conn.raw.transaction():
                    return await work(conn)
            except asyncpg.PostgresError as exc:
                if exc.sqlstate not in _RETRYABLE_SQLSTATES or attempt == attempts:
                    raise
                log.info("retrying transaction after %s (attempt %d)", exc.sqlstate, attempt)
        raise AssertionError("unreachable")

    async def fetchrow(self, name: str, *args: Any) -> asyncpg.Record | None:
        async with self.connection() as conn:
            return await conn.fetchrow(name, *args)

    async def fetch(self, name: str, *args: Any) -> list[asyncpg.Record]:
        async with self.connection() as conn:
            return await conn.fetch(name, *args)

    async def fetchval(self, name: str, *args: Any) -> Any:
        async with self.connection() as conn:
            return await conn.fetchval(name, *args)

    async def execute(self, name: str, *args: Any) -> str:
        async with self.connection() as conn:
            return await conn.execute(name, *args)

    async def ping(self) -> bool:
        """True when a trivial query succeeds."""
        try:
            await self.fetchval("schema_now")
        except Unavailable:
            return False
        return True
