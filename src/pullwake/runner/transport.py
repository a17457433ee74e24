"""The runner's view of the HTTP API: keep-alive HTTP/1.1, the SSE wake stream, claim calls."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass
from typing import Any, Protocol
from urllib.parse import quote, urlencode

import httpx
import msgspec

from pullwake.runner.clock import Clock, wait_tasks
from pullwake.runner.http1 import Http1Client, Http1Error, Reply, lean_client_fits
from pullwake.runner.sse import SseParser
from pullwake.tracing import HEADER as TRACE_HEADER
from pullwake.tracing import current_traceparent
from pullwake.wire import (
    ClaimDone,
    ClaimHeartbeatResponse,
    DoneResponse,
    MessagePage,
    OffsetResponse,
    ReleaseResponse,
    WakeEntry,
    WakeNotification,
)

__all__ = [
    "ApiError",
    "ClaimOutcome",
    "EntityState",
    "HttpTransport",
    "Refused",
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


RETRIED_CLIENT_ERRORS = frozenset({408, 409, 425, 429})
"""4xx answers to registering or opening the wake stream that are worth waiting out: a
timeout, ``409 RUNNER_DISABLED`` (until the runner is enabled), too early, rate limited."""


class Refused(ApiError):
    """The server refused the runner for good: a bad or missing token (401), forbidden (403), an
    invalid runner id (400), a runner id that does not exist for this caller (404), or a URL
    that is not a pullwake API. Trying again cannot help, so the runner stops:
    :meth:`Runner.run <pullwake.runner.Runner.run>` raises it, and ``pullwake runner`` prints
    its message and exits."""

    def __init__(self, error: ApiError, message: str) -> None:
        super().__init__(error.status, error.code, error.detail)
        self.args = (message,)
        self.message = message

    def __str__(self) -> str:
        return self.message

    @classmethod
    def of(cls, error: BaseException, runner_id: str, base_url: str) -> Refused | None:
        """``error`` as a refusal when it answered registering or opening the wake stream
        with a client error that retrying cannot fix; None for anything worth retrying."""
        if isinstance(error, Refused):
            return error
        if not isinstance(error, ApiError) or not 400 <= error.status < 500:
            return None
        if error.status in RETRIED_CLIENT_ERRORS:
            return None
        answer = f"({error.status} {error.code}): {error.detail}"
        if error.status == 401:
            return cls(error, f"the server refused the token {answer}")
        if error.code == f"HTTP_{error.status}" or (
            error.status == 404 and runner_id not in error.detail
        ):  # not pullwake's answer, or no such route: not the API's base URL
            return cls(error, f"{base_url} answered {answer}: is it the pullwake API's base URL?")
        return cls(error, f"the server refused runner {runner_id!r} {answer}")


@dataclass(frozen=True, slots=True)
class WakeEvent:
    """A wake read from the SSE stream, with its stream entry id."""

    entry_id: str
    wake: WakeEntry


ClaimOutcome = WakeNotification | ClaimDone | None
"""A claim's answer: the notification, ``{"done": true}`` or None for 204 (no work)."""


class EntityDispatch(msgspec.Struct):
    """The part of an entity's ``dispatch`` the runner reads."""

    parked_reason: str | None = None
    failed_attempts: int = 0


class EntityState(msgspec.Struct):
    """An entity's status and dispatch state (``GET /v1/entities/{type}/{id}``, in part)."""

    status: str
    dispatch: EntityDispatch = msgspec.field(default_factory=EntityDispatch)


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

    async def release(self, claim: WakeNotification, error: str | None) -> ReleaseResponse:
        """``POST /v1/claims/{id}/release``."""
        ...

    async def entity(self, claim: WakeNotification) -> EntityState:
        """``GET /v1/entities/{type}/{id}`` with the runner's token (after its claim ended)."""
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


def _problem(status: int, reason: str, body: bytes) -> ApiError:
    code, detail = f"HTTP_{status}", reason
    try:
        data = msgspec.json.decode(body)
    except msgspec.DecodeError:
        data = None
    if isinstance(data, dict):
        code = str(data.get("code") or code)
        detail = str(data.get("detail") or detail)
    return ApiError(status, code, detail)


