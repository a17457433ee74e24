"""The runner's view of the HTTP API: an httpx client, the SSE wake stream and claim callbacks."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass
from typing import Any, Protocol
from urllib.parse import quote

import httpx
import msgspec

from pullwake.runner.clock import Clock, wait_tasks
from pullwake.runner.sse import SseParser
from pullwake.wire import (
    ClaimDone,
    ClaimHeartbeatResponse,
    DoneResponse,
    MessagePage,
    OffsetResponse,
    WakeEntry,
    WakeNotification,
)

__all__ = [
    "ApiError",
    "ClaimOutcome",
    "HttpTransport",
    "Transport",
    "WakeEvent",
    "WakeStream",
    "open_within",
]

log = logging.getLogger(__name__)

UNREACHABLE = "UNREACHABLE"
BAD_RESPONSE = "BAD_RESPONSE"


class ApiError(Exception):
    """A failed API call: ``status`` 0 means the server was not reached or did not answer."""

    def __init__(self, status: int, code: str, detail: str) -> None:
        super().__init__(f"{code} ({status}): {detail}" if status else f"{code}: {detail}")
        self.status = status
        self.code = code
        self.detail = detail

    @property
    def transient(self) -> bool:
        """True when trying again later may succeed (network, 429, 5xx)."""
        return self.status == 0 or self.status == 429 or self.status >= 500


@dataclass(frozen=True, slots=True)
class WakeEvent:
    """A wake read from the SSE stream, with its stream entry id."""

    entry_id: str
    wake: WakeEntry


ClaimOutcome = WakeNotification | ClaimDone | None
"""A claim's answer: the notification, ``{"done": true}`` or None for 204 (no work)."""


class WakeStream(Protocol):
    """An open wake stream: iterate it for wakes; ``aclose`` ends it."""

    def __aiter__(self) -> AsyncIterator[WakeEvent]:
        """Wakes as they arrive; ends when the server closes the stream."""
        ...

    async def aclose(self) -> None:
        """Close the underlying response."""
        ...


class Transport(Protocol):
    """Everything the runner asks of the server (a fake in tests, HTTP in production)."""

    async def register(self, label: str, kind: str) -> None:
        """``POST /v1/runners``."""
        ...

    async def heartbeat(self, lease_ms: int, diagnostics: dict[str, Any]) -> None:
        """``POST /v1/runners/{id}/heartbeat``."""
        ...

    async def open_wakes(self, session: str) -> WakeStream:
        """``GET /v1/runners/{id}/wakes?session=S``; returns once the server accepted."""
        ...

    async def claim(self, wake_id: str, entry_id: str) -> ClaimOutcome:
        """``POST /v1/runners/{id}/claim``."""
        ...

    async def claim_heartbeat(self, claim: WakeNotification) -> ClaimHeartbeatResponse:
        """``POST /v1/claims/{id}/heartbeat``."""
        ...

    async def done(
        self, claim: WakeNotification, acked_offset: int, *, claim_next: bool = False
    ) -> DoneResponse:
        """``POST /v1/claims/{id}/done`` (``claim_next``: answer the follow-up claim too)."""
        ...

    async def release(self, claim: WakeNotification, error: str | None) -> None:
        """``POST /v1/claims/{id}/release``."""
        ...

    async def emit(self, claim: WakeNotification, payload: Any) -> int:
        """``POST /v1/entities/{type}/{id}/events`` (fenced)."""
        ...

    async def messages(self, claim: WakeNotification, after: int, limit: int) -> MessagePage:
        """``GET /v1/entities/{type}/{id}/messages`` with the claim token."""
        ...

    async def aclose(self) -> None:
        """Release connections."""
        ...


def _problem(response: httpx.Response, body: bytes) -> ApiError:
    code, detail = f"HTTP_{response.status_code}", response.reason_phrase
    try:
        data = msgspec.json.decode(body)
    except msgspec.DecodeError:
        data = None
    if isinstance(data, dict):
        code = str(data.get("code") or code)
        detail = str(data.get("detail") or detail)
    return ApiError(response.status_code, code, detail)


