"""The runner: drives the lifecycle machine, claims wakes and runs handlers."""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import logging
import random as _random
import re
import secrets
import signal
import socket
from collections.abc import Callable, Mapping
from typing import Any, ClassVar

import msgspec

from pullwake.runner.backoff import Backoff
from pullwake.runner.book import WakeBook
from pullwake.runner.clock import Clock, SystemClock
from pullwake.runner.failures import Failures
from pullwake.runner.health import Counters, Marks, RunnerHealth, sanitize, snapshot
from pullwake.runner.heartbeat import HeartbeatScheduler
from pullwake.runner.logs import ensure_logging
from pullwake.runner.machine import RUNNING, Effect, Event, State, transition
from pullwake.runner.transport import (
    HttpTransport,
    Refused,
    Transport,
    WakeEvent,
    WakeStream,
    open_within,
)
from pullwake.runner.wake import Handler
from pullwake.runner.work import Chaining, Job, JobContext, drain

__all__ = ["Runner", "RunnerHealth"]

log = logging.getLogger("pullwake.runner")

ErrorCallback = Callable[[BaseException], Any]


class Runner:
    """Pulls wakes for ``runner_id`` from ``base_url`` and runs ``handler`` on each claimed one.

    Several processes with the same ``runner_id`` form a pool; each has its own session.
    """

    starts_in_process: ClassVar[int] = 0
    """How many times a runner was started in this process (``pullwake runner`` checks that
    importing a handler module started none)."""

    def __init__(
        self,
        base_url: str,
        runner_id: str,
        handler: Handler,
        token: str | None = None,
        *,
        label: str | None = None,
        kind: str = "local",
        concurrency: int = 4,
        session: str | None = None,
        heartbeat_interval_ms: int = 30_000,
        event_heartbeat_throttle_ms: int = 2_000,
        lease_ms: int | None = None,
        drain_timeout_ms: int = 10_000,
        claim_grace_ms: int = 1_000,
        finish_timeout_ms: int = 5_000,
        connect_timeout_ms: int = 10_000,
        stream_idle_timeout_ms: int = 45_000,
        claim_heartbeat_ms: int | None = None,
        retry_delay_ms: int = 1_000,
        max_retry_delay_ms: int = 30_000,
        headers: Mapping[str, str] | None = None,
        register: bool = True,
        on_error: ErrorCallback | None = None,
        clock: Clock | None = None,
        random: Callable[[], float] = _random.random,
        transport: Transport | None = None,
    ) -> None:
        if concurrency < 1:
            raise ValueError("concurrency must be at least 1")
        self.base_url = base_url
        self.runner_id = runner_id
        self.handler = handler
        self.label = label if label is not None else socket.gethostname()
        self.kind = kind
        self.concurrency = concurrency
        self.session = session or f"{socket.gethostname()[:40]}-{secrets.token_hex(4)}"
        self.session = re.sub(r"[^A-Za-z0-9._-]", "-", self.session).lstrip("-._") or "s"
        self.lease_ms = lease_ms or max(3 * heartbeat_interval_ms, 1_000)
        self.drain_timeout_ms = drain_timeout_ms
        self.claim_grace_ms = claim_grace_ms
        self.finish_timeout_ms = finish_timeout_ms
        self.connect_timeout_ms = connect_timeout_ms
        self.claim_heartbeat_ms = claim_heartbeat_ms
        self.on_error = on_error
        self._token = token
        self._headers = dict(headers or {})
        self._stream_idle_timeout_ms = stream_idle_timeout_ms
        self._register = register
        self._clock: Clock = clock or SystemClock()
        self._random = random
        self._transport = transport
        self._owns_transport = transport is None
        self._backoff = Backoff(random=random)
        # for the runner's life: an entity that fails keeps its count across restarts
        self._failures = Failures(retry_delay_ms, max_retry_delay_ms, random=random)
        self._heartbeats = HeartbeatScheduler(
            self._send_heartbeat,
            self._clock,
            interval_ms=heartbeat_interval_ms,
            throttle_ms=event_heartbeat_throttle_ms,
            on_result=self._heartbeat_result,
            on_reset=lambda exc: self._fire(Event.STREAM_RESET, error=exc),
        )
        self._state = State.STOPPED
        self._stream_gen = 0
        self._stream_task: asyncio.Task[None] | None = None
        self._backoff_task: asyncio.Task[None] | None = None
        self._shutdown_task: asyncio.Task[None] | None = None
        self._stopped = asyncio.Event()
        self._stopped.set()
        self._registered = False
        self._refused: Refused | None = None
        self._run_raises = False  # run() raises a refusal, so it is not logged as well
        self._book: WakeBook[Job] = WakeBook(concurrency)
        self._ctx: JobContext | None = None
        self._chaining = Chaining()  # for the session: an old server is not asked again
        self._reset_health()

    # --- public API ---------------------------------------------------------------------------

    @property
    def status(self) -> State:
        """The lifecycle state."""
        return self._state

    @property
    def running(self) -> bool:
        """True in connecting, streaming or reconnecting."""
        return self._state in RUNNING

    @property
    def refused(self) -> Refused | None:
        """Why the server refused this runner for good (it then stopped by itself), or None."""
        return self._refused

    async def start(self) -> None:
        """Begin pulling wakes; a no-op unless stopped (a start during stop is ignored).

        When the program has configured no logging (no handler on the root logger or on
        ``pullwake``), the runner's INFO lines and up go to stderr until it does."""
        if self._state is not State.STOPPED:
            return
        Runner.starts_in_process += 1
        ensure_logging()  # a program that configured no logging still sees what the runner does
        self._reset_health()
        self._refused = None
        self._marks.started_at = self._clock.wall()
        self._stopped = asyncio.Event()
        if self._transport is None:
            self._transport = HttpTransport(
                self.base_url,
                self.runner_id,
                self._token,
                headers=self._headers,
                connect_timeout_ms=self.connect_timeout_ms,
                stream_idle_timeout_ms=self._stream_idle_timeout_ms,
                max_connections=2 * self.concurrency + 8,
            )
            self._owns_transport = True
        self._ctx = self._make_job_context(self._transport)
        self._registered = False
        self._backoff.reset()
        if not self._register:
            self._heartbeats.start()
        log.info(
            "runner %s starting (session %s, concurrency %d) against %s",
            self.runner_id,
            self.session,
            self.concurrency,
            self.base_url,
        )
        self._fire(Event.START)

    async def stop(self) -> None:
        """Stop taking wakes, let handlers finish within the drain timeout, release the rest.

        A runner the server refused (see :attr:`refused`) stops by itself; ``stop`` then
        returns at once."""
        if self._state is State.STOPPED:
            return
        self._fire(Event.STOP)
        await self._stopped.wait()

    async def run(
        self, signals: tuple[signal.Signals, ...] = (signal.SIGINT, signal.SIGTERM)
    ) -> None:
        """Start, run until one of ``signals`` arrives, then stop gracefully.

        Raises :class:`~pullwake.runner.Refused` when the server refused the runner for good
        (a bad or missing token, an invalid or unknown runner id): retrying cannot help."""
        loop = asyncio.get_running_loop()
        stop_requested = asyncio.Event()
        installed = []
        for sig in signals:
            with contextlib.suppress(RuntimeError, ValueError):  # RuntimeError covers Windows
                loop.add_signal_handler(sig, stop_requested.set)
                installed.append(sig)
        try:
            self._run_raises = True
            await self.start()
            waiter = asyncio.create_task(stop_requested.wait())
            stopped = asyncio.create_task(self._stopped.wait())
            await asyncio.wait({waiter, stopped}, return_when=asyncio.FIRST_COMPLETED)
            waiter.cancel()
            stopped.cancel()
            if self._refused is None:
                log.info("runner %s stopping", self.runner_id)
        finally:
            self._run_raises = False
            for sig in installed:
                loop.remove_signal_handler(sig)
            await self.stop()
        log.info("runner %s stopped", self.runner_id)
        if self._refused is not None:
            raise self._refused

    def health(self) -> RunnerHealth:
        """A snapshot of lifecycle, connection, heartbeat and claim state."""
        return snapshot(
            self._marks,
            self.counters,
            status=self._state.value,
            running=self.running,
            streaming=self._state is State.STREAMING,
            session=self.session,
            in_flight=len(self._book.active),
            waiting_wakes=self._book.waiting,
            concurrency=self.concurrency,
        )

    def active_entities(self) -> set[str]:
        """Entities with a claim being made or handled in this process."""
        return set(self._book.active)

    # --- the machine --------------------------------------------------------------------------

    def _fire(
        self,
        event: Event,
        *,
        error: BaseException | None = None,
        wake: WakeEvent | None = None,
        gen: int | None = None,
    ) -> None:
        if gen is not None and gen != self._stream_gen:
            return  # from a connection this runner already left
        step = transition(self._state, event)
        self._state = step.target
        if step.changed:
            log.debug("runner %s: %s --%s--> %s", self.runner_id, step.source, event, step.target)
            self._heartbeats.changed()
        for effect in step.effects:
            self._apply(effect, error, wake)

    def _apply(self, effect: Effect, error: BaseException | None, wake: WakeEvent | None) -> None:
        if effect in (Effect.ABORT_CONNECT, Effect.CLOSE_STREAM):
            self._close_stream()
        elif effect is Effect.CANCEL_BACKOFF:
            self._cancel(self._backoff_task)
            self._backoff_task = None
        elif effect is Effect.OPEN_STREAM:
            self._stream_gen += 1
            self._stream_task = asyncio.create_task(self._stream(self._stream_gen))
        elif effect is Effect.MARK_CONNECTED:
            self._backoff.reset()
            self._marks.connected_since = self._clock.wall()
            log.info(
                "runner %s connected: streaming wakes (session %s)", self.runner_id, self.session
            )
        elif effect is Effect.SCHEDULE_RECONNECT:
            self._schedule_reconnect()
        elif effect is Effect.SHUTDOWN:
            self._shutdown_task = asyncio.create_task(self._shutdown())
        elif effect is Effect.MARK_STOPPED:
            self._stopped.set()
        elif effect is Effect.RECORD_ERROR and error is not None:
            self._report(error, "wake stream")
        elif effect is Effect.HANDLE_WAKE and wake is not None:
            self._on_wake(wake)

    def _close_stream(self) -> None:
        self._stream_gen += 1
        self._cancel(self._stream_task)
        self._stream_task = None
        self._marks.connected_since = None

    @staticmethod
    def _cancel(task: asyncio.Task[Any] | None) -> None:
        if task is not None and task is not asyncio.current_task():
            task.cancel()

    def _schedule_reconnect(self) -> None:
        self._marks.reconnect_count += 1
        delay = self._backoff.next_delay_ms()
        log.info(
            "runner %s reconnecting in %.1f s (reconnect #%d)",
            self.runner_id,
            delay / 1000,
            self._marks.reconnect_count,
        )
        self._backoff_task = asyncio.create_task(self._after_backoff(delay))

    async def _after_backoff(self, delay_ms: float) -> None:
        await self._clock.sleep_ms(delay_ms)
        if asyncio.current_task() is self._backoff_task:
            self._backoff_task = None
            self._fire(Event.BACKOFF_ELAPSED)

    # --- the wake stream ----------------------------------------------------------------------

    async def _stream(self, gen: int) -> None:
        try:
            stream = await self._connect()
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            refused = Refused.of(exc, self.runner_id, self.base_url)
            if refused is not None:
                self._refuse(refused, gen)
                return
            log.warning("runner %s: connect failed: %s", self.runner_id, exc)
            self._fire(Event.CONNECT_FAILED, error=exc, gen=gen)
            return
        try:
            self._fire(Event.CONNECTED, gen=gen)
            async for wake in stream:
                self._fire(Event.WAKE, wake=wake)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            log.warning("runner %s: wake stream failed: %s", self.runner_id, exc)
            self._fire(Event.STREAM_ERROR, error=exc, gen=gen)
            return
        finally:
            with contextlib.suppress(Exception):
                await stream.aclose()
        log.info("runner %s: wake stream closed by the server", self.runner_id)
        self._fire(Event.STREAM_END, gen=gen)

    def _refuse(self, refused: Refused, gen: int) -> None:
        """Stop for good: the server will not take this runner as it is configured."""
        if gen != self._stream_gen:
            return
        self._refused = refused
        if not self._run_raises:  # run() raises it instead
            log.error("runner %s stopping: %s", self.runner_id, refused)
        self._fire(Event.REFUSED, error=refused, gen=gen)

    async def _connect(self) -> WakeStream:
        transport = self._transport
        assert transport is not None
        if self._register and not self._registered:
            await transport.register(self.label, self.kind)
            self._registered = True
            self._heartbeats.start()  # heartbeats need the runner to exist
            log.info(
                "runner %s registered (label %r, kind %s)", self.runner_id, self.label, self.kind
            )
        return await open_within(transport, self.session, self._clock, self.connect_timeout_ms)

    # --- wakes and jobs -----------------------------------------------------------------------

    def _on_wake(self, event: WakeEvent) -> None:
        self.counters.events_received += 1
        self._heartbeats.changed()
        wake = event.wake
        log.debug(
            "wake %s for %s (epoch %d, %s, entry %s)",
            wake.wake_id,
            wake.entity,
            wake.epoch,
            wake.reason,
            event.entry_id,
        )
        offer = self._book.offer(event, self._clock.now_ms())
        if offer.deferred:
            # Never claim an entity already active here; keep the newest wake and retry it when
            # the active one ends, so nothing is stranded.
            self.counters.wakes_deferred += 1
            log.info("wake %s deferred: %s is active in this process", wake.wake_id, wake.entity)
        self._pump()

    def _pump(self) -> None:
        if self._state not in RUNNING:
            return
        for event, received_ms in self._book.take_ready():
            assert self._ctx is not None
            job = Job(event, received_ms, self._ctx)
            self._book.begin(job.entity, job)
            job.task = asyncio.create_task(self._run_job(job), name=f"pullwake-job-{job.entity}")

    async def _run_job(self, job: Job) -> None:
        self._marks.last_claim_at = self._clock.wall()
        try:
            await job.run()
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # a bug in the job itself: report it, keep the runner alive
            log.exception("job for %s failed", job.entity)
            self._report(exc, f"job for {job.entity}")
        finally:
            self._book.end(job.entity, job)
            self._heartbeats.changed()
            self._pump()

    def _set_last_claim(self, result: str) -> None:
        self._marks.last_claim_result = result
        if result == "claimed":
            self._marks.last_dispatch_at = self._clock.wall()
        self._heartbeats.changed()

    # --- shutdown -----------------------------------------------------------------------------

    async def _shutdown(self) -> None:
        self._heartbeats.stop()
        self._book.clear_waiting()
        await drain(
            self._book.active.values(),
            self._clock,
            claim_grace_ms=self.claim_grace_ms,
            drain_timeout_ms=self.drain_timeout_ms,
            finish_timeout_ms=self.finish_timeout_ms,
        )
        if self._owns_transport and self._transport is not None:
            await self._transport.aclose()
            self._transport = None
        self._fire(Event.SHUTDOWN_DONE)

    # --- heartbeats and reporting -------------------------------------------------------------

    async def _send_heartbeat(self) -> None:
        transport = self._transport
        if transport is None:
            return
        diagnostics: dict[str, Any] = msgspec.to_builtins(self.health())
        await transport.heartbeat(self.lease_ms, diagnostics)

    def _heartbeat_result(self, error: BaseException | None) -> None:
        self._marks.last_heartbeat_at = self._clock.wall()
        self._marks.last_heartbeat_ok = error is None
        if error is not None:
            log.warning("runner %s heartbeat failed: %s", self.runner_id, error)
            self._report(error, "heartbeat")

    def _report(self, error: BaseException, context: str) -> None:
        """Record first, then tell ``on_error``; a failing callback never touches the lifecycle."""
        self._marks.last_error = sanitize(f"{context}: {error}")
        self._marks.last_error_at = self._clock.wall()
        self._heartbeats.changed()
        if self.on_error is None:
            return
        try:
            result = self.on_error(error)
            if inspect.isawaitable(result):
                asyncio.ensure_future(result).add_done_callback(_log_callback_failure)
        except Exception:
            log.exception("runner on_error callback failed")

    def _reset_health(self) -> None:
        self.counters = Counters()
        self._marks = Marks()

    def _make_job_context(self, transport: Transport) -> JobContext:
        """What every job of this start shares (built once, not per wake)."""
        return JobContext(
            transport=transport,
            clock=self._clock,
            handler=self.handler,
            counters=self.counters,
            report=self._report,
            changed=self._heartbeats.changed,
            accepting=lambda: self._state in RUNNING,
            others_waiting=self._book.others_waiting,
            new_backoff=lambda initial, cap: Backoff(initial, cap, random=self._random),
            claim_heartbeat_ms=self.claim_heartbeat_ms,
            last_claim=self._set_last_claim,
            chaining=self._chaining,
            failures=self._failures,
        )


def _log_callback_failure(future: asyncio.Future[Any]) -> None:
    if not future.cancelled() and future.exception() is not None:
        log.error("runner on_error callback failed", exc_info=future.exception())
