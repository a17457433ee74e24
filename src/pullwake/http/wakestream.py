"""The wake stream's response: Server-Sent Events written straight to the ASGI server.

A process holds one of these per connected runner session, ten thousand of them and more, so
each costs what it must and no more. Litestar's ``ServerSentEvent`` runs every stream as a task
group (one task writing, one listening for the disconnect), wraps the generator in another, and
first hops to a worker thread; here a stream is the request's own task, writing what the
process's wake reader (:mod:`pullwake.streams.reader`) hands its session, plus one small task
that waits for the client to go away. That end closes the session at once, so a runner that
reconnects under the same session name never finds a stale twin taking its entries.

The bytes are plain SSE with LF line endings (``cut -d' ' -f2`` of an ``id:`` line is the entry
id, no ``\\r`` left)::

    : connected session=<consumer>
    retry: 1000

    id: <entry id>
    event: wake
    data: {"wake_id": ..., "entity": ..., "epoch": ..., "reason": ..., "created_at": ...}

    : keep-alive

"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import TYPE_CHECKING

from redis.exceptions import RedisError

from pullwake.streams.reader import Closed, Keepalive
from pullwake.wire import WakeEntry, json_encoder

if TYPE_CHECKING:
    from litestar.types import HTTPResponseBodyEvent, Receive, Scope, Send

    from pullwake.limits import SseSlot
    from pullwake.services import Services
    from pullwake.streams.audit import Credential

__all__ = ["MEDIA_TYPE", "WakeStream", "encode_wakes"]

log = logging.getLogger(__name__)

MEDIA_TYPE = "text/event-stream"
PAGE = 100
"""Own pending entries replayed per read on (re)connect."""

_HEADERS = [
    (b"content-type", b"text/event-stream; charset=utf-8"),
    (b"cache-control", b"no-store"),
    (b"x-accel-buffering", b"no"),  # nginx: pass each event on at once
]
_KEEPALIVE: HTTPResponseBodyEvent = {
    "type": "http.response.body",
    "body": b": keep-alive\n\n",
    "more_body": True,
}
_END: HTTPResponseBodyEvent = {"type": "http.response.body", "body": b"", "more_body": False}


def encode_wakes(entries: list[tuple[str, WakeEntry]]) -> bytes:
    """``wake`` events for stream entries, in order (one write for all of them)."""
    return b"".join(
        b"id: %s\nevent: wake\ndata: %s\n\n" % (entry_id.encode(), json_encoder.encode(entry))
        for entry_id, entry in entries
    )


def _body(data: bytes) -> HTTPResponseBodyEvent:
    return {"type": "http.response.body", "body": data, "more_body": True}


async def _until_disconnect(receive: Receive) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass


class WakeStream:
    """The ASGI response of ``GET /v1/runners/{id}/wakes`` once the caller, the runner and the
    session's slot were checked: the session's own pending entries first (a reconnect), then
    new ones, keep-alives and the end (credentials revoked, server shutting down) as the
    reader says. The slot is released when the stream ends, however it ends."""

    __slots__ = ("consumer", "credential", "runner_id", "services", "slot")

    def __init__(
        self,
        services: Services,
        runner_id: str,
        consumer: str,
        slot: SseSlot,
        credential: Credential,
    ) -> None:
        self.services = services
        self.runner_id = runner_id
        self.consumer = consumer
        self.slot = slot
        self.credential = credential

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        services, runner_id, consumer = self.services, self.runner_id, self.consumer
        reader = services.wake_reader
        session = reader.open(runner_id, consumer, slot=self.slot, credential=self.credential)
        watcher = asyncio.ensure_future(_until_disconnect(receive))
        watcher.add_done_callback(lambda _: session.close("client disconnected"))
        try:
            await send({"type": "http.response.start", "status": 200, "headers": _HEADERS})
            await send(_body(b": connected session=%s\nretry: 1000\n\n" % consumer.encode()))
            fields = {"runner": runner_id, "session": consumer}
            log.info(
                "runner %s session %s connected to its wake stream",
                runner_id,
                consumer,
                extra=fields,
            )
            after = "0"
            while session.closed is None:  # its own pending entries, in pages
                entries = await services.streams.read(
                    runner_id, consumer, own_pending=True, after=after, count=PAGE, block_ms=None
                )
                if entries:
                    await send(_body(encode_wakes(entries)))
                if len(entries) < PAGE:
                    break
                after = entries[-1][0]
            while True:
                item = await session.next()
                if isinstance(item, Closed):
                    if item.reason == "server shutting down":
                        log.info(
                            "runner %s session %s: server shutting down",
                            runner_id,
                            consumer,
                            extra=fields,
                        )
                    break
                if isinstance(item, Keepalive):
                    await send(_KEEPALIVE)
                else:
                    await send(_body(encode_wakes(item)))
        except (RedisError, OSError) as exc:
            log.warning(
                "wake stream of runner %s ended: %s",
                runner_id,
                exc,
                extra={"runner": runner_id, "session": consumer},
            )
        finally:
            watcher.cancel()
            reader.remove(session)
            log.info(
                "runner %s session %s disconnected",
                runner_id,
                consumer,
                extra={"runner": runner_id, "session": consumer},
            )
            # Shielded: the request's task may be cancelled (server stop) while this runs.
            with contextlib.suppress(asyncio.CancelledError, RedisError, OSError):
                await asyncio.shield(self.slot.close())
        # Ended only now: a runner that reconnects at once finds its slot free.
        await send(_END)
