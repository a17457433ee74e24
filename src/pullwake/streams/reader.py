"""The per-process wake reader: every wake-stream (SSE) session of one API process reads its
runner's stream through it, over a bounded number of Redis connections.

Publishers ``XADD`` to the runner's stream and, in the same pipeline, ``PUBLISH`` the runner id
on the key prefix's notify channel (:meth:`~pullwake.streams.keys.Keys.wake_notify`). The reader
holds ONE pub/sub connection subscribed to it (a plain ``redis.asyncio.Redis`` of its own: on a
Redis Cluster a classic PUBLISH reaches the subscribers of every node). A notification naming a
runner with sessions here makes the reader read for them: a non-blocking, single-key
``XREADGROUP`` per session (the session's name is its consumer name, as before), pipelined,
through the shared pool; the entries go to the sessions' in-memory queues.

A session reads only while it waits for entries (its queue is empty), as its own blocking read
did before: a slow session leaves new entries to the others. A runner with one session here reads
a page at a time; with several, one entry per waiting session per read, in turn.

Pub/sub is fire-and-forget: a notification published while the subscriber reconnects is lost,
and an older publisher may not send one. So the reader also polls every runner's stream once per
``poll_interval_s`` (a tenth of them every tenth of it, pipelined; at most ``poll_budget_per_s``
reads a second, so a process with many runners takes longer per round), and all of them right
after every (re)subscription: such a wake waits one round at most.

Housekeeping, once per ``keepalive_s``: a keep-alive for every session that wrote nothing for
most of it, its slot refreshed (``refresh``, in batches), and one ``check`` of every session's
credentials together (a single batched lookup), which closes the sessions it names.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import math
import time
from collections.abc import Awaitable, Callable, Coroutine, Sequence
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

from redis.asyncio import Redis
from redis.exceptions import RedisError

from pullwake.streams.wakes import WakeStreams
from pullwake.wire import WakeEntry

__all__ = ["KEEPALIVE", "Closed", "Keepalive", "WakeReader", "WakeSession"]

log = logging.getLogger(__name__)

T = TypeVar("T")

Entries = list[tuple[str, WakeEntry]]
Check = Callable[[Sequence["WakeSession"]], Awaitable[Sequence[str | None]]]
"""Re-checks sessions' credentials: a reason to close each, or None to keep it."""
Refresh = Callable[[Sequence["WakeSession"]], Awaitable[None]]
"""Pushes the sessions' slot expiries forward (see :class:`pullwake.limits.Limits`)."""

_SLICES = 10  # the poll and the housekeeping visit a tenth of the sessions every tenth interval


class Keepalive:
    """Nothing to send for a while: write a comment."""

    __slots__ = ()


KEEPALIVE = Keepalive()


@dataclass(frozen=True, slots=True)
class Closed:
    """The session must end (credentials revoked, server shutting down)."""

    reason: str


class WakeSession:
    """One open wake stream of a runner: what the reader hands it, in order."""

    __slots__ = (
        "_items",
        "_keepalive",
        "_waiter",
        "closed",
        "consumer",
        "credential",
        "last_write",
        "live",
        "reader",
        "reading",
        "runner_id",
        "slot",
    )

    def __init__(
        self, reader: WakeReader, runner_id: str, consumer: str, slot: Any, credential: Any
    ) -> None:
        self.reader = reader
        self.runner_id = runner_id
        self.consumer = consumer
        self.slot = slot
        """The session's :class:`~pullwake.limits.SseSlot` (refreshed by the reader)."""
        self.credential = credential
        """What the ``check`` hook re-checks (opaque to the reader)."""
        self.last_write = time.monotonic()
        self.closed: Closed | None = None
        self.live = False
        """True once the session asked for new entries (its own pending ones came first)."""
        self.reading = False
        """A read for this session is in flight."""
        self._items: list[Entries] = []
        self._keepalive = False
        self._waiter: asyncio.Future[None] | None = None

    @property
    def waiting(self) -> bool:
        """Waits for new entries: nothing queued, no read in flight, not closed."""
        return self.live and not self._items and not self.reading and self.closed is None

    async def next(self) -> Entries | Keepalive | Closed:
        """The next entries (in stream order), a keep-alive, or why the session ends. The
        first call starts new entries flowing: replay the session's own pending ones before."""
        while True:
            if self.closed is not None:
                return self.closed
            if self._items:
                self.last_write = time.monotonic()
                return self._items.pop(0)
            if self._keepalive:
                self._keepalive = False
                self.last_write = time.monotonic()
                return KEEPALIVE
            if not self.live:
                self.live = True
                self.reader._mark_dirty(self.runner_id)  # entries added before it connected
            self.reader._wants(self)
            self._waiter = asyncio.get_running_loop().create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None

    def close(self, reason: str) -> None:
        """End the session: its next :meth:`next` says why (queued entries stay pending in
        Redis, sent again when the session reconnects)."""
        if self.closed is None:
            self.closed = Closed(reason)
            self._wake()

    def _deliver(self, entries: Entries) -> None:
        self._items.append(entries)
        self._wake()

    def _ping(self) -> None:
        self._keepalive = True
        self._wake()

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)


