"""The in-process cache of what authenticates a request, and the listener that keeps it true.

Cached: API token (by hash) → principal, and runner id → owner and admin status. Postgres says
when those rows change: triggers on ``principals_tokens``, ``runners`` and ``runner_id_owners``
(migration 0008) ``pg_notify('pullwake_invalidate', key)`` on every UPDATE of a cached column,
every DELETE and every TRUNCATE (``*``: everything). Whoever makes the change, the API, ``pullwake
tokens revoke`` or raw SQL, each API process hears it on its own listener connection
(:class:`Listener`) and drops the entry. Entries also expire after ``PULLWAKE_AUTH_CACHE_TTL_MS``
(0 turns the cache off), and at most ``PULLWAKE_AUTH_CACHE_MAX_ENTRIES`` are kept (least recently
used first out). Only positive answers are cached: an unknown token or runner is asked again.

Nothing is cached while the listener is not connected: losing it clears the cache at once, and
filling resumes only once LISTEN is back (a fill that started before then is dropped).

Strict mode (``PULLWAKE_AUTH_CACHE_STRICT``, the default): Postgres sends a notification at
commit, before the committing client has its answer, but it reaches this process a little
later: microseconds usually, tens of milliseconds on a busy host. So a client that saw its revoke
commit could still be let in by the request it sends next. In strict mode an entry is used only
once a round trip on the listener's connection that started after the request came in has
answered: Postgres hands a connection every notification waiting for it before it answers a
command there, so every change committed before the request is known by then. The round is
``SELECT pg_backend_pid()`` on that one connection (no table, no pool connection), shared by all
the requests waiting at that moment, and a request checks its token and its runner with the same
round. Without strict mode a hit costs no round trip at all, and a change counts here once its
notification has arrived.

PgBouncer: LISTEN needs a session of its own, which transaction pooling does not give. Point
``PULLWAKE_LISTEN_DATABASE_URL`` at Postgres itself (or a session-mode pool). With
``PULLWAKE_PG_TRANSACTION_POOLING`` on and no such URL there is no listener and no caching (every
request looks its token up, as without the cache). Otherwise the listener checks that its rounds
reach the backend that listens; when they do not, caching stays off too.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import OrderedDict
from collections.abc import AsyncIterator, Callable
from typing import Any

import asyncpg
from prometheus_client import Counter, Gauge

from pullwake.config import Settings
from pullwake.metrics import REGISTRY

__all__ = [
    "ALL",
    "CHANNEL",
    "RUNNER",
    "TOKEN",
    "AuthCache",
    "Listener",
    "listening",
]

log = logging.getLogger(__name__)

CHANNEL = "pullwake_invalidate"
"""The notification channel of the invalidation triggers."""
ALL = "*"
"""A notification payload that drops every entry (a TRUNCATE)."""
TOKEN = "t:"
"""Key prefix of an API token's entry: ``t:<sha256 hex of the token>``."""
RUNNER = "r:"
"""Key prefix of a runner's entry: ``r:<runner id>``."""

LOOKUPS = Counter(
    "pullwake_auth_cache_lookups",
    "API token and runner checks of the API, by what answered them",
    ["kind", "result"],
    registry=REGISTRY,
)
LISTENING = Gauge(
    "pullwake_auth_cache_listening",
    "1 while this process holds its invalidation LISTEN (the auth cache is in use), else 0",
    registry=REGISTRY,
)

_KINDS = {TOKEN: "token", RUNNER: "runner"}


def _kind(key: str) -> str:
    return _KINDS.get(key[:2], "other")


