"""Helpers for testing pullwake and apps that embed it, and handlers without a server.

For a handler, :func:`fake_wake` builds the :class:`~pullwake.runner.Wake` a runner would hand
it (messages, entity, epoch) over a :class:`FakeTransport`, an in-memory stand-in for the
server that records every call and can be told to fail one with a problem code;
:meth:`FakeWake.run` runs the handler and ends the claim the way the runner would (done,
release, or nothing when the claim was lost). These need only the base install
(``pip install pullwake``).

For an app: :func:`serve_in_background` runs a real server on a free port (the server extra),
and :class:`RedisServer` a private ``redis-server`` that a test may stop and start again
(empty)."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import shutil
import socket
import subprocess
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from pullwake.errors import error_for_code
from pullwake.runner.transport import ApiError, ClaimOutcome, EntityState, WakeEvent
from pullwake.runner.wake import ClaimLost, Handler, Release, Wake
from pullwake.wire import (
    Callbacks,
    ClaimHeartbeatResponse,
    DoneResponse,
    MessagePage,
    MessageView,
    NotificationEntity,
    ReleaseResponse,
    WakeEntry,
    WakeNotification,
)

__all__ = [
    "FakeTransport",
    "FakeWake",
    "Outcome",
    "RedisServer",
    "fake_wake",
    "free_port",
    "serve_in_background",
]


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


@contextlib.asynccontextmanager
async def serve_in_background(app: Any, *, host: str = "127.0.0.1") -> AsyncIterator[str]:
    """Run ``app`` under uvicorn in this event loop; yield its base URL; stop it on exit
    (needs the server extra)."""
    import uvicorn

    from pullwake.http.plugin import DrainingServer

    config = uvicorn.Config(
        app,
        host=host,
        port=free_port(),
        log_level="warning",
        lifespan="on",
        timeout_graceful_shutdown=1,
    )
    server = DrainingServer(config)
    task = asyncio.create_task(server.serve())
    try:
        while not server.started:
            if task.done():
                task.result()
                raise RuntimeError("server exited during start-up")
            await asyncio.sleep(0.01)
        yield f"http://{host}:{config.port}"
    finally:
        server.drain_and_exit()
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.wait_for(task, timeout=10)


class RedisServer:
    """A ``redis-server`` of one test on a fixed loopback port, without persistence: every
    :meth:`start` after a :meth:`stop` is a Redis restarted empty."""

    def __init__(self, directory: Path, port: int | None = None) -> None:
        self.directory = directory
        self.port = port or free_port()
        self.proc: subprocess.Popen[bytes] | None = None
        self.starts = 0

    @property
    def url(self) -> str:
        """The server's URL (database 0)."""
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self, timeout_s: float = 10) -> None:
        """Start the server and wait until it accepts connections."""
        program = shutil.which("redis-server")
        if program is None:
            raise RuntimeError("redis-server is not on PATH")
        self.starts += 1
        log = (self.directory / f"redis-{self.port}.log").open("ab")
        args = ["--port", str(self.port), "--bind", "127.0.0.1", "--save", ""]
        args += ["--appendonly", "no", "--dir", str(self.directory)]
        with log:
            self.proc = subprocess.Popen(
                [program, *args],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        deadline = time.monotonic() + timeout_s
        while not _accepts(self.port):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"redis-server on port {self.port} did not start")
            time.sleep(0.02)

    def stop(self) -> None:
        """Stop the server (its data is gone: nothing is saved)."""
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(5)


def _accepts(port: int) -> bool:
    with socket.socket() as sock:
        sock.settimeout(0.2)
        return sock.connect_ex(("127.0.0.1", port)) == 0


TEST_SENDER = "user:test@example.com"
"""The sender of :func:`fake_wake`'s messages unless told otherwise."""


class _FakeWakeStream:
    """The wake stream of a :class:`FakeTransport`: the wakes offered, as they are offered,
    until it is closed."""

    def __init__(self, events: Sequence[WakeEvent]) -> None:
        self._queue: asyncio.Queue[WakeEvent | None] = asyncio.Queue()
        for event in events:
            self._queue.put_nowait(event)
        self.closed = False

    def push(self, event: WakeEvent) -> None:
        if not self.closed:
            self._queue.put_nowait(event)

    async def __aiter__(self) -> AsyncIterator[WakeEvent]:
        while (event := await self._queue.get()) is not None:
            yield event

    async def aclose(self) -> None:
        self.closed = True
        self._queue.put_nowait(None)