class _Runner:
    """The sessions of one runner in this process, and whether its stream may hold entries
    they have not read."""

    __slots__ = ("dirty", "sessions", "turn")

    def __init__(self) -> None:
        self.sessions: list[WakeSession] = []
        self.dirty = False
        self.turn = 0


@dataclass(slots=True)
class ReaderStats:
    """What the reader did (tests and logs)."""

    notifications: int = 0
    reads: int = 0
    pipelines: int = 0
    polled: int = 0
    delivered: int = 0
    subscriptions: int = 0
    checks: int = 0
    errors: int = 0


class WakeReader:
    """Reads the wake streams of this process's sessions; see the module docstring.

    ``subscriber`` builds the pub/sub client (None: no notifications, the poll only).
    ``concurrency`` bounds the read pipelines in flight for notified runners (the poll runs one
    at a time beside them); each pipeline holds at most ``batch`` reads. Tasks start with the
    first session; :meth:`close` stops them.
    """

    def __init__(
        self,
        streams: WakeStreams,
        subscriber: Callable[[], Redis] | None,
        *,
        poll_interval_s: float,
        keepalive_s: float,
        check: Check | None = None,
        refresh: Refresh | None = None,
        draining: asyncio.Event | None = None,
        invalidations: Callable[[], int] | None = None,
        page: int = 100,
        batch: int = 100,
        concurrency: int = 4,
        poll_budget_per_s: int = 500,
        health_interval_s: float = 10.0,
        max_backoff_s: float = 2.0,
    ) -> None:
        self.streams = streams
        self.subscriber = subscriber
        self.poll_interval_s = poll_interval_s
        self.keepalive_s = keepalive_s
        self.check = check
        self.refresh = refresh
        self.draining = draining
        self.invalidations = invalidations
        """A counter that changes when credentials may have changed (the auth cache's
        generation): the next housekeeping step checks every session at once."""
        self.page = page
        self.batch = batch
        self.concurrency = concurrency
        self.poll_budget_per_s = poll_budget_per_s
        self.health_interval_s = health_interval_s
        self.max_backoff_s = max_backoff_s
        self.channel = streams.keys.wake_notify()
        self.stats = ReaderStats()
        self.subscribed = asyncio.Event()
        """Set while the pub/sub connection is subscribed (tests wait for it)."""
        self._runners: dict[str, _Runner] = {}
        self._sessions: dict[WakeSession, None] = {}
        # The poll's and the housekeeping's round-robins: what was removed is dropped when its
        # turn comes (moving keys to a dict's end instead cost a tenth of an idle fleet's CPU).
        self._runner_turns = _Turns[tuple[str, _Runner]](
            lambda item: self._runners.get(item[0]) is item[1]
        )
        self._session_turns = _Turns[WakeSession](lambda session: session in self._sessions)
        self._urgent: dict[str, None] = {}  # dirty runners with a waiting session, notified
        self._polled: dict[str, None] = {}  # the same, found by the poll
        self._urgent_ready = asyncio.Event()
        self._polled_ready = asyncio.Event()
        self._slots = asyncio.Semaphore(concurrency)
        self._tasks: list[asyncio.Task[None]] = []
        self._inflight: set[asyncio.Task[None]] = set()
        self._check_task: asyncio.Task[None] | None = None
        self._closing = False
        self._last_error_log = 0.0

    # --- sessions ------------------------------------------------------------------------------

    def open(
        self, runner_id: str, consumer: str, *, slot: Any = None, credential: Any = None
    ) -> WakeSession:
        """Register a session; end it with :meth:`remove`. A server shutting down opens it
        closed."""
        self._start()
        session = WakeSession(self, runner_id, consumer, slot, credential)
        if self._closing or (self.draining is not None and self.draining.is_set()):
            session.close("server shutting down")
        runner = self._runners.get(runner_id)
        if runner is None:
            runner = self._runners[runner_id] = _Runner()
            self._runner_turns.add((runner_id, runner))
        runner.sessions.append(session)
        self._sessions[session] = None
        self._session_turns.add(session)
        return session

    def remove(self, session: WakeSession) -> None:
        """Forget a session (its stream ended)."""
        session.close("session ended")
        self._sessions.pop(session, None)
        runner = self._runners.get(session.runner_id)
        if runner is None:
            return
        with contextlib.suppress(ValueError):
            runner.sessions.remove(session)
        if not runner.sessions:
            del self._runners[session.runner_id]
            self._urgent.pop(session.runner_id, None)
            self._polled.pop(session.runner_id, None)

    @property
    def sessions(self) -> int:
        return len(self._sessions)

    def sessions_of(self, runner_id: str) -> list[WakeSession]:
        runner = self._runners.get(runner_id)
        return [] if runner is None else list(runner.sessions)

    def notify(self, runner_id: str) -> None:
        """The runner's stream got entries: read them for its waiting sessions now."""
        self.stats.notifications += 1
        runner = self._runners.get(runner_id)
        if runner is not None:
            runner.dirty = True
            self._queue(runner_id, runner, urgent=True)

    def poll_all(self) -> None:
        """Read every runner's stream soon (after a (re)subscription)."""
        for runner_id, runner in self._runners.items():
            runner.dirty = True
            self._queue(runner_id, runner, urgent=False)

    def _mark_dirty(self, runner_id: str) -> None:
        runner = self._runners.get(runner_id)
        if runner is not None:
            runner.dirty = True

    def _wants(self, session: WakeSession) -> None:
        runner = self._runners.get(session.runner_id)
        if runner is not None and runner.dirty:
            self._queue(session.runner_id, runner, urgent=True)

    def _queue(self, runner_id: str, runner: _Runner, *, urgent: bool) -> None:
        if not any(s.waiting for s in runner.sessions):
            return  # stays dirty: read when one of its sessions waits again
        if urgent:
            self._urgent[runner_id] = None
            self._urgent_ready.set()
        elif runner_id not in self._urgent:
            self._polled[runner_id] = None
            self._polled_ready.set()

    # --- reading -------------------------------------------------------------------------------

    def _take(self, queue: dict[str, None]) -> list[tuple[WakeSession, int]]:
        """Up to ``batch`` reads for queued runners: a page for a runner's only session, one
        entry for each waiting session (in turn) of a runner with several."""
        reads: list[tuple[WakeSession, int]] = []
        while queue and len(reads) < self.batch:
            runner_id = next(iter(queue))
            del queue[runner_id]
            self._urgent.pop(runner_id, None)
            self._polled.pop(runner_id, None)
            runner = self._runners.get(runner_id)
            if runner is None:
                continue
            waiting = [s for s in runner.sessions if s.waiting]
            if not waiting:
                continue
            runner.dirty = False
            turn = runner.turn % len(waiting)
            runner.turn += 1
            count = self.page if len(runner.sessions) == 1 else 1
            for session in waiting[turn:] + waiting[:turn]:
                session.reading = True
                reads.append((session, count))
        return reads

    async def _read(self, reads: list[tuple[WakeSession, int]]) -> None:
        self.stats.pipelines += 1
        self.stats.reads += len(reads)
        try:
            results: Sequence[Entries | Exception] = await self.streams.read_new_many(
                [(s.runner_id, s.consumer, count) for s, count in reads]
            )
        except (RedisError, OSError) as exc:
            results = [exc] * len(reads)
        touched: dict[str, None] = {}
        failed: set[str] = set()
        for (session, count), result in zip(reads, results, strict=True):
            session.reading = False
            runner = self._runners.get(session.runner_id)
            if runner is None:
                continue
            touched[session.runner_id] = None
            if isinstance(result, Exception):
                self._error("wake read failed (retried by the poll)", result)
                runner.dirty = True
                failed.add(session.runner_id)  # not queued again now: the poll comes back
                continue
            if result:
                self.stats.delivered += len(result)
                session._deliver(result)
            if len(result) == count:
                runner.dirty = True  # maybe more
        # Dirty again: maybe more entries, or a notification came while the read was in flight.
        for runner_id in touched:
            runner = self._runners.get(runner_id)
            if runner is not None and runner.dirty and runner_id not in failed:
                self._queue(runner_id, runner, urgent=True)

    async def _urgent_loop(self) -> None:
        while True:
            await self._urgent_ready.wait()
            self._urgent_ready.clear()
            while self._urgent:
                await self._slots.acquire()
                reads = self._take(self._urgent)
                if not reads:
                    self._slots.release()
                    continue
                task = asyncio.create_task(self._read(reads))
                self._inflight.add(task)
                task.add_done_callback(self._read_done)

    def _read_done(self, task: asyncio.Task[None]) -> None:
        self._inflight.discard(task)
        self._slots.release()
        if not task.cancelled() and task.exception() is not None:
            log.error("wake read failed", exc_info=task.exception())

    async def _poll_loop(self) -> None:
        """Reads what the poll queued, one pipeline at a time (notified runners go first)."""
        while True:
            await self._polled_ready.wait()
            self._polled_ready.clear()
            while self._polled:
                reads = self._take(self._polled)
                if reads:
                    self.stats.polled += len(reads)
                    await self._read(reads)

    async def _poll_ticks(self) -> None:
        """Every tenth of the poll interval, a tenth of the runners (at most ``poll_budget_per_s``
        a second: with more runners a round takes longer) marked dirty and read."""
        tick = self.poll_interval_s / _SLICES
        most = max(1, math.floor(self.poll_budget_per_s * tick))
        while True:
            await asyncio.sleep(tick)
            visit = min(most, math.ceil(len(self._runners) / _SLICES))
            for runner_id, runner in self._runner_turns.take(visit):
                runner.dirty = True
                self._queue(runner_id, runner, urgent=False)

    # --- the subscription ----------------------------------------------------------------------

    async def _subscription(self) -> None:
        """One pub/sub connection, reconnected with backoff; every (re)subscription polls every
        runner (notifications sent meanwhile are lost)."""
        assert self.subscriber is not None
        backoff = 0.05
        while True:
            client = self.subscriber()
            pubsub = client.pubsub()
            try:
                await pubsub.subscribe(self.channel)
                last_heard = time.monotonic()
                pinged = False
                while True:
                    message = await pubsub.get_message(timeout=self.health_interval_s / 2)
                    now = time.monotonic()
                    if message is None:
                        if now - last_heard > 2 * self.health_interval_s:
                            raise OSError("the pub/sub connection stopped answering")
                        if not pinged and now - last_heard > self.health_interval_s / 2:
                            await pubsub.ping()
                            pinged = True
                        continue
                    last_heard, pinged = now, False
                    kind = message.get("type")
                    if kind == "message":
                        self.notify(str(message["data"]))
                    elif kind == "subscribe":
                        self.stats.subscriptions += 1
                        if self.stats.subscriptions > 1:
                            log.info("wake reader subscribed again: polling every stream")
                        self.subscribed.set()
                        backoff = 0.05
                        self.poll_all()
            except (RedisError, OSError) as exc:
                self.subscribed.clear()
                self._error("wake notifications lost, reconnecting (the poll delivers)", exc)
            finally:
                self.subscribed.clear()
                with contextlib.suppress(RedisError, OSError, asyncio.CancelledError):
                    await pubsub.aclose()  # type: ignore[no-untyped-call]
                with contextlib.suppress(RedisError, OSError, asyncio.CancelledError):
                    await client.aclose()
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, self.max_backoff_s)

    # --- housekeeping --------------------------------------------------------------------------

    async def _housekeeping(self) -> None:
        """Every tenth of the keep-alive interval: keep-alives and slot refreshes for a tenth of
        the sessions; once per interval (or when credentials changed), one check of them all."""
        tick = self.keepalive_s / _SLICES
        last_check = time.monotonic()
        generation = self.invalidations() if self.invalidations is not None else 0
        while True:
            await asyncio.sleep(tick)
            now = time.monotonic()
            visit = self._session_turns.take(math.ceil(len(self._sessions) / _SLICES))
            for session in visit:
                if now - session.last_write >= 0.9 * self.keepalive_s:
                    session._ping()
            if self.refresh is not None and visit:
                try:
                    await self.refresh(visit)
                except (RedisError, OSError) as exc:
                    self._error("could not refresh wake-stream slots", exc)
            changed = False
            if self.invalidations is not None:
                current = self.invalidations()
                changed, generation = current != generation, current
            if changed or now - last_check >= self.keepalive_s:
                last_check = now
                self.check_soon()

    def check_soon(self) -> None:
        """Check every session's credentials now (unless a check is running)."""
        if self.check is None or (self._check_task is not None and not self._check_task.done()):
            return
        self._check_task = asyncio.create_task(self._check_all())

    async def _check_all(self) -> None:
        assert self.check is not None
        sessions = [s for s in self._sessions if s.closed is None]
        if not sessions:
            return
        self.stats.checks += 1
        try:
            reasons = await self.check(sessions)
        except Exception as exc:  # keep the sessions: checked again next interval
            self._error("could not re-check wake-stream credentials", exc)
            return
        for session, reason in zip(sessions, reasons, strict=True):
            if reason is not None and session.closed is None:
                log.info("closing wake stream of runner %s: %s", session.runner_id, reason)
                session.close(reason)

    async def _drain(self) -> None:
        assert self.draining is not None
        await self.draining.wait()
        self._closing = True
        for session in list(self._sessions):
            session.close("server shutting down")

    # --- life cycle ----------------------------------------------------------------------------

    def _start(self) -> None:
        if self._tasks:
            return
        loops: list[Callable[[], Coroutine[Any, Any, None]]] = [
            self._urgent_loop,
            self._poll_loop,
            self._poll_ticks,
            self._housekeeping,
        ]
        if self.subscriber is not None:
            loops.append(self._subscription)
        if self.draining is not None:
            loops.append(self._drain)
        self._tasks = [
            asyncio.create_task(loop(), name=f"pullwake-wake-reader-{loop.__name__.strip('_')}")
            for loop in loops
        ]

    async def close(self) -> None:
        """End every session and stop the reader's tasks."""
        self._closing = True
        for session in list(self._sessions):
            session.close("server shutting down")
        tasks = [*self._tasks, *self._inflight]
        if self._check_task is not None:
            tasks.append(self._check_task)
        self._tasks = []
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task

    def _error(self, what: str, exc: BaseException) -> None:
        self.stats.errors += 1
        now = time.monotonic()
        if now - self._last_error_log >= 10:
            self._last_error_log = now
            log.warning("%s: %s", what, f"{type(exc).__name__}: {exc}" if str(exc) else exc)


class _Turns(Generic[T]):
    """A round-robin of items that may go away: :meth:`take` hands out the next ones in turn,
    dropping those ``alive`` says are gone (each add and take is O(1) per item)."""

    __slots__ = ("_alive", "_queue")

    def __init__(self, alive: Callable[[T], bool]) -> None:
        self._queue: collections.deque[T] = collections.deque()
        self._alive = alive

    def add(self, item: T) -> None:
        self._queue.append(item)

    def take(self, count: int) -> list[T]:
        """Up to ``count`` live items, moved to the back of the line."""
        taken: list[T] = []
        queue, alive = self._queue, self._alive
        for _ in range(len(queue)):
            if len(taken) >= count:
                break
            item = queue.popleft()
            if alive(item):
                queue.append(item)
                taken.append(item)
        return taken
