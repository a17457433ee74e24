"""The runner's HTTP transport against a scripted loopback HTTP/1.1 server: keep-alive reuse,
framing, stale connections, timeouts, problems and the SSE wake stream (lean client and httpx)."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

import msgspec
import pytest
from _runner_fakes import notification, wake_event

from pullwake.runner import ApiError, Runner, Wake
from pullwake.runner.http1 import Http1Client, Http1Error, lean_client_fits
from pullwake.runner.transport import HttpTransport, WakeEvent
from pullwake.wire import WakeNotification

CLOSE = b"<close>"  # an answer: close the connection without answering
HANG = b"<hang>"  # an answer: never answer


@dataclass
class Request:
    method: str
    target: str
    headers: dict[str, str]
    body: bytes
    connection: int

    def json(self) -> Any:
        return msgspec.json.decode(self.body)


def reply(
    status: int = 200,
    body: Any = None,
    *,
    reason: str = "OK",
    chunked: bool = False,
    close: bool = False,
    frame: bool = True,
    version: str = "1.1",
    keep_alive: bool = False,
) -> bytes:
    """An HTTP answer (``body``: bytes or a value encoded as JSON)."""
    data = body if isinstance(body, bytes) else b"" if body is None else msgspec.json.encode(body)
    head = [f"HTTP/{version} {status} {reason}", "content-type: application/json"]
    if close:
        head.append("connection: close")
    if keep_alive:
        head.append("connection: keep-alive")
    if chunked:
        head.append("transfer-encoding: chunked")
        half = len(data) // 2
        parts = [p for p in (data[:half], data[half:]) if p]
        payload = b"".join(b"%x\r\n%s\r\n" % (len(p), p) for p in parts) + b"0\r\n\r\n"
    else:
        if frame and status not in (204, 304):
            head.append(f"content-length: {len(data)}")
        payload = data
    return ("\r\n".join(head) + "\r\n\r\n").encode() + payload


Answer = Callable[[Request], "bytes | AsyncIterator[bytes]"]


@dataclass
class FakeServer:
    """A loopback HTTP/1.1 server: counts connections, records requests, answers by script.

    An answer is the bytes to write (then the connection stays open for the next request,
    unless it is :data:`CLOSE`), :data:`HANG`, or an async iterator of writes (a stream)."""

    answer: Answer
    connections: int = 0
    requests: list[Request] = field(default_factory=list)
    server: asyncio.Server | None = None
    tasks: set[asyncio.Task[None]] = field(default_factory=set)

    base_url: str = ""

    async def __aenter__(self) -> FakeServer:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.base_url = f"http://127.0.0.1:{self.server.sockets[0].getsockname()[1]}"
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self.server is not None
        self.server.close()
        for task in self.tasks:
            task.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self.server.wait_closed(), 2)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        number = self.connections
        task = asyncio.current_task()
        assert task is not None
        self.tasks.add(task)
        try:
            while True:
                try:
                    head = await reader.readuntil(b"\r\n\r\n")
                except (asyncio.IncompleteReadError, ConnectionError):
                    return
                line, *lines = head.decode("latin-1").split("\r\n")
                method, target, _ = line.split(" ")
                headers = {}
                for header in lines:
                    if header:
                        name, _, value = header.partition(":")
                        headers[name.strip().lower()] = value.strip()
                body = await reader.readexactly(int(headers.get("content-length", 0)))
                request = Request(method, target, headers, body, number)
                self.requests.append(request)
                answer = self.answer(request)
                if answer == HANG:
                    await asyncio.Future()
                if answer == CLOSE:
                    return
                if isinstance(answer, bytes):
                    writer.write(answer)
                    await writer.drain()
                    continue
                async with contextlib.aclosing(answer):
                    async for chunk in answer:
                        if chunk == CLOSE:
                            return
                        writer.write(chunk)
                        await writer.drain()
        except (ConnectionError, asyncio.CancelledError):
            pass  # CancelledError too: asyncio's stream callback chokes on a cancelled handler
        finally:
            writer.close()


def claim_and_done(request: Request) -> bytes:
    """Claims and dones as the pullwake API answers them (one entity, offsets 1..2)."""
    path = request.target.split("?")[0]
    if path.endswith("/claim"):
        return reply(200, notification(wake_event()))
    if path.endswith("/done"):
        return reply(200, {"ok": True, "next_wake": False}, chunked=True)
    return reply(404, {"code": "NOT_FOUND", "detail": path}, reason="Not Found")


def transport_for(server: FakeServer, lean: bool, **kw: Any) -> HttpTransport:
    return HttpTransport(server.base_url, "runner-1", "pwk_runner", lean=lean, **kw)


LEAN = pytest.mark.parametrize("lean", [True, False], ids=["lean", "httpx"])


@LEAN
async def test_claim_done_cycles_reuse_one_connection(lean: bool) -> None:
    async with FakeServer(claim_and_done) as server:
        transport = transport_for(server, lean)
        try:
            for _ in range(5):
                claim = await transport.claim("wk_1", "1-0")
                assert isinstance(claim, WakeNotification)
                done = await transport.done(claim, 2, claim_next=True)
                assert done.ok
                assert done.next_claim is None
        finally:
            await transport.aclose()
    assert server.connections == 1
    assert len(server.requests) == 10
    if lean:
        assert transport.connections_opened == 1
    claim_request, done_request = server.requests[:2]
    assert (claim_request.method, claim_request.target) == ("POST", "/v1/runners/runner-1/claim")
    assert claim_request.headers["authorization"] == "Bearer pwk_runner"
    assert claim_request.json() == {"wake_id": "wk_1", "entry_id": "1-0"}
    assert done_request.target == "/v1/claims/wk_ta0001/done"
    assert done_request.headers["authorization"] == "Bearer pwc_secret"  # the claim's token
    assert done_request.headers["content-type"] == "application/json"
    assert done_request.json() == {"epoch": 1, "acked_offset": 2, "claim_next": True}


@LEAN
async def test_release_answers_next_wake_and_the_entity_is_read_with_the_runners_token(
    lean: bool,
) -> None:
    def answer(request: Request) -> bytes:
        if request.target.endswith("/release"):
            return reply(200, {"ok": True, "next_wake": False})
        dispatch = {"parked_reason": "5 claims in a row", "failed_attempts": 5, "epoch": 3}
        return reply(200, {"url": "/t/a", "status": "idle", "dispatch": dispatch, "tags": {}})

    claim = notification(wake_event())
    async with FakeServer(answer) as server:
        transport = transport_for(server, lean)
        try:
            released = await transport.release(claim, "boom")
            state = await transport.entity(claim)
        finally:
            await transport.aclose()
    assert (released.ok, released.next_wake) == (True, False)
    assert (state.status, state.dispatch.parked_reason, state.dispatch.failed_attempts) == (
        "idle",
        "5 claims in a row",
        5,
    )
    release, read = server.requests
    assert release.json() == {"epoch": 1, "error": "boom"}
    assert (read.method, read.target) == ("GET", "/v1/entities/t/a")
    assert read.headers["authorization"] == "Bearer pwk_runner"  # the claim has ended


@LEAN
async def test_answers_framed_every_way(lean: bool) -> None:
    answers = {
        "/length": reply(200, {"offset": 1}),
        "/chunked": reply(200, {"offset": 2}, chunked=True),
        "/empty": reply(204),
    }

    async def until_close() -> AsyncIterator[bytes]:
        yield reply(200, {"offset": 4}, frame=False)
        yield CLOSE

    def answer(request: Request) -> bytes | AsyncIterator[bytes]:
        return until_close() if request.target == "/until-close" else answers[request.target]

    async with FakeServer(answer) as server:
        client = Http1Client(server.base_url, {}, connect_timeout_s=5, request_timeout_s=5)
        try:
            got = [await client.request("GET", t) for t in [*answers, "/until-close", "/length"]]
        finally:
            await client.aclose()
    assert [(g.status, g.content) for g in got] == [
        (200, b'{"offset":1}'),
        (200, b'{"offset":2}'),
        (204, b""),
        (200, b'{"offset":4}'),
        (200, b'{"offset":1}'),
    ]
    assert got[0].reason == "OK"
    assert server.connections == 2  # the answer ended by a close took its connection along
    del lean


async def test_a_connection_the_server_closes_is_not_reused() -> None:
    async with FakeServer(lambda r: reply(200, {"ok": True}, close=r.target == "/bye")) as server:
        client = Http1Client(server.base_url, {}, connect_timeout_s=5, request_timeout_s=5)
        try:
            await client.request("GET", "/bye")
            await client.request("GET", "/next")
            await client.request("GET", "/again")
        finally:
            await client.aclose()
    assert server.connections == 2
    assert client.connections_opened == 2


async def test_http_1_0_answers_keep_the_connection_only_when_they_say_so() -> None:
    answers = {
        "/plain": reply(200, {"n": 1}, version="1.0"),
        "/kept": reply(200, {"n": 2}, version="1.0", keep_alive=True),
        "/after": reply(200, {"n": 3}),
        "/last": reply(200, {"n": 4}),
    }
    async with FakeServer(lambda r: answers[r.target]) as server:
        client = Http1Client(server.base_url, {}, connect_timeout_s=5, request_timeout_s=5)
        try:
            got = [(await client.request("GET", target)).content for target in answers]
        finally:
            await client.aclose()
    assert got == [b'{"n":1}', b'{"n":2}', b'{"n":3}', b'{"n":4}']
    assert [r.connection for r in server.requests] == [1, 2, 2, 2]


async def test_bytes_past_the_answer_are_dropped_with_the_connection() -> None:
    extra = reply(200, {"n": 1}) + b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\njunk!"
    answers = {"/first": extra, "/second": reply(200, {"n": 2})}
    async with FakeServer(lambda r: answers[r.target]) as server:
        client = Http1Client(server.base_url, {}, connect_timeout_s=5, request_timeout_s=5)
        try:
            first = await client.request("GET", "/first")
            second = await client.request("GET", "/second")
        finally:
            await client.aclose()
    assert (first.content, second.content) == (b'{"n":1}', b'{"n":2}')
    assert [r.connection for r in server.requests] == [1, 2]


async def test_an_idle_connection_past_its_expiry_is_replaced() -> None:
    async with FakeServer(lambda r: reply(200, {"ok": True})) as server:
        client = Http1Client(
            server.base_url, {}, connect_timeout_s=5, request_timeout_s=5, keepalive_expiry_s=0.05
        )
        try:
            await client.request("GET", "/a")
            await asyncio.sleep(0.1)
            await client.request("GET", "/b")
        finally:
            await client.aclose()
    assert client.connections_opened == 2


async def test_a_stale_keepalive_connection_is_retried_once_on_a_fresh_one() -> None:
    """The server drops a kept-alive connection as the next request arrives (its idle timeout
    raced the request): the request goes again on a new connection, transparently."""

    def answer(request: Request) -> bytes:
        if request.connection == 1 and request.target == "/second":
            return CLOSE
        return reply(200, {"at": request.target})

    async with FakeServer(answer) as server:
        client = Http1Client(server.base_url, {}, connect_timeout_s=5, request_timeout_s=5)
        try:
            await client.request("POST", "/first", b"{}")
            second = await client.request("POST", "/second", b"{}")
        finally:
            await client.aclose()
    assert second.content == b'{"at":"/second"}'
    assert [(r.target, r.connection) for r in server.requests] == [
        ("/first", 1),
        ("/second", 1),
        ("/second", 2),
    ]


@LEAN
async def test_a_fresh_connection_closed_without_an_answer_is_unreachable(lean: bool) -> None:
    async with FakeServer(lambda r: CLOSE) as server:
        transport = transport_for(server, lean)
        try:
            with pytest.raises(ApiError) as raised:
                await transport.claim("wk_1", "")
        finally:
            await transport.aclose()
    assert (raised.value.status, raised.value.code) == (0, "UNREACHABLE")
    assert raised.value.transient
    assert len(server.requests) == 1  # not retried: the request may have been processed


@LEAN
async def test_no_answer_within_the_request_timeout_is_unreachable(lean: bool) -> None:
    async with FakeServer(lambda r: HANG if r.target.endswith("/claim") else b"") as server:
        transport = transport_for(server, lean, request_timeout_ms=200)
        try:
            with pytest.raises(ApiError) as raised:
                await transport.claim("wk_1", "")
        finally:
            await transport.aclose()
    assert (raised.value.status, raised.value.code) == (0, "UNREACHABLE")


@LEAN
async def test_nothing_listening_is_unreachable(lean: bool) -> None:
    async with FakeServer(lambda r: b"") as server:
        base = server.base_url
    transport = HttpTransport(base, "runner-1", None, lean=lean)
    try:
        with pytest.raises(ApiError) as raised:
            await transport.register("label", "local")
    finally:
        await transport.aclose()
    assert (raised.value.status, raised.value.code) == (0, "UNREACHABLE")
    assert raised.value.detail.startswith("POST /v1/runners: ")


async def test_a_cancelled_request_leaves_no_connection_behind() -> None:
    async with FakeServer(lambda r: HANG if r.target == "/hang" else reply(200, {})) as server:
        client = Http1Client(server.base_url, {}, connect_timeout_s=5, request_timeout_s=5)
        try:
            task = asyncio.create_task(client.request("GET", "/hang"))
            while not server.requests:
                await asyncio.sleep(0.01)
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            assert (await client.request("GET", "/ok")).status == 200
        finally:
            await client.aclose()
    assert client.connections_opened == 2  # the cancelled exchange's connection was closed


async def test_a_closed_client_refuses_requests() -> None:
    async with FakeServer(lambda r: reply(200, {})) as server:
        client = Http1Client(server.base_url, {}, connect_timeout_s=5, request_timeout_s=5)
        await client.request("GET", "/")
        await client.aclose()
        with pytest.raises(Http1Error, match="closed"):
            await client.request("GET", "/")


async def test_unparsable_answers_are_errors() -> None:
    async with FakeServer(lambda r: b"SMTP ready\r\n\r\n") as server:
        client = Http1Client(server.base_url, {}, connect_timeout_s=5, request_timeout_s=5)
        try:
            with pytest.raises(Http1Error, match="unparsable"):
                await client.request("GET", "/")
        finally:
            await client.aclose()


@LEAN
async def test_problems_become_api_errors(lean: bool) -> None:
    problem = {"code": "FENCED", "detail": "epoch 1 is stale", "status": 409}
    answers = {
        "/v1/claims/wk_ta0001/done": reply(409, problem, reason="Conflict"),
        "/v1/claims/wk_ta0001/release": reply(502, b"<html>bad gateway</html>", reason="Bad"),
    }
    claim = notification(wake_event())
    async with FakeServer(lambda r: answers[r.target]) as server:
        transport = transport_for(server, lean)
        try:
            with pytest.raises(ApiError) as fenced:
                await transport.done(claim, 2)
            with pytest.raises(ApiError) as gateway:
                await transport.release(claim, "x")
        finally:
            await transport.aclose()
    assert (fenced.value.status, fenced.value.code, fenced.value.detail) == (
        409,
        "FENCED",
        "epoch 1 is stale",
    )
    assert not fenced.value.transient
    assert (gateway.value.status, gateway.value.code, gateway.value.detail) == (
        502,
        "HTTP_502",
        "Bad",
    )
    assert gateway.value.transient


@LEAN
async def test_a_malformed_answer_is_bad_response(lean: bool) -> None:
    async with FakeServer(lambda r: reply(200, {"surprise": True})) as server:
        transport = transport_for(server, lean)
        try:
            with pytest.raises(ApiError) as raised:
                await transport.done(notification(wake_event()), 2)
        finally:
            await transport.aclose()
    assert (raised.value.status, raised.value.code) == (0, "BAD_RESPONSE")
    assert "DoneResponse" in raised.value.detail


async def test_base_path_headers_and_query() -> None:
    claim = notification(wake_event("/t/a b"))
    page = {"messages": [], "next_after": 5, "tail_offset": 5, "more": False}
    async with FakeServer(lambda r: reply(200, page)) as server:
        transport = HttpTransport(
            server.base_url + "/api/",
            "runner 1",
            "pwk_runner",
            headers={"X-Tenant": "blue", "authorization": "Bearer ignored"},
        )
        try:
            await transport.messages(claim, 5, 100)
        finally:
            await transport.aclose()
    (request,) = server.requests
    assert request.target == "/api/v1/entities/t/a%20b/messages?after=5&limit=100"
    assert request.headers["host"] == server.base_url.removeprefix("http://")
    assert request.headers["x-tenant"] == "blue"
    assert request.headers["authorization"] == "Bearer pwc_secret"
    assert request.headers["user-agent"].startswith("pullwake-runner/")
    assert "accept-encoding" not in request.headers  # answers come uncompressed


def test_the_lean_client_steps_aside_for_proxies(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("http_proxy", "https_proxy", "all_proxy", "no_proxy"):
        monkeypatch.delenv(name, raising=False)
        monkeypatch.delenv(name.upper(), raising=False)
    assert lean_client_fits("http://127.0.0.1:8000")
    assert lean_client_fits("https://api.example.com/base")
    assert not lean_client_fits("https://user:secret@api.example.com")
    assert not lean_client_fits("unix:///run/pullwake.sock")
    monkeypatch.setenv("HTTPS_PROXY", "http://proxy.example.com:3128")
    assert not lean_client_fits("https://api.example.com")
    assert lean_client_fits("http://api.example.com")  # the proxy is for https only
    assert not HttpTransport("https://api.example.com", "r", None).lean
    monkeypatch.setenv("NO_PROXY", "api.example.com")
    assert lean_client_fits("https://api.example.com")


def sse(*blocks: str) -> bytes:
    return "".join(blocks).encode()


def wake_block(n: int, *, crlf: bool = False) -> str:
    data = msgspec.json.encode(wake_event(epoch=n).wake).decode()
    text = f"id: {n}-0\nevent: wake\ndata: {data}\n\n"
    return text.replace("\n", "\r\n") if crlf else text


def chunk(data: bytes) -> bytes:
    return b"%x\r\n%s\r\n" % (len(data), data)


STREAM_HEAD = (
    b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n"
)


@LEAN
async def test_the_wake_stream_parses_events_across_chunks(lean: bool) -> None:
    first = sse(": keepalive\n\n", wake_block(1, crlf=True), "event: other\ndata: x\n\n")
    second = sse(wake_block(2, crlf=True), wake_block(3))
    pieces = [first[:-1], first[-1:] + second[:7], second[7:40], second[40:]]

    async def stream() -> AsyncIterator[bytes]:
        yield STREAM_HEAD
        for piece in pieces:
            await asyncio.sleep(0.01)
            yield chunk(piece)
        yield b"0\r\n\r\n"

    async with FakeServer(lambda r: stream()) as server:
        transport = transport_for(server, lean)
        try:
            wakes = await transport.open_wakes("s 1")
            got = [event async for event in wakes]
            await wakes.aclose()
        finally:
            await transport.aclose()
    assert [(e.entry_id, e.wake.epoch) for e in got] == [("1-0", 1), ("2-0", 2), ("3-0", 3)]
    (request,) = server.requests
    assert request.target == "/v1/runners/runner-1/wakes?session=s+1"
    assert request.headers["accept"] == "text/event-stream"


@LEAN
async def test_a_silent_wake_stream_times_out_as_unreachable(lean: bool) -> None:
    async def stream() -> AsyncIterator[bytes]:
        yield STREAM_HEAD + chunk(sse(wake_block(1)))
        await asyncio.Future()

    async with FakeServer(lambda r: stream()) as server:
        transport = transport_for(server, lean, stream_idle_timeout_ms=200)
        try:
            wakes = await transport.open_wakes("s")
            got: list[WakeEvent] = []

            async def read() -> None:
                async for event in wakes:
                    got.append(event)

            with pytest.raises(ApiError) as raised:
                await read()
            await wakes.aclose()
        finally:
            await transport.aclose()
    assert len(got) == 1
    assert raised.value.code == "UNREACHABLE"
    assert raised.value.detail.startswith("wake stream broke")


@LEAN
async def test_a_refused_wake_stream_is_its_problem(lean: bool) -> None:
    problem = {"code": "RUNNER_DISABLED", "detail": "runner-1 is disabled"}
    async with FakeServer(lambda r: reply(409, problem, reason="Conflict")) as server:
        transport = transport_for(server, lean)
        try:
            with pytest.raises(ApiError) as raised:
                await transport.open_wakes("s")
        finally:
            await transport.aclose()
    assert (raised.value.status, raised.value.code) == (409, "RUNNER_DISABLED")


async def test_a_runner_over_http_claims_and_finishes_on_one_pooled_connection() -> None:
    """The whole runner over the lean client: register and heartbeats, the wake stream on its
    own connection, and every claim and done of many wakes on one kept-alive connection."""
    wakes: asyncio.Queue[bytes] = asyncio.Queue()
    events = [wake_event(f"/t/e{n}") for n in range(6)]
    claims = {e.wake.wake_id: e for e in events}

    async def stream() -> AsyncIterator[bytes]:
        yield STREAM_HEAD
        while True:
            yield chunk(await wakes.get())

    def answer(request: Request) -> bytes | AsyncIterator[bytes]:
        path = request.target.split("?")[0]
        if path.endswith("/wakes"):
            return stream()
        if path.endswith("/claim"):
            return reply(200, notification(claims[request.json()["wake_id"]]))
        if path.endswith("/done"):
            return reply(200, {"ok": True, "next_wake": False})
        return reply(200, {"ok": True})

    handled: list[str] = []

    async def handler(wake: Wake) -> None:
        handled.append(wake.entity.url)

    async with FakeServer(answer) as server:
        runner = Runner(server.base_url, "runner-1", handler, "pwk_runner", concurrency=1)
        await runner.start()
        try:
            for event in events:
                block = f"id: {event.entry_id}\nevent: wake\ndata: "
                data = msgspec.json.encode(event.wake).decode()
                await wakes.put(f"{block}{data}\n\n".encode())
                while len(handled) < events.index(event) + 1:
                    await asyncio.sleep(0.01)
            while runner.health().dones_sent < len(events):
                await asyncio.sleep(0.01)
        finally:
            await runner.stop()
    assert handled == [e.wake.entity for e in events]
    by_connection: dict[int, set[str]] = {}
    for request in server.requests:
        kind = request.target.split("?")[0].rsplit("/", 1)[-1]
        by_connection.setdefault(request.connection, set()).add(kind)
    stream_connection = next(c for c, kinds in by_connection.items() if "wakes" in kinds)
    assert by_connection.pop(stream_connection) == {"wakes"}
    assert len(by_connection) == 1, by_connection  # register, heartbeat, claims, dones
    assert {"claim", "done"} <= next(iter(by_connection.values()))
    assert server.connections == 2