def _decode(body: bytes, decoder: msgspec.json.Decoder[Any]) -> Any:
    try:
        return decoder.decode(body)
    except (msgspec.DecodeError, msgspec.ValidationError) as exc:
        name = getattr(decoder.type, "__name__", "response")
        raise ApiError(0, BAD_RESPONSE, f"unexpected {name} body: {exc}") from None


_encode = msgspec.json.Encoder().encode
_WAKE = msgspec.json.Decoder(WakeEntry)
_NOTIFICATION = msgspec.json.Decoder(WakeNotification)
_CLAIM_DONE = msgspec.json.Decoder(ClaimDone)
_CLAIM_HEARTBEAT = msgspec.json.Decoder(ClaimHeartbeatResponse)
_DONE = msgspec.json.Decoder(DoneResponse)
_RELEASE = msgspec.json.Decoder(ReleaseResponse)
_ENTITY = msgspec.json.Decoder(EntityState)
_OFFSET = msgspec.json.Decoder(OffsetResponse)
_PAGE = msgspec.json.Decoder(MessagePage)


class _Stream(Protocol):
    """A streamed answer: the SSE body as lines."""

    status: int
    reason: str

    async def read(self, limit: int = 65_536) -> bytes: ...

    def lines(self) -> AsyncIterator[str]: ...

    async def aclose(self) -> None: ...


class _Client(Protocol):
    """What :class:`HttpTransport` needs of an HTTP client; failures raise :class:`Http1Error`."""

    connections_opened: int

    async def request(
        self, method: str, target: str, body: bytes | None = None, *, token: str | None = None
    ) -> Reply: ...

    async def stream(self, target: str, *, idle_timeout_s: float) -> _Stream: ...

    async def aclose(self) -> None: ...


class _SseWakeStream:
    """Wakes parsed from a streamed answer; its failures are ``ApiError(0, UNREACHABLE)``."""

    def __init__(self, stream: _Stream) -> None:
        self._stream = stream

    async def __aiter__(self) -> AsyncIterator[WakeEvent]:
        parser = SseParser()
        try:
            async for line in self._stream.lines():
                message = parser.feed(line)
                if message is None or message.event != "wake":
                    continue
                try:
                    wake = _WAKE.decode(message.data)
                except (msgspec.DecodeError, msgspec.ValidationError) as exc:
                    log.warning("ignoring malformed wake event %s: %s", message.id, exc)
                    continue
                yield WakeEvent(message.id or "", wake)
        except Http1Error as exc:
            raise ApiError(0, UNREACHABLE, f"wake stream broke: {exc}") from exc

    async def aclose(self) -> None:
        await self._stream.aclose()


