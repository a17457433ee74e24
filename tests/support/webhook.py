"""The one webhook target of the tests: a raw ASGI app that records each request and answers
what :meth:`WebhookTarget.respond` says (serve it with ``pullwake.testing.serve_in_background``)."""

from __future__ import annotations

import asyncio
import json
import time
from dataclasses import dataclass, field
from typing import Any

Reply = tuple[int, Any, dict[str, str]]
"""A target's answer: status, JSON body, extra headers."""


@dataclass
class Hit:
    """One request the target received."""

    path: str
    headers: dict[str, str]
    body: bytes
    at: float

    def json(self) -> Any:
        return json.loads(self.body)


@dataclass
class WebhookTarget:
    """Records every request in :attr:`hits`; answers ``200 {"ok": true}`` unless a subclass's
    :meth:`respond` says otherwise."""

    hits: list[Hit] = field(default_factory=list)

    def respond(self, hit: Hit) -> Reply:
        """The answer to ``hit`` (already recorded)."""
        return 200, {"ok": True}, {}

    async def wait_hits(self, n: int, timeout: float = 10) -> list[Hit]:
        """Every hit, once there are at least ``n``."""
        deadline = time.monotonic() + timeout
        while len(self.hits) < n:
            if time.monotonic() > deadline:
                raise AssertionError(f"target got {len(self.hits)} requests, expected {n}")
            await asyncio.sleep(0.02)
        return self.hits

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            while True:
                message = await receive()
                if message["type"] == "lifespan.startup":
                    await send({"type": "lifespan.startup.complete"})
                elif message["type"] == "lifespan.shutdown":
                    await send({"type": "lifespan.shutdown.complete"})
                    return
        body = b""
        while True:
            message = await receive()
            body += message.get("body", b"")
            if not message.get("more_body"):
                break
        headers = {k.decode().lower(): v.decode() for k, v in scope["headers"]}
        hit = Hit(scope["path"], headers, body, time.monotonic())
        self.hits.append(hit)
        status, payload, extra = self.respond(hit)
        response_headers = [(b"content-type", b"application/json")]
        response_headers += [(k.encode(), v.encode()) for k, v in extra.items()]
        await send({"type": "http.response.start", "status": status, "headers": response_headers})
        await send({"type": "http.response.body", "body": json.dumps(payload).encode()})


@dataclass
class ScriptedTarget(WebhookTarget):
    """Answers from ``script`` (in order) then ``default``; ``base_url`` is where it is served."""

    script: list[Reply] = field(default_factory=list)
    default: Reply = (200, {"ok": True}, {})
    base_url: str = ""

    @property
    def url(self) -> str:
        return f"{self.base_url}/hook"

    def answer(self, *answers: int | tuple[int, Any] | Reply) -> None:
        """Queue answers: a status (body ``{"status": N}``), (status, body) or a whole reply."""
        for item in answers:
            if isinstance(item, int):
                self.script.append((item, {"status": item}, {}))
            elif len(item) == 2:
                self.script.append((item[0], item[1], {}))
            else:
                self.script.append(item)  # type: ignore[arg-type]

    def respond(self, hit: Hit) -> Reply:
        return self.script.pop(0) if self.script else self.default