@dataclass
class FakeTransport:
    """An in-memory :class:`~pullwake.runner.transport.Transport`: no server, every call
    recorded in :attr:`calls` (method name and arguments, in order), with the outcomes in
    :attr:`emitted`, :attr:`dones` and :attr:`releases`. :meth:`fail` makes calls answer a
    problem code instead, as the server would.

    The inbox past a claim's first batch is :attr:`inbox` (what ``Wake.messages`` pages
    through); :meth:`offer` queues a wake for a :class:`~pullwake.runner.Runner` given this
    transport (its wake streams yield the offered wakes and stay open until closed).

    Example: an event append that is fenced ends the claim as lost::

        transport = FakeTransport()
        transport.fail("emit", "FENCED")
        wake = fake_wake({"n": 1}, transport=transport)
        outcome = await wake.run(handle)
        assert outcome.lost == "FENCED" and transport.dones == []
    """

    inbox: list[MessageView] = field(default_factory=list)
    calls: list[tuple[str, tuple[Any, ...]]] = field(default_factory=list)
    emitted: list[Any] = field(default_factory=list)
    """The payloads of the events appended (successfully), in order."""
    dones: list[int] = field(default_factory=list)
    """The ``acked_offset`` of each done."""
    releases: list[str | None] = field(default_factory=list)
    """The error text of each release."""
    entity_state: EntityState = field(default_factory=lambda: EntityState("idle"))
    """What reading the entity answers."""
    closed: bool = False
    _failures: dict[str, list[ApiError]] = field(default_factory=dict)
    _offered: list[WakeNotification] = field(default_factory=list)
    _streams: list[_FakeWakeStream] = field(default_factory=list)
    _entries: itertools.count[int] = field(default_factory=lambda: itertools.count(1))

    def fail(
        self, method: str, code: str, detail: str = "", *, status: int | None = None, times: int = 1
    ) -> None:
        """Make the next ``times`` calls of ``method`` (``"emit"``, ``"done"``, ``"messages"``,
        ...) raise the :class:`~pullwake.runner.ApiError` the server answers with ``code``:
        its status is the one of that code in :mod:`pullwake.errors` unless ``status`` says
        (``"UNREACHABLE"`` is status 0, no answer). Lost-claim codes (``FENCED``,
        ``LEASE_EXPIRED``, ``FORBIDDEN``, ``NOT_FOUND``) become :class:`~pullwake.runner.ClaimLost`
        in the handler, as with a real server."""
        if not callable(getattr(self, method, None)) or method.startswith("_"):
            raise ValueError(f"the transport has no call {method!r}")
        if status is None:
            known = error_for_code(code)
            status = known.status if known else (0 if code == "UNREACHABLE" else 500)
        error = ApiError(status, code, detail or f"{method} answered {code} (FakeTransport)")
        self._failures.setdefault(method, []).extend([error] * times)

    def offer(self, notification: WakeNotification | FakeWake) -> None:
        """Queue a wake for a runner: open wake streams yield it (and those opened later,
        while it is unclaimed), and claiming it answers ``notification``."""
        if isinstance(notification, Wake):
            notification = notification.notification
        self._offered.append(notification)
        for stream in self._streams:
            stream.push(self._event(notification))

    def _event(self, n: WakeNotification) -> WakeEvent:
        entry = WakeEntry(n.wake_id, n.entity.url, n.epoch, "message", _iso(n))
        return WakeEvent(f"{next(self._entries)}-0", entry)

    def called(self, method: str) -> list[tuple[Any, ...]]:
        """The arguments of every call of ``method``, in order."""
        return [args for name, args in self.calls if name == method]

    def _record(self, method: str, *args: Any) -> None:
        self.calls.append((method, args))
        planned = self._failures.get(method)
        if planned:
            raise planned.pop(0)

    async def register(self, label: str, kind: str) -> None:
        self._record("register", label, kind)

    async def heartbeat(self, lease_ms: int, diagnostics: dict[str, Any]) -> None:
        self._record("heartbeat", lease_ms, diagnostics)

    async def open_wakes(self, session: str) -> _FakeWakeStream:
        self._record("open_wakes", session)
        stream = _FakeWakeStream([self._event(n) for n in self._offered])
        self._streams = [s for s in self._streams if not s.closed] + [stream]
        return stream

    async def claim(self, wake_id: str, entry_id: str) -> ClaimOutcome:
        self._record("claim", wake_id, entry_id)
        for i, offered in enumerate(self._offered):
            if offered.wake_id == wake_id:
                return self._offered.pop(i)
        return None

    async def claim_heartbeat(self, claim: WakeNotification) -> ClaimHeartbeatResponse:
        self._record("claim_heartbeat", claim.claim_id)
        expires = datetime.now(UTC) + timedelta(milliseconds=claim.lease_ms)
        return ClaimHeartbeatResponse(True, expires, claim.entity.status)

    async def done(
        self, claim: WakeNotification, acked_offset: int, *, claim_next: bool = False
    ) -> DoneResponse:
        self._record("done", claim.claim_id, acked_offset, claim_next)
        self.dones.append(acked_offset)
        return DoneResponse(True, acked_offset < self._tail(claim))

    async def release(self, claim: WakeNotification, error: str | None) -> ReleaseResponse:
        self._record("release", claim.claim_id, error)
        self.releases.append(error)
        return ReleaseResponse(True, claim.acked_offset < self._tail(claim))

    async def entity(self, claim: WakeNotification) -> EntityState:
        self._record("entity", claim.entity.url)
        return self.entity_state

    async def emit(self, claim: WakeNotification, payload: Any) -> int:
        self._record("emit", claim.claim_id, payload)
        self.emitted.append(payload)
        return len(self.emitted)

    async def messages(self, claim: WakeNotification, after: int, limit: int) -> MessagePage:
        self._record("messages", claim.claim_id, after, limit)
        later = [m for m in self.inbox if m.offset > after]
        page = later[:limit]
        tail = self._tail(claim)
        next_after = page[-1].offset if page else after
        return MessagePage(page, next_after, tail, more=len(later) > len(page))

    async def aclose(self) -> None:
        self._record("aclose")
        self.closed = True

    def _tail(self, claim: WakeNotification) -> int:
        return max([claim.tail_offset, *(m.offset for m in self.inbox)])