class HttpTransport:
    """:class:`Transport` over HTTP/1.1 keep-alive connections to the server's base URL.

    The lean client (:mod:`pullwake.runner.http1`) carries every call unless the URL needs what
    only httpx does (a proxy from the environment, credentials in the URL): then httpx does.
    """

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
        lean: bool | None = None,
    ) -> None:
        merged = dict(headers or {})
        if token:
            merged["Authorization"] = f"Bearer {token}"
        self.runner_id = runner_id
        self._runner_path = f"/v1/runners/{quote(runner_id, safe='')}"
        self._claim_target = f"{self._runner_path}/claim"
        self._stream_idle_timeout_s = stream_idle_timeout_ms / 1000
        base = base_url.rstrip("/")
        self.lean = lean_client_fits(base) if lean is None else lean
        self._http: _Client
        if self.lean:
            self._http = Http1Client(
                base,
                merged,
                connect_timeout_s=connect_timeout_ms / 1000,
                request_timeout_s=request_timeout_ms / 1000,
                max_idle=max_connections,  # concurrent jobs each keep theirs alive
            )
        else:
            self._http = _HttpxClient(
                base,
                merged,
                connect_timeout_ms=connect_timeout_ms,
                request_timeout_ms=request_timeout_ms,
                max_connections=max_connections,
            )

    @property
    def connections_opened(self) -> int:
        """TCP connections opened so far (kept alive and reused between calls)."""
        return self._http.connections_opened

    async def _call(
        self, method: str, target: str, body: Any = None, *, token: str | None = None
    ) -> Reply:
        try:
            reply = await self._http.request(
                method, target, None if body is None else _encode(body), token=token
            )
        except Http1Error as exc:
            raise ApiError(0, UNREACHABLE, f"{method} {target}: {exc}") from exc
        if reply.status >= 400:
            raise _problem(reply.status, reply.reason, reply.content)
        return reply

    async def register(self, label: str, kind: str) -> None:
        """Register (or update) the runner; never re-enables a disabled one."""
        await self._call(
            "POST", "/v1/runners", {"id": self.runner_id, "label": label, "kind": kind}
        )

    async def heartbeat(self, lease_ms: int, diagnostics: dict[str, Any]) -> None:
        """Extend the runner's liveness lease and report diagnostics."""
        body = {"lease_ms": lease_ms, "diagnostics": diagnostics}
        await self._call("POST", f"{self._runner_path}/heartbeat", body)

    async def open_wakes(self, session: str) -> WakeStream:
        """Open the SSE stream; cancelling this call aborts a hung connect."""
        target = f"{self._runner_path}/wakes?{urlencode({'session': session})}"
        try:
            stream = await self._http.stream(target, idle_timeout_s=self._stream_idle_timeout_s)
        except Http1Error as exc:
            raise ApiError(0, UNREACHABLE, f"connect to wake stream: {exc}") from exc
        if stream.status != 200:
            try:
                body = await stream.read()
            except Http1Error:
                body = b""
            finally:
                await stream.aclose()
            raise _problem(stream.status, stream.reason, body)
        return _SseWakeStream(stream)

    async def claim(self, wake_id: str, entry_id: str) -> ClaimOutcome:
        """Claim a wake: notification, ``{"done": true}`` or None (204)."""
        body: dict[str, str] = {"wake_id": wake_id}
        if entry_id:
            body["entry_id"] = entry_id
        reply = await self._call("POST", self._claim_target, body)
        if reply.status == 204 or not reply.content:
            return None
        if b'"claim_token"' in reply.content:
            notification: WakeNotification = _decode(reply.content, _NOTIFICATION)
            return notification
        done: ClaimDone = _decode(reply.content, _CLAIM_DONE)
        return done

    def _claim_path(self, claim: WakeNotification, action: str) -> str:
        return f"/v1/claims/{quote(claim.claim_id, safe='')}/{action}"

    def _entity_path(self, claim: WakeNotification, what: str) -> str:
        entity = claim.entity
        return f"/v1/entities/{quote(entity.type, safe='')}/{quote(entity.id, safe='')}/{what}"

    async def claim_heartbeat(self, claim: WakeNotification) -> ClaimHeartbeatResponse:
        """Extend the claim's lease."""
        reply = await self._call(
            "POST",
            self._claim_path(claim, "heartbeat"),
            {"epoch": claim.epoch},
            token=claim.claim_token,
        )
        result: ClaimHeartbeatResponse = _decode(reply.content, _CLAIM_HEARTBEAT)
        return result

    async def done(
        self, claim: WakeNotification, acked_offset: int, *, claim_next: bool = False
    ) -> DoneResponse:
        """Finish the claim, acking up to ``acked_offset`` (idempotent when repeated); with
        ``claim_next`` the answer carries the follow-up claim when work is still pending."""
        body: dict[str, Any] = {"epoch": claim.epoch, "acked_offset": acked_offset}
        if claim_next:
            body["claim_next"] = True
        reply = await self._call(
            "POST", self._claim_path(claim, "done"), body, token=claim.claim_token
        )
        result: DoneResponse = _decode(reply.content, _DONE)
        return result

    async def release(self, claim: WakeNotification, error: str | None) -> ReleaseResponse:
        """Give the claim up without acking."""
        body: dict[str, Any] = {"epoch": claim.epoch}
        if error:
            body["error"] = error[-2000:]
        reply = await self._call(
            "POST", self._claim_path(claim, "release"), body, token=claim.claim_token
        )
        result: ReleaseResponse = _decode(reply.content, _RELEASE)
        return result

    async def entity(self, claim: WakeNotification) -> EntityState:
        """The claimed entity's status and dispatch state, read with the runner's own token."""
        entity = claim.entity
        target = f"/v1/entities/{quote(entity.type, safe='')}/{quote(entity.id, safe='')}"
        reply = await self._call("GET", target)
        result: EntityState = _decode(reply.content, _ENTITY)
        return result

    async def emit(self, claim: WakeNotification, payload: Any) -> int:
        """Append to the entity's events log as the claim holder."""
        reply = await self._call(
            "POST",
            self._entity_path(claim, "events"),
            {"payload": payload, "epoch": claim.epoch},
            token=claim.claim_token,
        )
        result: OffsetResponse = _decode(reply.content, _OFFSET)
        return result.offset

    async def messages(self, claim: WakeNotification, after: int, limit: int) -> MessagePage:
        """A page of the entity's inbox after ``after``."""
        query = urlencode({"after": after, "limit": limit})
        reply = await self._call(
            "GET", f"{self._entity_path(claim, 'messages')}?{query}", token=claim.claim_token
        )
        page: MessagePage = _decode(reply.content, _PAGE)
        return page

    async def aclose(self) -> None:
        """Close the client's connections."""
        await self._http.aclose()


