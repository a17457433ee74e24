"""A scriptable in-memory Transport and helpers for the runner unit tests."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from pullwake.runner import Runner
from pullwake.runner.clock import FakeClock, settle
from pullwake.runner.transport import ApiError, ClaimOutcome, EntityDispatch, EntityState, WakeEvent
from pullwake.runner.wake import Wake
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

NOW = datetime(2026, 1, 1, tzinfo=UTC)
END = object()
HANG = object()


def unreachable(detail: str = "connection refused") -> ApiError:
    return ApiError(0, "UNREACHABLE", detail)


def wake_event(entity: str = "/t/a", epoch: int = 1, wake_id: str | None = None) -> WakeEvent:
    wid = wake_id or f"wk_{entity.replace('/', '')}{epoch:04d}"
    return WakeEvent(f"{epoch}-0", WakeEntry(wid, entity, epoch, "message", "2026-01-01T00:00:00Z"))


def notification(
    event: WakeEvent,
    offsets: range = range(1, 3),
    *,
    acked: int = 0,
    tail: int | None = None,
    more: bool = False,
    lease_ms: int = 30_000,
) -> WakeNotification:
    _, type_, id_ = event.wake.entity.split("/")
    messages = [MessageView(o, {"n": o}, "user:a@example.com", NOW) for o in offsets]
    return WakeNotification(
        claim_id=event.wake.wake_id,
        wake_id=event.wake.wake_id,
        epoch=event.wake.epoch,
        claim_token="pwc_secret",
        lease_ms=lease_ms,
        lease_expires_at=NOW,
        entity=NotificationEntity(
            event.wake.entity, type_, id_, "running", {}, "user:a@example.com"
        ),
        acked_offset=acked,
        tail_offset=tail if tail is not None else (offsets[-1] if offsets else acked),
        messages=messages,
        more_messages=more,
        callbacks=Callbacks("h", "d", "r", "e", "m"),
    )


class FakeStream:
    """Items pushed in come out of the iterator: a WakeEvent, END, or an exception."""

    def __init__(self) -> None:
        self.items: asyncio.Queue[Any] = asyncio.Queue()
        self.closed = False

    def push(self, item: Any) -> None:
        self.items.put_nowait(item)

    async def __aiter__(self) -> AsyncIterator[WakeEvent]:
        while True:
            item = await self.items.get()
            if item is END:
                return
            if isinstance(item, BaseException):
                raise item
            yield item

    async def aclose(self) -> None:
        self.closed = True


Script = Callable[..., Awaitable[Any]] | Any


@dataclass
class FakeTransport:
    """Records every call; behaviour is scripted per call kind."""

    clock: FakeClock
    connects: list[float] = field(default_factory=list)
    connect_plan: list[Any] = field(default_factory=list)  # FakeStream | Exception | HANG
    streams: list[FakeStream] = field(default_factory=list)
    heartbeats: list[dict[str, Any]] = field(default_factory=list)
    heartbeat_plan: list[Any] = field(default_factory=list)  # None | Exception | asyncio.Event
    claims: list[tuple[str, float]] = field(default_factory=list)
    claim_script: Callable[[str], Awaitable[ClaimOutcome]] | None = None
    claim_heartbeats: list[str] = field(default_factory=list)
    claim_heartbeat_error: ApiError | None = None
    dones: list[tuple[str, int, float]] = field(default_factory=list)
    done_plan: list[Any] = field(default_factory=list)  # None | Exception | a chained claim
    done_chains: list[bool] = field(default_factory=list)
    refuse_claim_next: bool = False  # answer done with claim_next as a server before chaining
    releases: list[tuple[str, str | None]] = field(default_factory=list)
    release_times: list[float] = field(default_factory=list)
    next_wake: bool = True  # what a done without a chained claim and a release answer
    entity_reads: list[str] = field(default_factory=list)
    entity_state: EntityState | ApiError = field(default_factory=lambda: EntityState("idle"))
    emits: list[Any] = field(default_factory=list)
    emit_error: ApiError | None = None
    pages: dict[int, MessagePage] = field(default_factory=dict)
    registers: int = 0
    register_plan: list[Any] = field(default_factory=list)  # None | Exception
    closed: bool = False

    async def register(self, label: str, kind: str) -> None:
        self.registers += 1
        step = self.register_plan.pop(0) if self.register_plan else None
        if isinstance(step, BaseException):
            raise step

    async def heartbeat(self, lease_ms: int, diagnostics: dict[str, Any]) -> None:
        self.heartbeats.append({"lease_ms": lease_ms, **diagnostics})
        step = self.heartbeat_plan.pop(0) if self.heartbeat_plan else None
        if isinstance(step, asyncio.Event):
            await step.wait()
        elif isinstance(step, BaseException):
            raise step

    async def open_wakes(self, session: str) -> FakeStream:
        self.connects.append(self.clock.now_ms())
        step = self.connect_plan.pop(0) if self.connect_plan else FakeStream()
        if step is HANG:
            await asyncio.Future()  # until cancelled
        if isinstance(step, BaseException):
            raise step
        self.streams.append(step)
        return step

    async def claim(self, wake_id: str, entry_id: str) -> ClaimOutcome:
        self.claims.append((wake_id, self.clock.now_ms()))
        if self.claim_script is None:
            raise AssertionError("no claim script")
        return await self.claim_script(wake_id)

    async def claim_heartbeat(self, claim: WakeNotification) -> ClaimHeartbeatResponse:
        self.claim_heartbeats.append(claim.claim_id)
        if self.claim_heartbeat_error is not None:
            raise self.claim_heartbeat_error
        return ClaimHeartbeatResponse(True, NOW, "running")

    async def done(
        self, claim: WakeNotification, acked_offset: int, *, claim_next: bool = False
    ) -> DoneResponse:
        self.dones.append((claim.claim_id, acked_offset, self.clock.now_ms()))
        self.done_chains.append(claim_next)
        if claim_next and self.refuse_claim_next:
            detail = "invalid body: Object contains unknown field `claim_next`"
            raise ApiError(400, "INVALID_REQUEST", detail)
        step = self.done_plan.pop(0) if self.done_plan else None
        if isinstance(step, BaseException):
            raise step
        if isinstance(step, WakeNotification):  # the server chains the follow-up claim
            return DoneResponse(True, True, next_claim=step)
        pending = acked_offset < claim.tail_offset
        return DoneResponse(True, self.next_wake and pending)

    async def release(self, claim: WakeNotification, error: str | None) -> ReleaseResponse:
        self.releases.append((claim.claim_id, error))
        self.release_times.append(self.clock.now_ms())
        return ReleaseResponse(True, self.next_wake)

    async def entity(self, claim: WakeNotification) -> EntityState:
        self.entity_reads.append(claim.entity.url)
        if isinstance(self.entity_state, ApiError):
            raise self.entity_state
        return self.entity_state

    async def emit(self, claim: WakeNotification, payload: Any) -> int:
        if self.emit_error is not None:
            raise self.emit_error
        self.emits.append(payload)
        return len(self.emits)

    async def messages(self, claim: WakeNotification, after: int, limit: int) -> MessagePage:
        return self.pages[after]

    async def aclose(self) -> None:
        self.closed = True


def make_runner(
    transport: FakeTransport, handler: Callable[[Wake], Awaitable[None]] | None = None, **kw: Any
) -> Runner:
    """A Runner on the fake clock with jitter off and every timing explicit."""

    async def noop(wake: Wake) -> None:
        return None

    options: dict[str, Any] = {
        "clock": transport.clock,
        "random": lambda: 0.0,
        "transport": transport,
        "heartbeat_interval_ms": 30_000,
        "event_heartbeat_throttle_ms": 2_000,
        "session": "test-session",
    }
    options.update(kw)
    return Runner("http://server", "runner-1", handler or noop, "pwk_x", **options)


async def started(runner: Runner) -> None:
    await runner.start()
    await settle()


async def stopped(runner: Runner, clock: FakeClock, *, limit_ms: float = 120_000) -> float:
    """Stop the runner while moving the fake clock; returns how long the stop took."""
    began = clock.now_ms()
    stopping = asyncio.create_task(runner.stop())
    await settle()
    while not stopping.done():
        if clock.now_ms() - began > limit_ms:
            raise AssertionError("stop() did not finish")
        await clock.advance(50)
    await stopping
    return clock.now_ms() - began


def parked(reason: str = "5 claims in a row ended without progress (last: release)") -> EntityState:
    return EntityState("idle", EntityDispatch(parked_reason=reason, failed_attempts=5))


__all__ = [
    "END",
    "HANG",
    "FakeClock",
    "FakeStream",
    "FakeTransport",
    "make_runner",
    "notification",
    "parked",
    "settle",
    "started",
    "stopped",
    "unreachable",
    "wake_event",
]