def _decode(body: bytes, kind: type[Any]) -> Any:
    try:
        return msgspec.json.decode(body, type=kind)
    except (msgspec.DecodeError, msgspec.ValidationError) as exc:
        raise ApiError(0, BAD_RESPONSE, f"unexpected {kind.__name__} body: {exc}") from None


class _SseWakeStream:
    """Wakes parsed from a streaming httpx response."""

    def __init__(self, response: httpx.Response) -> None:
        self._response = response

    async def __aiter__(self) -> AsyncIterator[WakeEvent]:
        parser = SseParser()
        try:
            async for line in self._response.aiter_lines():
                message = parser.feed(line)
                if message is None or message.event != "wake":
                    continue
                try:
                    wake = msgspec.json.decode(message.data, type=WakeEntry)
                except (msgspec.DecodeError, msgspec.ValidationError) as exc:
                    log.warning("ignoring malformed wake event %s: %s", message.id, exc)
                    continue
                yield WakeEvent(message.id or "", wake)
        except httpx.HTTPError as exc:
            raise ApiError(0, UNREACHABLE, f"wake stream broke: {exc!r}") from exc

    async def aclose(self) -> None:
        await self._response.aclose()


class HttpTransport:
    """:class:`Transport` over one ``httpx.AsyncClient`` rooted at the server's base URL."""

    def __init__(
        self,
        base_url: str,
        runner_id: str,
        token: str | None,
        *,
        headers: Mapping[str, str] | None = None,
        request_timeout_ms: int = 15_000,
        connect_timeout_ms: int = 10_000,
        stream_idle_timeout_ms: int = 45_000,
        max_connections: int = 32,
    ) -> None:
        merged = dict(headers or {})
        if token:
            merged["Authorization"] = f"Bearer {token}"
        self.runner_id = runner_id
        self._runner_path = f"/v1/runners/{quote(runner_id, safe='')}"
        self._stream_timeout = httpx.Timeout(
            connect=connect_timeout_ms / 1000,
            read=stream_idle_timeout_ms / 1000,
            write=connect_timeout_ms / 1000,
            pool=connect_timeout_ms / 1000,
        )
        self._client = httpx.AsyncClient(
            base_url=base_url.rstrip("/"),
            headers=merged,
            timeout=httpx.Timeout(request_timeout_ms / 1000, connect=connect_timeout_ms / 1000),
            limits=httpx.Limits(max_connections=max_connections, max_keepalive_connections=8),
        )

    async def _call(
        self,
        method: str,
        path: str,
        *,
        json: Any = None,
        params: Mapping[str, Any] | None = None,
        token: str | None = None,
    ) -> httpx.Response:
        headers = {"Authorization": f"Bearer {token}"} if token else None
        try:
            response = await self._client.request(
                method, path, json=json, params=params, headers=headers
            )
        except httpx.HTTPError as exc:
            raise ApiError(0, UNREACHABLE, f"{method} {path}: {exc!r}") from exc
        if response.status_code >= 400:
            raise _problem(response, response.content)
        return response

    async def register(self, label: str, kind: str) -> None:
        """Register (or update) the runner; never re-enables a disabled one."""
        await self._call(
            "POST", "/v1/runners", json={"id": self.runner_id, "label": label, "kind": kind}
        )

    async def heartbeat(self, lease_ms: int, diagnostics: dict[str, Any]) -> None:
        """Extend the runner's liveness lease and report diagnostics."""
        body = {"lease_ms": lease_ms, "diagnostics": diagnostics}
        await self._call("POST", f"{self._runner_path}/heartbeat", json=body)

    async def open_wakes(self, session: str) -> WakeStream:
        """Open the SSE stream; cancelling this call aborts a hung connect."""
        request = self._client.build_request(
            "GET",
            f"{self._runner_path}/wakes",
            params={"session": session},
            headers={"Accept": "text/event-stream"},
            timeout=self._stream_timeout,
        )
        try:
            response = await self._client.send(request, stream=True)
        except httpx.HTTPError as exc:
            raise ApiError(0, UNREACHABLE, f"connect to wake stream: {exc!r}") from exc
        if response.status_code != 200:
            try:
                body = await response.aread()
            except httpx.HTTPError:
                body = b""
            finally:
                await response.aclose()
            raise _problem(response, body)
        return _SseWakeStream(response)

    async def claim(self, wake_id: str, entry_id: str) -> ClaimOutcome:
        """Claim a wake: notification, ``{"done": true}`` or None (204)."""
        body: dict[str, str] = {"wake_id": wake_id}
        if entry_id:
            body["entry_id"] = entry_id
        response = await self._call("POST", f"{self._runner_path}/claim", json=body)
        if response.status_code == 204 or not response.content:
            return None
        if b'"claim_token"' in response.content:
            notification: WakeNotification = _decode(response.content, WakeNotification)
            return notification
        done: ClaimDone = _decode(response.content, ClaimDone)
        return done

    def _claim_path(self, claim: WakeNotification, action: str) -> str:
        return f"/v1/claims/{quote(claim.claim_id, safe='')}/{action}"

    def _entity_path(self, claim: WakeNotification, what: str) -> str:
        entity = claim.entity
        return f"/v1/entities/{quote(entity.type, safe='')}/{quote(entity.id, safe='')}/{what}"

    async def claim_heartbeat(self, claim: WakeNotification) -> ClaimHeartbeatResponse:
        """Extend the claim's lease."""
        response = await self._call(
            "POST",
            self._claim_path(claim, "heartbeat"),
            json={"epoch": claim.epoch},
            token=claim.claim_token,
        )
        result: ClaimHeartbeatResponse = _decode(response.content, ClaimHeartbeatResponse)
        return result

    async def done(
        self, claim: WakeNotification, acked_offset: int, *, claim_next: bool = False
    ) -> DoneResponse:
        """Finish the claim, acking up to ``acked_offset`` (idempotent when repeated); with
        ``claim_next`` the answer carries the follow-up claim when work is still pending."""
        body: dict[str, Any] = {"epoch": claim.epoch, "acked_offset": acked_offset}
        if claim_next:
            body["claim_next"] = True
        response = await self._call(
            "POST", self._claim_path(claim, "done"), json=body, token=claim.claim_token
        )
        result: DoneResponse = _decode(response.content, DoneResponse)
        return result

    async def release(self, claim: WakeNotification, error: str | None) -> None:
        """Give the claim up without acking."""
        body: dict[str, Any] = {"epoch": claim.epoch}
        if error:
            body["error"] = error[-2000:]
        await self._call(
            "POST", self._claim_path(claim, "release"), json=body, token=claim.claim_token
        )

    async def emit(self, claim: WakeNotification, payload: Any) -> int:
        """Append to the entity's events log as the claim holder."""
        response = await self._call(
            "POST",
            self._entity_path(claim, "events"),
            json={"payload": payload, "epoch": claim.epoch},
            token=claim.claim_token,
        )
        result: OffsetResponse = _decode(response.content, OffsetResponse)
        return result.offset

    async def messages(self, claim: WakeNotification, after: int, limit: int) -> MessagePage:
        """A page of the entity's inbox after ``after``."""
        response = await self._call(
            "GET",
            self._entity_path(claim, "messages"),
            params={"after": after, "limit": limit},
            token=claim.claim_token,
        )
        page: MessagePage = _decode(response.content, MessagePage)
        return page

    async def aclose(self) -> None:
        """Close the client's connections."""
        await self._client.aclose()


async def open_within(
    transport: Transport, session: str, clock: Clock, timeout_ms: float
) -> WakeStream:
    """Open the wake stream, abandoning a connect that takes longer than ``timeout_ms``."""
    opener = asyncio.create_task(transport.open_wakes(session))
    try:
        late = await wait_tasks([opener], clock, timeout_ms)
    except asyncio.CancelledError:
        await _abandon(opener)
        raise
    if late:
        await _abandon(opener)
        raise ApiError(0, "CONNECT_TIMEOUT", f"no answer within {timeout_ms:.0f} ms")
    return opener.result()


async def _abandon(opener: asyncio.Task[WakeStream]) -> None:
    """Cancel a connect; one that finished anyway must not leak its response."""
    opener.cancel()
    with contextlib.suppress(Exception, asyncio.CancelledError):
        stream = await opener
        await stream.aclose()
