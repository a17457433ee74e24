"""What a handler gets: the claimed wake, its messages, fenced events and acks."""

from __future__ import annotations

import functools
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, TypeVar

from pullwake.errors import Fenced, Forbidden, LeaseExpired, NotFound
from pullwake.runner.transport import ApiError, Transport
from pullwake.wire import MessageView, NotificationEntity, WakeNotification

__all__ = ["LOST_CODES", "ClaimLost", "Handler", "Release", "Wake"]

T = TypeVar("T")

LOST_CODES = frozenset({Fenced.code, LeaseExpired.code, Forbidden.code, NotFound.code})
"""Problem codes meaning this process no longer holds the claim."""


class ClaimLost(Exception):
    """The claim was fenced or its lease expired: the work was handed on."""

    def __init__(self, code: str, detail: str = "") -> None:
        super().__init__(f"claim lost: {code}" + (f" ({detail})" if detail else ""))
        self.code = code


class Release(Exception):
    """Raise from a handler to give the claim back without acking; the message is recorded."""


class Wake:
    """One claimed wake handed to a handler.

    ``async for message in wake.messages`` yields the pending inbox, paging past the first batch.
    Delivered means the claim's first batch plus every page fetched. When the handler returns,
    everything delivered is acked; when it raises, only what it acked with :meth:`ack` is.
    """

    def __init__(
        self, notification: WakeNotification, transport: Transport, *, page_limit: int = 100
    ):
        self.notification = notification
        self._transport = transport
        self._page_limit = page_limit
        self._acked = notification.acked_offset
        batch = notification.messages
        self._delivered = batch[-1].offset if batch else notification.acked_offset
        self.entity_status = notification.entity.status
        self.runner_stopping = False

    @property
    def entity(self) -> NotificationEntity:
        """The entity being woken (url, type, id, status, tags, created_by)."""
        return self.notification.entity

    @property
    def claim_id(self) -> str:
        """The claim id (equals the wake id)."""
        return self.notification.claim_id

    @property
    def epoch(self) -> int:
        """This claim's fencing epoch."""
        return self.notification.epoch

    @property
    def stopping(self) -> bool:
        """True when the entity is asked to stop or the runner drains: finish up soon."""
        return self.runner_stopping or self.entity_status == "stopping"

    @property
    def acked_offset(self) -> int:
        """The offset :meth:`ack` has reached (what a done after an error acks)."""
        return self._acked

    @property
    def delivered_offset(self) -> int:
        """The highest offset delivered so far (what a done after success acks)."""
        return self._delivered

    @property
    def messages(self) -> AsyncIterator[MessageView]:
        """The pending messages in offset order: the claim's first batch, then further pages."""
        return self._iterate()

    async def _iterate(self) -> AsyncIterator[MessageView]:
        after = self.notification.acked_offset
        for message in self.notification.messages:
            after = message.offset
            yield message
        more = self.notification.more_messages
        while more:
            page = await self._guard(
                functools.partial(
                    self._transport.messages, self.notification, after, self._page_limit
                )
            )
            if page.messages:
                self._delivered = max(self._delivered, page.messages[-1].offset)
            for message in page.messages:
                after = message.offset
                yield message
            more = page.more and bool(page.messages)

    def ack(self, offset: int) -> None:
        """Mark the inbox processed up to ``offset`` (never backwards, never past delivery)."""
        if offset > self._delivered:
            raise ValueError(f"cannot ack offset {offset}: only {self._delivered} was delivered")
        self._acked = max(self._acked, offset)

    async def emit(self, payload: Any) -> int:
        """Append ``payload`` to the entity's events log (fenced); returns its offset."""
        return await self._guard(lambda: self._transport.emit(self.notification, payload))

    async def _guard(self, call: Callable[[], Awaitable[T]]) -> T:
        try:
            return await call()
        except ApiError as exc:
            if exc.code in LOST_CODES:
                raise ClaimLost(exc.code, exc.detail) from exc
            raise


Handler = Callable[[Wake], Awaitable[None]]
"""A wake handler: ``async def handle(wake: Wake) -> None``."""