class AuthCache:
    """A bounded LRU of credentials with a TTL, in use only while a :class:`Listener` is."""

    def __init__(
        self,
        *,
        ttl_ms: int,
        max_entries: int,
        strict: bool = True,
        clock: Callable[[], int] = time.monotonic_ns,
    ) -> None:
        self.ttl_ns = ttl_ms * 1_000_000
        self.max_entries = max_entries
        self.strict = strict
        self.clock = clock
        self.listener: Listener | None = None
        """The listener keeping this cache in use (set by :meth:`Listener.start`)."""
        self._entries: OrderedDict[str, tuple[int, Any]] = OrderedDict()
        self._generation = 0
        self._active = False

    @classmethod
    def from_settings(cls, settings: Settings) -> AuthCache:
        return cls(
            ttl_ms=settings.auth_cache_ttl_ms,
            max_entries=settings.auth_cache_max_entries,
            strict=settings.auth_cache_strict,
        )

    @property
    def enabled(self) -> bool:
        """Whether caching is configured at all (``PULLWAKE_AUTH_CACHE_TTL_MS`` > 0)."""
        return self.ttl_ns > 0

    @property
    def active(self) -> bool:
        """True while the listener holds LISTEN: only then are entries kept and used."""
        return self._active

    @property
    def generation(self) -> int:
        """Changes whenever anything is dropped: read it before a fill's query, pass it to
        :meth:`put`, and a fill that raced an invalidation is not stored."""
        return self._generation

    def __len__(self) -> int:
        return len(self._entries)

    def peek(self, key: str) -> Any | None:
        """The live entry, without waiting for the listener (strict mode does, in :meth:`get`)."""
        if not self._active:
            return None
        item = self._entries.get(key)
        if item is None:
            return None
        expires, value = item
        if self.clock() >= expires:
            del self._entries[key]
            return None
        self._entries.move_to_end(key)
        return value

    async def get(self, key: str, since: int | None = None) -> Any | None:
        """The entry, or None (a miss: look it up and :meth:`put` it).

        ``since`` (``time.monotonic_ns()``, default now) is when the request came in: in strict
        mode a hit waits for a listener round that started after it, so a change committed
        before the request is never missed."""
        if not self._active:
            LOOKUPS.labels(_kind(key), "off").inc()
            return None
        value = self.peek(key)
        if value is not None and self.strict:
            listener = self.listener
            caught_up = listener is not None and await listener.caught_up(
                self.clock() if since is None else since
            )
            value = self.peek(key) if caught_up else None
        LOOKUPS.labels(_kind(key), "miss" if value is None else "hit").inc()
        return value

    def put(self, key: str, value: Any, generation: int) -> bool:
        """Store ``value`` unless the cache is off or something was dropped since
        ``generation`` was read (the value may be older than that drop)."""
        if not self._active or generation != self._generation:
            return False
        self._entries[key] = (self.clock() + self.ttl_ns, value)
        self._entries.move_to_end(key)
        while len(self._entries) > self.max_entries:
            self._entries.popitem(last=False)
        return True

    def drop(self, key: str) -> None:
        """Forget one entry (``*``: all of them)."""
        self._generation += 1
        if key == ALL:
            self._entries.clear()
        else:
            self._entries.pop(key, None)

    def clear(self) -> None:
        self.drop(ALL)

    def activate(self) -> None:
        """The listener holds LISTEN: start caching, from empty."""
        self.clear()
        self._active = True
        LISTENING.set(1)

    def deactivate(self) -> None:
        """The listener is gone: forget everything and cache nothing until it is back."""
        self.clear()
        if self._active:
            self._active = False
            LISTENING.set(0)


_Error = (
    OSError,
    TimeoutError,
    asyncpg.PostgresError,
    asyncpg.InterfaceError,
    asyncpg.InternalClientError,
)


