"""Write combining for single sends: the sends that arrive while others are in flight go to
Postgres together, in one ``pullwake_send_many`` call.

A send's cost is dominated by its commit: the entity's row lock is held until the WAL is
flushed, so sends to one entity go one commit at a time, and every call costs the API process a
round trip. While the process already has ``flushers`` calls in flight, new sends wait in a
queue; each call that ends takes everything queued (up to ``max_batch``) into the next call.
An idle process sends at once, as a single ``pullwake_send``: combining never delays a send, it
only fills the time a send would have spent waiting for the database anyway.

Each item answers exactly what its own ``pullwake_send`` would have (migration 0009), and items
of one entity run in arrival order. A call that fails with a database error is retried item by
item, so one bad item cannot fail the sends it was combined with; an outage fails them all, as
it would have failed each.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass

import asyncpg

from pullwake.store.steps import Step

__all__ = ["SendCombiner", "SendItem"]

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class SendItem:
    """One send's arguments (``payload`` is encoded JSON)."""

    url: str
    payload: str
    size: int
    idempotency_key: str | None
    sender: str
    check_members: bool
    traceparent: str | None = None
    """The message's W3C trace context, if the send carried one (migration 0012)."""


class SendCombiner:
    """Queue single sends behind the calls in flight; see the module docstring."""

    def __init__(
        self,
        one: Callable[[SendItem], Awaitable[Step]],
        many: Callable[[Sequence[SendItem]], Awaitable[list[Step]]],
        *,
        flushers: int = 2,
        max_batch: int = 256,
    ) -> None:
        if flushers < 1 or max_batch < 1:
            raise ValueError("flushers and max_batch must be at least 1")
        self._one = one
        self._many = many
        self.flushers = flushers
        self.max_batch = max_batch
        self._queue: list[tuple[SendItem, asyncio.Future[Step]]] = []
        self._in_flight = 0
        self._tasks: set[asyncio.Task[None]] = set()
        self.calls = 0
        """Postgres calls made (single and combined): a test counts them."""
        self.combined = 0
        """Sends that went in a combined call."""

    async def send(self, item: SendItem) -> Step:
        """Send now when a call slot is free and nobody waits, else join the next call."""
        if self._in_flight < self.flushers and not self._queue:
            self._in_flight += 1
            try:
                self.calls += 1
                return await self._one(item)
            finally:
                self._in_flight -= 1
                self._start_calls()
        future: asyncio.Future[Step] = asyncio.get_running_loop().create_future()
        self._queue.append((item, future))
        self._start_calls()
        return await future

    def _start_calls(self) -> None:
        while self._queue and self._in_flight < self.flushers:
            take = self._queue[: self.max_batch]
            del self._queue[: len(take)]
            batch = [entry for entry in take if not entry[1].cancelled()]
            if not batch:
                continue
            self._in_flight += 1
            task = asyncio.get_running_loop().create_task(self._call(batch))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _call(self, batch: list[tuple[SendItem, asyncio.Future[Step]]]) -> None:
        try:
            items = [item for item, _ in batch]
            try:
                self.calls += 1
                if len(items) == 1:
                    steps = [await self._one(items[0])]
                else:
                    steps = await self._many(items)
                    self.combined += len(items)
            except asyncpg.PostgresError as exc:
                # A statement error (not an outage): find the item it belongs to by sending
                # each alone; the others go through.
                log.info("combined send of %d failed (%s); sending one by one", len(items), exc)
                for item, future in batch:
                    if future.done():
                        continue
                    try:
                        self.calls += 1
                        future.set_result(await self._one(item))
                    except Exception as single:  # handed to its sender
                        future.set_exception(single)
                return
            for (_, future), step in zip(batch, steps, strict=True):
                if not future.done():
                    future.set_result(step)
        except BaseException as exc:  # an outage, or shutdown: every sender hears it
            for _, future in batch:
                if future.done():
                    continue
                if isinstance(exc, asyncio.CancelledError):
                    future.cancel()
                else:
                    future.set_exception(exc)
            if not isinstance(exc, Exception):
                raise
        finally:
            self._in_flight -= 1
            self._start_calls()