class _HttpxReply:
    """An httpx streamed response as :class:`_Stream`."""

    def __init__(self, response: httpx.Response) -> None:
        self._response = response
        self.status = response.status_code
        self.reason = response.reason_phrase

    async def read(self, limit: int = 65_536) -> bytes:
        try:
            return (await self._response.aread())[:limit]
        except httpx.HTTPError as exc:
            raise Http1Error(repr(exc)) from exc

    async def lines(self) -> AsyncIterator[str]:
        try:
            async for line in self._response.aiter_lines():
                yield line
        except httpx.HTTPError as exc:
            raise Http1Error(repr(exc)) from exc

    async def aclose(self) -> None:
        await self._response.aclose()


class _HttpxClient:
    """:class:`_Client` over httpx, for what the lean client does not do (proxies)."""

    def __init__(
        self,
        base_url: str,
        headers: Mapping[str, str],
        *,
        connect_timeout_ms: int,
        request_timeout_ms: int,
        max_connections: int,
    ) -> None:
        self.connections_opened = 0  # not counted: httpx pools on its own
        self._connect_timeout_s = connect_timeout_ms / 1000
        self._client = httpx.AsyncClient(
            base_url=base_url,
            headers=dict(headers),
            timeout=httpx.Timeout(request_timeout_ms / 1000, connect=self._connect_timeout_s),
            limits=httpx.Limits(max_connections=max_connections, max_keepalive_connections=8),
        )

    async def request(
        self, method: str, target: str, body: bytes | None = None, *, token: str | None = None
    ) -> Reply:
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        if body is not None:
            headers["Content-Type"] = "application/json"
        trace = current_traceparent()
        if trace is not None:
            headers[TRACE_HEADER] = trace
        try:
            response = await self._client.request(method, target, content=body, headers=headers)
        except httpx.HTTPError as exc:
            raise Http1Error(repr(exc)) from exc
        return Reply(response.status_code, response.reason_phrase, response.content)

    async def stream(self, target: str, *, idle_timeout_s: float) -> _HttpxReply:
        connect = self._connect_timeout_s
        timeout = httpx.Timeout(connect=connect, read=idle_timeout_s, write=connect, pool=connect)
        request = self._client.build_request(
            "GET",
            target,
            headers={"Accept": "text/event-stream"},
            timeout=timeout,
        )
        try:
            response = await self._client.send(request, stream=True)
        except httpx.HTTPError as exc:
            raise Http1Error(repr(exc)) from exc
        return _HttpxReply(response)

    async def aclose(self) -> None:
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