class Listener:
    """One process's LISTEN connection: drops entries as notifications arrive, keeps the cache
    in use only while connected, and answers strict mode's "caught up since?" question.

    A round (``SELECT pg_backend_pid()``) runs when a strict lookup asks for one, and every
    ``health_interval_s`` otherwise: one that fails, times out or reaches another backend than
    the one listening counts as a lost connection. Reconnects back off up to ``max_backoff_s``.
    """

    def __init__(
        self,
        cache: AuthCache,
        dsn: str,
        *,
        health_interval_s: float = 5.0,
        round_timeout_s: float = 2.0,
        connect_timeout_s: float = 5.0,
        max_backoff_s: float = 2.0,
    ) -> None:
        self.cache = cache
        self.dsn = dsn
        self.health_interval_s = health_interval_s
        self.round_timeout_s = round_timeout_s
        self.connect_timeout_s = connect_timeout_s
        self.max_backoff_s = max_backoff_s
        self.rounds = 0
        """Rounds answered for strict lookups (tests count them next to the pool's statements);
        the health rounds of an idle connection are not counted."""
        self._conn: asyncpg.Connection | None = None
        self._task: asyncio.Task[None] | None = None
        self._wake = asyncio.Event()
        self._lost = False
        self._next: asyncio.Future[bool] | None = None
        self._last_round_start = -1
        self._connected = asyncio.Event()

    @property
    def server_pid(self) -> int | None:
        """The listening backend's pid, while connected."""
        return None if self._conn is None else self._conn.get_server_pid()

    async def wait_connected(self) -> None:
        """Until the cache is in use (tests)."""
        await self._connected.wait()

    async def start(self) -> None:
        """Connect once now (so caching is on from the first request when Postgres is up),
        then keep the connection in the background."""
        self.cache.listener = self
        try:
            await self._connect()
        except _Error as exc:
            log.warning("auth cache off until its listener connects: %s", _describe(exc))
        self._task = asyncio.create_task(self._run(), name="pullwake-auth-cache-listener")

    async def close(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        await self._disconnect()
        if self.cache.listener is self:
            self.cache.listener = None

    async def caught_up(self, since: int) -> bool:
        """True once a round that started after ``since`` has answered on the listening
        connection: every notification committed before ``since`` has been applied by then.
        False when that cannot be known (no connection, or the round failed)."""
        if self._last_round_start > since:
            return True
        if self._conn is None:
            return False
        round_ = self._next
        if round_ is None:
            round_ = self._next = asyncio.get_running_loop().create_future()
            self._wake.set()
        done, _ = await asyncio.wait({round_}, timeout=self.round_timeout_s * 2)
        return bool(done) and not round_.cancelled() and round_.result()

    # --- the connection ----------------------------------------------------------------------

    async def _run(self) -> None:
        backoff = 0.05
        while True:
            try:
                if self._conn is None:
                    try:
                        await self._connect()
                    except _Error as exc:
                        log.debug("auth cache listener cannot connect: %s", _describe(exc))
                        await asyncio.sleep(backoff)
                        backoff = min(backoff * 2, self.max_backoff_s)
                        continue
                    backoff = 0.05
                    log.info("auth cache listener connected again: caching resumes")
                await self._serve()
                await self._disconnect()
                log.warning("auth cache listener lost its connection: caching is off until back")
            except Exception:
                log.exception("auth cache listener failed; reconnecting")
                await self._disconnect()
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, self.max_backoff_s)

    async def _connect(self) -> None:
        conn = await asyncpg.connect(self.dsn, timeout=self.connect_timeout_s)
        try:
            conn.add_termination_listener(self._terminated)
            await conn.add_listener(CHANNEL, self._notified)
            self._conn, self._lost = conn, False
            if not await self._round():
                raise OSError("the listener's first round failed")
        except BaseException:
            self._conn = None
            conn.terminate()
            raise
        self.cache.activate()
        self._connected.set()

    async def _disconnect(self) -> None:
        self.cache.deactivate()
        self._connected.clear()
        self._last_round_start = -1
        self._finish_round(False)
        conn, self._conn = self._conn, None
        if conn is not None and not conn.is_closed():
            try:
                await asyncio.wait_for(conn.close(), 2)
            except (*_Error, asyncio.CancelledError):
                conn.terminate()

    def _notified(self, conn: Any, pid: int, channel: str, payload: object) -> None:
        self.cache.drop(str(payload))

    def _terminated(self, conn: Any) -> None:
        if conn is self._conn:
            self.cache.deactivate()  # at once: not when the loop below gets to it
            self._lost = True
            self._wake.set()

    async def _serve(self) -> None:
        """Run rounds when asked (or every health interval) until the connection is lost."""
        while not self._lost:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self.health_interval_s):
                    await self._wake.wait()
            self._wake.clear()
            if self._lost:
                return
            round_, self._next = self._next, None
            ok = await self._round()
            if round_ is not None:
                self.rounds += ok
                if not round_.done():
                    round_.set_result(ok)
            if not ok:
                return

    async def _round(self) -> bool:
        conn = self._conn
        if conn is None:
            return False
        started = self.cache.clock()
        try:
            pid = await asyncio.wait_for(
                conn.fetchval("SELECT pg_backend_pid()"), self.round_timeout_s
            )
        except _Error as exc:
            log.warning("auth cache listener round failed: %s", _describe(exc))
            return False
        if pid != conn.get_server_pid():
            log.error(
                "auth cache off: the listener's commands reach another backend than the one "
                "that listens (a transaction-pooling PgBouncer?); set "
                "PULLWAKE_LISTEN_DATABASE_URL to a direct connection"
            )
            return False
        self._last_round_start = started
        return True

    def _finish_round(self, ok: bool) -> None:
        round_, self._next = self._next, None
        if round_ is not None and not round_.done():
            round_.set_result(ok)


def _describe(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__


@contextlib.asynccontextmanager
async def listening(cache: AuthCache, settings: Settings) -> AsyncIterator[Listener | None]:
    """Keep ``cache`` in use while the block runs (nothing when caching is turned off, or when
    the only URL goes through a transaction pooler: no session to LISTEN in)."""
    dsn = settings.listen_database_url or settings.database_url
    if not cache.enabled or not dsn:
        yield None
        return
    if settings.pg_transaction_pooling and not settings.listen_database_url:
        log.warning(
            "auth cache off: PULLWAKE_PG_TRANSACTION_POOLING is on and PULLWAKE_LISTEN_DATABASE_URL"
            " is not set; its LISTEN needs a session of its own, so point that at Postgres itself"
        )
        yield None
        return
    listener = Listener(cache, dsn)
    await listener.start()
    try:
        yield listener
    finally:
        await listener.close()