@dataclass(frozen=True)
class Outcome:
    """How the runner ends the claim once the handler returned or raised (:meth:`FakeWake.run`).

    Exactly one of three: ``done`` is the ``acked_offset`` of the done it sends (everything
    delivered after a return; what :meth:`~pullwake.runner.Wake.ack` reached after an error,
    or after a :class:`~pullwake.runner.Release` that had acked some), ``released`` the reason of
    the release it sends instead (a ``Release`` before any ack), ``lost`` the problem code when
    the claim was lost (fenced, lease expired: no done, no release). ``error`` is what the
    handler raised, ``Release`` included (None when it returned)."""

    done: int | None = None
    released: str | None = None
    lost: str | None = None
    error: BaseException | None = None


class FakeWake(Wake):
    """A :class:`~pullwake.runner.Wake` over a :class:`FakeTransport` (:func:`fake_wake`
    builds one): what the handler did is in :attr:`acks` (every ``ack`` offset),
    :attr:`emitted` (the event payloads) and :attr:`releases`."""

    def __init__(
        self, notification: WakeNotification, transport: FakeTransport, *, page_limit: int = 100
    ) -> None:
        super().__init__(notification, transport, page_limit=page_limit)
        self.transport = transport
        self.acks: list[int] = []
        """The offset of every :meth:`ack` call, in order."""

    def ack(self, offset: int) -> None:
        """As :meth:`Wake.ack <pullwake.runner.Wake.ack>`, and recorded in :attr:`acks`."""
        super().ack(offset)
        self.acks.append(offset)

    @property
    def emitted(self) -> list[Any]:
        """The payloads the handler appended as events, in order."""
        return self.transport.emitted

    @property
    def releases(self) -> list[str | None]:
        """The reason of every release of the claim (at most one, after :meth:`run`)."""
        return self.transport.releases

    async def run(self, handler: Handler) -> Outcome:
        """Run ``handler`` on this wake and end the claim as the runner does: a done after a
        return (acking everything delivered) or after an error (acking what it acked), a
        release after a :class:`~pullwake.runner.Release` raised before any ack, nothing when
        the claim was lost. The handler's exception is in the outcome, not raised."""
        error: BaseException | None = None
        try:
            await handler(self)
        except Exception as exc:  # what the runner catches (not a cancellation)
            error = exc
        if isinstance(error, ClaimLost):
            return Outcome(lost=error.code, error=error)
        progressed = self.acked_offset > self.notification.acked_offset
        try:
            if isinstance(error, Release) and not progressed:
                reason = str(error) or "released by the handler"
                await self.transport.release(self.notification, reason)
                return Outcome(released=reason, error=error)
            acked = self.acked_offset if error else max(self.acked_offset, self.delivered_offset)
            await self.transport.done(self.notification, acked)
        except ApiError as exc:
            return Outcome(lost=exc.code, error=error or exc)
        return Outcome(done=acked, error=error)


