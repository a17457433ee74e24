"""A lean HTTP/1.1 client for the runner: keep-alive connections to one origin, nothing per
request that can be done once.

A runner makes two small requests per wake (claim, done). Through httpx each one cost about a
millisecond of CPU on a small machine (URL merging, header models, the pool's checks, anyio);
here a request is one pre-encoded write, and httptools (a C parser) reads the answer as it
arrives: an order of magnitude less. It speaks only what the runner needs: HTTP/1.1 to the
server's origin (``http`` or ``https``), bodies framed by Content-Length or chunked (or, with
neither, ended by the server closing), no redirects, no compression and no proxies;
:func:`lean_client_fits` tells when the runner must use httpx instead.
"""

from __future__ import annotations

import asyncio
import codecs
import collections
import ssl
import time
import urllib.request
from collections.abc import AsyncIterator, Mapping
from typing import Any, cast
from urllib.parse import urlsplit

import httptools

from pullwake.tracing import header_bytes

__all__ = ["Http1Client", "Http1Error", "Http1Stream", "Reply", "lean_client_fits"]

KEEPALIVE_EXPIRY_S = 4.0
"""An idle connection older than this is not reused (uvicorn closes them after 5 s)."""

MAX_IDLE = 8
PAUSE_READING_CHUNKS = 64
"""A stream's unread chunks past which the socket is not read until the reader catches up."""


class Http1Error(Exception):
    """The exchange failed: not connected, reset, timed out or an unparsable answer."""


class _Stale(Http1Error):
    """A reused connection closed before a byte of the answer: the server had dropped it."""


class Reply:
    """A complete answer: status, reason phrase and body."""

    __slots__ = ("content", "reason", "status")

    def __init__(self, status: int, reason: str, content: bytes) -> None:
        self.status = status
        self.reason = reason
        self.content = content


def lean_client_fits(base_url: str) -> bool:
    """Whether :class:`Http1Client` can talk to ``base_url`` as httpx would: ``http(s)``
    without credentials in the URL, and no proxy from the environment applies to it."""
    parts = urlsplit(base_url)
    if parts.scheme not in ("http", "https") or not parts.hostname or "@" in parts.netloc:
        return False
    proxies = urllib.request.getproxies()  # what httpx reads (with trust_env, its default)
    if not (proxies.get(parts.scheme) or proxies.get("all")):
        return True
    return bool(urllib.request.proxy_bypass(parts.hostname))


class _Answer:
    """httptools callbacks for one response; ``done`` resolves once it is complete."""

    __slots__ = (
        "chunks",
        "close",
        "done",
        "ended",
        "framed",
        "headers",
        "keep",
        "reason",
        "status",
    )

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.done: asyncio.Future[None] = loop.create_future()
        self.headers: asyncio.Future[None] | None = None  # streams: resolves with the headers
        self.chunks: list[bytes] = []
        self.status = 0  # set by the connection once the headers are in
        self.reason = ""
        self.framed = False  # Content-Length or chunked: the end does not need a close
        self.close = False  # Connection: close
        self.keep = False  # Connection: keep-alive (for HTTP/1.0)
        self.ended = False

    def on_message_begin(self) -> None:
        if self.ended:  # bytes past the answer: ignored, and the connection not reused
            self.close = True

    def on_status(self, status: bytes) -> None:
        if not self.ended:
            self.reason += status.decode("latin-1")

    def on_header(self, name: bytes, value: bytes) -> None:
        if self.ended:
            return
        lowered = name.lower()
        if lowered in (b"content-length", b"transfer-encoding"):
            self.framed = True
        elif lowered == b"connection":
            self.close = self.close or b"close" in value.lower()
            self.keep = self.keep or b"keep-alive" in value.lower()

    def on_headers_complete(self) -> None:
        if self.ended:
            return
        self.status = -1  # the connection reads the real one from the parser
        if self.headers is not None and not self.headers.done():
            self.headers.set_result(None)

    def on_body(self, body: bytes) -> None:
        if not self.ended:
            self.chunks.append(body)

    def on_message_complete(self) -> None:
        if self.ended:
            return
        self.ended = True
        if not self.done.done():
            self.done.set_result(None)

    def ended_by_close(self) -> bool:
        """The server closed: True when that ends the body (headers in, no framing)."""
        if self.status and not self.framed and not self.ended:
            self.on_message_complete()
        return self.ended

    def time_out(self, timeout_s: float) -> None:
        self.fail(Http1Error(f"no answer within {timeout_s:g} s"))

    def fail(self, exc: BaseException) -> None:
        for future in (self.headers, self.done):
            if future is not None and not future.done():
                future.set_exception(exc)
                future.exception()  # retrieved: nobody may be waiting any more


