"""The one ``text/event-stream`` reader of the tests: lines in, one :class:`SseEvent` per block."""

from __future__ import annotations

import json
from collections.abc import AsyncIterable, AsyncIterator
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class SseEvent:
    """One block of the stream: its ``event`` and ``id`` fields, its data lines (joined with
    newlines) and the comments and ``retry`` inside it. A comment-only block is an event too,
    with ``event`` None."""

    event: str | None
    id: str | None
    text: str = ""
    comments: list[str] = field(default_factory=list)
    retry: int | None = None

    @property
    def data(self) -> Any:
        """The data parsed as JSON; None for a block without data."""
        return json.loads(self.text) if self.text else None

    def json(self) -> Any:
        """The data parsed as JSON."""
        return json.loads(self.text)

    @property
    def has_fields(self) -> bool:
        """Whether the block carries an event (data, ``event`` or ``id``), not only comments or
        a ``retry``."""
        return bool(self.text or self.event is not None or self.id is not None)


async def sse_events(lines: AsyncIterable[str]) -> AsyncIterator[SseEvent]:
    """The blocks of a stream, from its lines (``httpx.Response.aiter_lines()``)."""
    fields: dict[str, str] = {}
    comments: list[str] = []
    data: list[str] = []
    retry: int | None = None
    async for line in lines:
        if line == "":
            if fields or data or comments or retry is not None:
                text = "\n".join(data)
                yield SseEvent(fields.get("event"), fields.get("id"), text, comments, retry)
            fields, comments, data, retry = {}, [], [], None
        elif line.startswith(":"):
            comments.append(line[1:].strip())
        else:
            name, _, value = line.partition(":")
            value = value.removeprefix(" ")
            if name == "data":
                data.append(value)
            elif name == "retry":
                retry = int(value)
            else:
                fields[name] = value