def fake_wake(
    *payloads: Any,
    entity: str = "/test/1",
    epoch: int = 1,
    acked_offset: int = 0,
    first_batch: int | None = None,
    status: str = "running",
    tags: dict[str, str] | None = None,
    sender: str = TEST_SENDER,
    transport: FakeTransport | None = None,
    page_limit: int = 100,
) -> FakeWake:
    """The wake a runner would hand a handler for ``entity`` (``/type/id``), its inbox holding
    ``payloads`` at offsets ``acked_offset + 1`` on, claimed at ``epoch``.

    ``first_batch`` caps the messages the claim itself carries (the rest the handler pages
    through, as with a long inbox; default: all of them); ``page_limit`` is the size of those
    pages. ``status`` is the entity's (``"stopping"`` makes ``wake.stopping`` true).

    Example, a handler that echoes each message::

        async def handle(wake: Wake) -> None:
            async for message in wake.messages:
                await wake.emit({"echo": message.payload})
                wake.ack(message.offset)

        async def test_handle_echoes() -> None:
            wake = fake_wake({"n": 1}, {"n": 2}, entity="/orders/42")
            outcome = await wake.run(handle)
            assert outcome.done == 2 and outcome.error is None
            assert wake.emitted == [{"echo": {"n": 1}}, {"echo": {"n": 2}}]
            assert wake.acks == [1, 2]
    """
    parts = entity.split("/")
    if len(parts) != 3 or parts[0] or not parts[1] or not parts[2]:
        raise ValueError(f"entity must look like /type/id, not {entity!r}")
    now = datetime.now(UTC)
    messages = [
        MessageView(acked_offset + n, payload, sender, now)
        for n, payload in enumerate(payloads, start=1)
    ]
    batch = messages if first_batch is None else messages[:first_batch]
    transport = transport if transport is not None else FakeTransport()
    transport.inbox.extend(messages[len(batch) :])
    claim_id = f"wk_fake{next(_claim_ids):08d}"
    notification = WakeNotification(
        claim_id=claim_id,
        wake_id=claim_id,
        epoch=epoch,
        claim_token="pwc_fake",
        lease_ms=30_000,
        lease_expires_at=now + timedelta(seconds=30),
        entity=NotificationEntity(entity, parts[1], parts[2], status, dict(tags or {}), sender),
        acked_offset=acked_offset,
        tail_offset=acked_offset + len(messages),
        messages=batch,
        more_messages=len(batch) < len(messages),
        callbacks=Callbacks(*(f"{entity}/{what}" for what in _CALLBACKS)),
    )
    return FakeWake(notification, transport, page_limit=page_limit)


_CALLBACKS = ("heartbeat", "done", "release", "events", "messages")
_claim_ids = itertools.count(1)


def _iso(notification: WakeNotification) -> str:
    return notification.lease_expires_at.isoformat().replace("+00:00", "Z")
