"""asyncpg pool, named-query access and driver-error translation."""

from __future__ import annotations

import asyncio
import logging
import re
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import asynccontextmanager
from functools import cache
from importlib import resources
from typing import Any, TypeVar

import asyncpg
import msgspec

from pullwake.errors import Unavailable
from pullwake.store.combine import SendCombiner, SendItem
from pullwake.store.entities import EntityQueries
from pullwake.store.ops import OpsQueries
from pullwake.store.recovery import RecoveryQueries
from pullwake.store.retention import RetentionQueries
from pullwake.store.runners import RunnerQueries
from pullwake.store.sessions import SessionQueries
from pullwake.store.steps import LiveClaim, Step, StepLimits
from pullwake.store.tokens import TokenQueries
from pullwake.store.ui import UiQueries

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
_STATEMENT_CACHE_SIZE = 100  # asyncpg's default: prepared statements per connection


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


class Store(
    EntityQueries,
    RecoveryQueries,
    RetentionQueries,
    OpsQueries,
    RunnerQueries,
    TokenQueries,
    SessionQueries,
    UiQueries,
):
    """The Postgres side of pullwake: a pool plus transactional helpers; the state machine's
    steps below, the typed reads and small writes in the query mixins it inherits."""

    def __init__(self, pool: asyncpg.Pool, *, combine_sends: bool = True) -> None:
        self.pool = pool
        self.observer: Callable[[Any], None] | None = None
        """Called with every statement sent (asyncpg's query logger): tests count round trips."""
        self.combine_sends = combine_sends
        """Single sends that arrive while others are in flight share one call (see
        :mod:`pullwake.store.combine`)."""
        self._combiners: dict[int, SendCombiner] = {}

    @classmethod
    async def connect(
        cls, dsn: str, *, min_size: int = 1, max_size: int = 10, transaction_pooling: bool = False
    ) -> Store:
        """Open a pool with the JSON codecs installed.

        ``transaction_pooling``: ``dsn`` is a pooler that hands each transaction (each
        autocommitted statement) to any of its server connections, such as PgBouncer's
        ``pool_mode = transaction``. asyncpg's statement cache is then turned off: a named
        prepared statement lives on one server connection, so its next use, sent elsewhere,
        would fail (``prepared statement "__asyncpg_stmt_N__" does not exist``, or ``already
        exists`` where another process's statement of that name was left behind). Statements
        are unnamed instead, parsed again in the same sync as their execution (one more round
        trip each: asyncpg asks for their types first). Nothing else pullwake does on the
        pool outlives a transaction: the reset below only rolls back, the one advisory lock
        is ``pg_advisory_xact_lock`` inside a transaction, and there is no ``SET``, cursor,
        temporary table or ``LISTEN`` (the auth cache's has a connection of its own,
        ``PULLWAKE_LISTEN_DATABASE_URL``)."""
        try:
            pool = await asyncpg.create_pool(
                dsn,
                min_size=min_size,
                max_size=max_size,
                init=_init_connection,
                reset=_reset_connection,
                command_timeout=30,
                statement_cache_size=0 if transaction_pooling else _STATEMENT_CACHE_SIZE,
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

    # --- the state machine: one autocommitted call per state change (migration 0007) -------

    async def _step_rows(self, name: str, *args: Any) -> list[asyncpg.Record]:
        """Run one state-machine call, retrying on deadlock/serialization failures."""
        for attempt in range(1, 4):
            try:
                async with self.connection() as conn:
                    return await conn.fetch(name, *args)
            except asyncpg.PostgresError as exc:
                if exc.sqlstate not in _RETRYABLE_SQLSTATES or attempt == 3:
                    raise
                log.info("retrying %s after %s (attempt %d)", name, exc.sqlstate, attempt)
        raise AssertionError("unreachable")

    async def _step(self, name: str, *args: Any) -> Step:
        rows = await self._step_rows(name, *args)
        return Step(*rows[0])

    async def send(
        self,
        url: str,
        payload: RawJson,
        size: int,
        idempotency_key: str | None,
        sender: str,
        *,
        check_members: bool,
        limits: StepLimits,
    ) -> Step:
        """Append to the inbox and wake, coalesce or hold."""
        item = SendItem(url, payload, size, idempotency_key, sender, check_members)
        if not self.combine_sends:
            return await self._send_one(item, limits.max_attempts)
        return await self.combiner(limits.max_attempts).send(item)

    def combiner(self, max_attempts: int) -> SendCombiner:
        """The combiner of the sends made with these limits."""
        combiner = self._combiners.get(max_attempts)
        if combiner is None:

            async def one(item: SendItem) -> Step:
                return await self._send_one(item, max_attempts)

            async def many(items: Sequence[SendItem]) -> list[Step]:
                return await self.send_many(items, max_attempts)

            combiner = self._combiners[max_attempts] = SendCombiner(one, many)
        return combiner

    async def _send_one(self, item: SendItem, max_attempts: int) -> Step:
        return await self._step(
            "step_send",
            item.url,
            RawJson(item.payload),
            item.size,
            item.idempotency_key,
            item.sender,
            item.check_members,
            max_attempts,
        )

    async def send_many(self, items: Sequence[SendItem], max_attempts: int) -> list[Step]:
        """Sends of any entities and senders in one call; a step per item, in order."""
        rows = await self._step_rows(
            "step_send_many",
            [i.url for i in items],
            [RawJson(i.payload) for i in items],
            [i.size for i in items],
            [i.idempotency_key for i in items],
            [i.sender for i in items],
            [i.check_members for i in items],
            max_attempts,
        )
        by_item = {row[0]: Step(*tuple(row)[1:]) for row in rows}
        if len(by_item) != len(items):
            raise AssertionError(f"pullwake_send_many answered {len(by_item)} of {len(items)}")
        return [by_item[n] for n in range(len(items))]

    async def send_batch(
        self,
        urls: list[str],
        payloads: list[RawJson],
        sizes: list[int],
        idempotency_keys: list[str | None],
        sender: str,
        *,
        check_members: bool,
        limits: StepLimits,
    ) -> list[tuple[int, Step]]:
        """Many sends in one call: ``(index in the lists, step)`` per item, in order."""
        rows = await self._step_rows(
            "step_send_batch",
            urls,
            payloads,
            sizes,
            idempotency_keys,
            sender,
            check_members,
            limits.max_attempts,
        )
        return [(row[0], Step(*tuple(row)[1:])) for row in rows]

    async def claim(
        self,
        runner_id: str,
        wake_id: str,
        entry_id: str | None,
        owner: str | None,
        token_hash: str,
        limits: StepLimits,
    ) -> Step:
        """A runner claims its entity's outstanding wake (``owner``: the runner's owner)."""
        return await self._step(
            "step_claim",
            runner_id,
            wake_id,
            entry_id,
            owner,
            token_hash,
            limits.lease_ms,
            limits.batch_messages,
            limits.batch_bytes,
            limits.max_attempts,
        )

    async def heartbeat(
        self, claim_id: str, token_hash: str, epoch: int, limits: StepLimits
    ) -> Step:
        """The live holder extends its lease."""
        return await self._step(
            "step_heartbeat", claim_id, token_hash, epoch, limits.lease_ms, limits.max_attempts
        )

    async def done(
        self,
        claim_id: str,
        token_hash: str,
        epoch: int,
        acked_offset: int,
        next_token_hash: str | None,
        limits: StepLimits,
    ) -> Step:
        """Ack, release, wake again; with ``next_token_hash`` the holder may chain."""
        return await self._step(
            "step_done",
            claim_id,
            token_hash,
            epoch,
            acked_offset,
            next_token_hash is not None,
            next_token_hash,
            limits.lease_ms,
            limits.batch_messages,
            limits.batch_bytes,
            limits.max_attempts,
        )

    async def release(
        self, claim_id: str, token_hash: str, epoch: int, error: str | None, limits: StepLimits
    ) -> Step:
        """The holder gives the claim up without acking."""
        return await self._step(
            "step_release", claim_id, token_hash, epoch, error, limits.max_attempts
        )

    async def append_event(
        self, token_hash: str, url: str, payload: RawJson, epoch: int | None, limits: StepLimits
    ) -> Step:
        """A fenced append to the entity's events log."""
        return await self._step("step_event", token_hash, url, payload, epoch, limits.max_attempts)

    async def signal(
        self, url: str, principal: str | None, signal: str, limits: StepLimits
    ) -> Step:
        """pause | resume | stop | kill (``principal`` must be the creator; None: operator)."""
        return await self._step("step_signal", url, principal, signal, limits.max_attempts)

    async def expire_leases(self, limit: int, limits: StepLimits) -> list[Step]:
        """Expire up to ``limit`` passed leases and hand their work on; a step per claim."""
        rows = await self._step_rows("step_expire_leases", limit, limits.max_attempts)
        return [Step(*row) for row in rows]

    async def wake_entity(self, url: str, reason: str) -> Step:
        """A wake for ``url`` if the rules allow one now."""
        return await self._step("step_wake_entity", url, reason)

    async def detach_runner(self, url: str, runner_id: str, limits: StepLimits) -> Step:
        """A deleted runner lets go of ``url``: its claim released, its wake retired."""
        return await self._step("step_detach_runner", url, runner_id, limits.max_attempts)

    async def claim_webhook(self, wake_id: str, token_hash: str, limits: StepLimits) -> Step:
        """The worker claims (or re-claims, with a new token) a webhook wake."""
        return await self._step(
            "step_claim_webhook",
            wake_id,
            token_hash,
            limits.lease_ms,
            limits.batch_messages,
            limits.batch_bytes,
            limits.max_attempts,
        )

    async def fail_webhook(
        self, wake_id: str, error: str, attempts: int, limits: StepLimits
    ) -> Step:
        """Dead letter a webhook wake; its entity is parked."""
        return await self._step("step_fail_webhook", wake_id, error, attempts, limits.max_attempts)

    async def record_webhook_attempt(self, wake_id: str, error: str | None) -> None:
        """Count a delivery attempt; a success (no error) marks the wake delivered."""
        await self.execute("wake_record_attempt", wake_id, error)

    async def wake_target(self, wake_id: str) -> dict[str, Any] | None:
        """The target a wake was created for (None: no such wake)."""
        row = await self.fetchrow("wake_get", wake_id)
        return None if row is None else dict(row["target"])

    async def live_claim(self, token_hash: str) -> LiveClaim | None:
        """The claim holding this token, if any."""
        row = await self.fetchrow("claim_by_token", token_hash)
        if row is None:
            return None
        return LiveClaim(
            row["id"], row["entity_url"], row["status"], row["lease_expires_at"] <= row["now"]
        )

    async def ping(self) -> bool:
        """True when a trivial query succeeds."""
        try:
            await self.fetchval("schema_now")
        except Unavailable:
            return False
        return True