class _StreamAnswer(_Answer):
    """A streamed response: body chunks wait in a queue for the reader."""

    __slots__ = ("_conn", "_error", "_queue", "_waiter")

    def __init__(self, loop: asyncio.AbstractEventLoop, conn: _Connection) -> None:
        super().__init__(loop)
        self.headers = loop.create_future()
        self._conn = conn
        self._queue: collections.deque[bytes] = collections.deque()
        self._waiter: asyncio.Future[None] | None = None
        self._error: BaseException | None = None

    def on_body(self, body: bytes) -> None:
        if self.ended:
            return
        self._queue.append(body)
        if len(self._queue) >= PAUSE_READING_CHUNKS:
            self._conn.pause_reading()
        self._wake()

    def on_message_complete(self) -> None:
        super().on_message_complete()
        self._wake()

    def fail(self, exc: BaseException) -> None:
        super().fail(exc)
        if self._error is None and not self.ended:
            self._error = exc
        self._wake()

    def _wake(self) -> None:
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    async def next(self, idle_timeout_s: float) -> bytes | None:
        """The next body chunk; None at the end of the body."""
        while not self._queue:
            if self.ended:
                return None
            if self._error is not None:
                raise self._error
            loop = asyncio.get_running_loop()
            waiter = self._waiter = loop.create_future()
            timer = loop.call_later(idle_timeout_s, _read_timeout, waiter, idle_timeout_s)
            try:
                await waiter
            finally:
                timer.cancel()
                self._waiter = None
        chunk = self._queue.popleft()
        if len(self._queue) < PAUSE_READING_CHUNKS // 2:
            self._conn.resume_reading()
        return chunk


def _read_timeout(waiter: asyncio.Future[None], timeout_s: float) -> None:
    if not waiter.done():
        waiter.set_exception(Http1Error(f"no data for {timeout_s:g} s (read timeout)"))


class _Connection(asyncio.Protocol):
    """One keep-alive connection: at most one exchange at a time."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.answer: _Answer | None = None
        self.parser: Any = None
        self.idle_since = 0.0
        self.broken = False
        self.reused = False
        self.received = False  # any byte of the current exchange's answer
        self._paused = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's are not subclasses

    def data_received(self, data: bytes) -> None:
        answer = self.answer
        if answer is None:
            self.close()  # bytes while idle: the connection's state is unknown
            return
        self.received = True
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError as exc:
            self._fail(Http1Error(f"unparsable response: {exc}"))
            self.close()
            return
        if answer.status < 0:
            answer.status = self.parser.get_status_code()
        if answer.ended and not answer.keep and self.parser.get_http_version() != "1.1":
            answer.close = True  # an HTTP/1.0 answer without keep-alive

    def eof_received(self) -> bool:
        self.broken = True
        if self.answer is not None and not self.answer.ended_by_close():
            self._fail(self._lost("server closed the connection before answering completely"))
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self.broken = True
        self._fail(self._lost(f"connection lost: {exc!r}" if exc else "connection closed"))

    def _lost(self, detail: str) -> Http1Error:
        return _Stale(detail) if self.reused and not self.received else Http1Error(detail)

    def begin(self, request: bytes, answer: _Answer) -> None:
        assert self.transport is not None
        self.answer = answer
        self.parser = httptools.HttpResponseParser(answer)
        self.received = False
        self.transport.write(request)

    def finish(self) -> None:
        """The exchange ended, answered or not (then the connection's state is unknown)."""
        if self.answer is not None and (self.answer.close or not self.answer.ended):
            self.close()
        self.answer = self.parser = None

    @property
    def reusable(self) -> bool:
        return not self.broken and self.transport is not None and not self.transport.is_closing()

    def _fail(self, exc: BaseException) -> None:
        self.broken = True
        if self.answer is not None:
            self.answer.fail(exc)

    def pause_reading(self) -> None:
        if not self._paused and self.transport is not None and not self.transport.is_closing():
            self._paused = True
            self.transport.pause_reading()

    def resume_reading(self) -> None:
        if self._paused and self.transport is not None and not self.transport.is_closing():
            self._paused = False
            self.transport.resume_reading()

    def close(self) -> None:
        self.broken = True
        if self.transport is not None:
            self.transport.close()


class Http1Stream:
    """A streamed response (the SSE wake stream): status, reason, and the body as lines."""

    def __init__(
        self, client: Http1Client, conn: _Connection, answer: _StreamAnswer, idle_timeout_s: float
    ) -> None:
        self._client = client
        self._conn = conn
        self._answer = answer
        self._idle_timeout_s = idle_timeout_s
        self.status = answer.status
        self.reason = answer.reason

    async def read(self, limit: int = 65_536) -> bytes:
        """The rest of the body, at most ``limit`` bytes (an error answer)."""
        parts: list[bytes] = []
        size = 0
        while size < limit:
            chunk = await self._answer.next(self._idle_timeout_s)
            if chunk is None:
                break
            parts.append(chunk)
            size += len(chunk)
        return b"".join(parts)[:limit]

    async def lines(self) -> AsyncIterator[str]:
        """Body lines without their terminator (``\\n``, ``\\r\\n`` or ``\\r``, as in SSE)."""
        decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        pending = ""
        while True:
            chunk = await self._answer.next(self._idle_timeout_s)
            if chunk is None:
                text = pending + decoder.decode(b"", final=True)
                tail = text.replace("\r\n", "\n").replace("\r", "\n").split("\n")
                if tail[-1] == "":
                    tail.pop()
                for line in tail:
                    yield line
                return
            text = pending + decoder.decode(chunk)
            hold = ""
            if text.endswith("\r"):  # maybe the first half of a CRLF: decide with more data
                text, hold = text[:-1], "\r"
            lines = text.replace("\r\n", "\n").replace("\r", "\n").split("\n")
            pending = lines.pop() + hold
            for line in lines:
                yield line

    async def aclose(self) -> None:
        """Close the connection (a stream's connection is never reused)."""
        self._conn.close()
        self._conn.answer = self._conn.parser = None
        self._client._open.discard(self._conn)


class Http1Client:
    """Requests to one origin over a small pool of keep-alive connections."""

    def __init__(
        self,
        base_url: str,
        headers: Mapping[str, str],
        *,
        connect_timeout_s: float,
        request_timeout_s: float,
        keepalive_expiry_s: float = KEEPALIVE_EXPIRY_S,
        max_idle: int = MAX_IDLE,
        ssl_context: ssl.SSLContext | None = None,
    ) -> None:
        parts = urlsplit(base_url)
        self._host = parts.hostname or ""
        self._tls = parts.scheme == "https"
        self._port = parts.port or (443 if self._tls else 80)
        self._prefix = parts.path.rstrip("/")
        self._ssl_context = ssl_context
        self._connect_timeout_s = connect_timeout_s
        self._request_timeout_s = request_timeout_s
        self._keepalive_expiry_s = keepalive_expiry_s
        self._max_idle = max_idle
        self._idle: list[_Connection] = []
        self._open: set[_Connection] = set()
        self._closed = False
        self.connections_opened = 0
        fixed = {"host": parts.netloc, "accept": "*/*", "user-agent": _user_agent()}
        fixed.update((name.lower(), value) for name, value in headers.items())
        auth = fixed.pop("authorization", None)
        self._fixed = "".join(f"{_title(k)}: {v}\r\n" for k, v in fixed.items()).encode("latin-1")
        self._auth = f"Authorization: {auth}\r\n".encode("latin-1") if auth else b""

    def encode(
        self,
        method: str,
        target: str,
        body: bytes | None = None,
        *,
        token: str | None = None,
        extra: bytes = b"",
    ) -> bytes:
        """The request's bytes; ``token`` is a bearer token used instead of the client's."""
        auth = (
            b"Authorization: Bearer " + token.encode("latin-1") + b"\r\n" if token else self._auth
        )
        line = f"{method} {self._prefix}{target} HTTP/1.1\r\n".encode("latin-1")
        if body is None:
            length = b"Content-Length: 0\r\n" if method in ("POST", "PUT", "PATCH") else b""
            return b"".join((line, self._fixed, auth, extra, length, b"\r\n"))
        return b"".join(
            (
                line,
                self._fixed,
                auth,
                extra,
                b"Content-Type: application/json\r\nContent-Length: ",
                str(len(body)).encode(),
                b"\r\n\r\n",
                body,
            )
        )

    async def request(
        self, method: str, target: str, body: bytes | None = None, *, token: str | None = None
    ) -> Reply:
        """One exchange on a pooled connection, answered within the request timeout. A reused
        connection that the server closed before answering a byte (an idle keep-alive it timed
        out as the request left) is retried once, on a fresh one."""
        data = self.encode(method, target, body, token=token, extra=header_bytes())
        try:
            conn = self._take_idle() or await self._connect_within()
            try:
                return await self._exchange(conn, data)
            except _Stale:
                return await self._exchange(await self._connect_within(), data)
        except OSError as exc:
            raise Http1Error(repr(exc)) from exc

    async def _exchange(self, conn: _Connection, data: bytes) -> Reply:
        loop = asyncio.get_running_loop()
        answer = _Answer(loop)
        timer = loop.call_later(self._request_timeout_s, answer.time_out, self._request_timeout_s)
        try:
            conn.begin(data, answer)
            await answer.done
        finally:
            timer.cancel()
            conn.finish()
            self._release(conn)
        return Reply(answer.status, answer.reason, b"".join(answer.chunks))

    async def stream(self, target: str, *, idle_timeout_s: float) -> Http1Stream:
        """GET ``target`` on a connection of its own; returns once the headers arrived."""
        data = self.encode("GET", target, extra=b"Accept: text/event-stream\r\n")
        conn: _Connection | None = None
        try:
            conn = await self._connect_within()
            answer = _StreamAnswer(asyncio.get_running_loop(), conn)
            conn.begin(data, answer)
            assert answer.headers is not None
            async with asyncio.timeout(idle_timeout_s):
                await answer.headers
            return Http1Stream(self, conn, answer, idle_timeout_s)
        except BaseException as exc:
            if conn is not None:
                conn.close()
                self._open.discard(conn)
            if isinstance(exc, TimeoutError):
                raise Http1Error(f"no answer within {idle_timeout_s:g} s") from None
            if isinstance(exc, OSError):
                raise Http1Error(repr(exc)) from exc
            raise

    def _take_idle(self) -> _Connection | None:
        """The most recently used idle connection that may still be alive."""
        now = time.monotonic()
        while self._idle:
            conn = self._idle.pop()
            if conn.reusable and now - conn.idle_since < self._keepalive_expiry_s:
                conn.reused = True
                return conn
            conn.close()
            self._open.discard(conn)
        return None

    async def _connect_within(self) -> _Connection:
        try:
            async with asyncio.timeout(self._connect_timeout_s):
                return await self._connect()
        except TimeoutError:
            raise Http1Error(f"connect timed out after {self._connect_timeout_s:g} s") from None

    async def _connect(self) -> _Connection:
        if self._closed:
            raise Http1Error("client closed")
        context = None
        if self._tls:
            if self._ssl_context is None:
                self._ssl_context = _default_ssl_context()
            context = self._ssl_context
        _, conn = await asyncio.get_running_loop().create_connection(
            _Connection,
            self._host,
            self._port,
            ssl=context,
            server_hostname=self._host if context is not None else None,
        )
        self.connections_opened += 1
        if self._closed:
            conn.close()
            raise Http1Error("client closed")
        self._open.add(conn)
        return conn

    def _release(self, conn: _Connection) -> None:
        if self._closed or not conn.reusable or len(self._idle) >= self._max_idle:
            conn.close()
            self._open.discard(conn)
            return
        conn.idle_since = time.monotonic()
        self._idle.append(conn)

    async def aclose(self) -> None:
        """Close every connection, streams' too."""
        self._closed = True
        for conn in self._open:
            conn.close()
        self._idle.clear()
        self._open.clear()
        await asyncio.sleep(0)  # let the transports report connection_lost


def _title(name: str) -> str:
    return "-".join(part.capitalize() for part in name.split("-"))


def _user_agent() -> str:
    from pullwake import __version__

    return f"pullwake-runner/{__version__}"


def _default_ssl_context() -> ssl.SSLContext:
    """httpx's default context: the same CA bundle, ``SSL_CERT_FILE`` and ``SSL_CERT_DIR``."""
    import httpx

    return httpx.create_ssl_context()
