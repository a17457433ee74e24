"""One wake's life in the runner: claim, run the handler under claim heartbeats, done or release."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

from pullwake.errors import AlreadyClaimed, InvalidRequest, NotFound
from pullwake.runner.backoff import Backoff
from pullwake.runner.clock import Clock, wait_tasks
from pullwake.runner.failures import Failures
from pullwake.runner.health import Counters
from pullwake.runner.transport import ApiError, Transport, WakeEvent
from pullwake.runner.wake import LOST_CODES, ClaimLost, Handler, Release, Wake
from pullwake.tracing import claim_span, handler_failed
from pullwake.wire import ClaimDone, DoneResponse, WakeNotification

__all__ = ["Chaining", "Job", "JobContext", "Phase", "drain"]

log = logging.getLogger("pullwake.runner")

CLAIM_ATTEMPTS = 3


class Phase(StrEnum):
    """Where a job is; shutdown treats each phase differently."""

    CLAIMING = "claiming"
    RUNNING = "running"
    HOLDING = "holding"  # the handler failed: the claim is held for the retry delay
    FINISHING = "finishing"


@dataclass(slots=True)
class Chaining:
    """Whether done may ask for the follow-up claim (``claim_next``) in this session.

    A server from before claim chaining refuses the unknown field with 400 INVALID_REQUEST:
    the done is then sent again without it, and no later done asks.
    """

    supported: bool = True

    def refused(self, error: ApiError) -> None:
        """The server refused ``claim_next`` and took the done without it."""
        if self.supported:
            self.supported = False
            log.info(
                "the server refused claim_next on done (%s); not chaining claims in this session",
                error,
            )


def refuses_claim_next(error: ApiError) -> bool:
    """Whether ``error`` answered a done with ``claim_next`` as an old server would."""
    return error.status == InvalidRequest.status and error.code == InvalidRequest.code


@dataclass(slots=True)
class JobContext:
    """What every job shares with its runner."""

    transport: Transport
    clock: Clock
    handler: Handler
    counters: Counters
    report: Callable[[BaseException, str], None]
    changed: Callable[[], None]
    accepting: Callable[[], bool]
    new_backoff: Callable[[int, int], Backoff]
    claim_heartbeat_ms: int | None
    last_claim: Callable[[str], None]
    others_waiting: Callable[[str], bool] = lambda entity: False
    chaining: Chaining = field(default_factory=Chaining)
    failures: Failures = field(default_factory=lambda: Failures(0, 0, random=lambda: 0.0))


CHAIN_LIMIT = 100
"""Follow-up claims one job takes by chaining before it lets the entity go through a wake."""


class Job:
    """Claims one wake and, when that succeeds, runs the handler and ends the claim."""

    def __init__(self, event: WakeEvent, received_ms: float, ctx: JobContext) -> None:
        self.event = event
        self.received_ms = received_ms
        self.ctx = ctx
        self.phase = Phase.CLAIMING
        self.wake: Wake | None = None
        self.task: asyncio.Task[None] | None = None
        self._handler_task: asyncio.Task[None] | None = None
        self._lost: ClaimLost | None = None
        self._interrupted: str | None = None
        self._deadline_ms = 0.0
        self._claimed_ms = 0.0
        self._chained_claims = 0
        self._hurry = asyncio.Event()  # ends a hold early: stop, claim lost, entity stopping
        self._next_wake = True  # what the last done or release answered

    @property
    def entity(self) -> str:
        """The entity URL this job is for."""
        return self.event.wake.entity

    def interrupt(self, reason: str) -> None:
        """Cancel a running handler (drain timeout); the job then sends done or release."""
        if self.phase is Phase.RUNNING and self._handler_task is not None:
            self._interrupted = reason
            self._handler_task.cancel(reason)

    def hurry(self) -> None:
        """End a failed claim's hold now (the runner stops): its done or release goes at once."""
        self._hurry.set()

    async def run(self) -> None:
        """The whole job; never raises except on cancellation. A done that answers the entity's
        follow-up claim (claim chaining) goes straight on with it, without a wake."""
        notification = await self._claim()
        while notification is not None:
            if not self.ctx.accepting():
                # Claimed after stop() began: hand it straight back, not after the lease.
                self.phase = Phase.FINISHING
                reason = "runner stopped before the wake was handled"
                await self._finish_release(notification, reason)
                return
            notification = await self._process(notification)

    # --- claim --------------------------------------------------------------------------------

    async def _claim(self) -> WakeNotification | None:
        wake = self.event.wake
        backoff = self.ctx.new_backoff(250, 2_000)
        for attempt in range(1, CLAIM_ATTEMPTS + 1):
            started = self.ctx.clock.now_ms()
            try:
                outcome = await self.ctx.transport.claim(wake.wake_id, self.event.entry_id)
            except ApiError as exc:
                if exc.transient and attempt < CLAIM_ATTEMPTS and self.ctx.accepting():
                    log.info("claim %s failed (%s); retrying", wake.wake_id, exc)
                    await self.ctx.clock.sleep_ms(backoff.next_delay_ms())
                    continue
                self._claim_error(exc)
                return None
            return self._claim_outcome(outcome, started)
        return None

    def _claim_outcome(
        self, outcome: WakeNotification | ClaimDone | None, started_ms: float
    ) -> WakeNotification | None:
        wake, counters = self.event.wake, self.ctx.counters
        if isinstance(outcome, WakeNotification):
            counters.claims_succeeded += 1
            self.ctx.last_claim("claimed")
            self._claimed_ms = self.ctx.clock.now_ms()
            self._deadline_ms = started_ms + outcome.lease_ms
            if log.isEnabledFor(logging.DEBUG):  # one INFO line per claim: the done's
                batch = outcome.messages
                span = f"{batch[0].offset}..{batch[-1].offset}" if batch else "none"
                log.debug(
                    "claim %s: claimed %s epoch %d, %d message(s) (offsets %s, tail %d) after "
                    "%.0f ms",
                    wake.wake_id,
                    wake.entity,
                    outcome.epoch,
                    len(batch),
                    span,
                    outcome.tail_offset,
                    self._claimed_ms - self.received_ms,
                )
            return outcome
        counters.claims_skipped += 1
        result = "no_work" if outcome is None else f"entity_{outcome.reason}"
        self.ctx.last_claim(result)
        log.info("claim %s: skipped (%s) for %s", wake.wake_id, result, wake.entity)
        return None

    def _claim_error(self, exc: ApiError) -> None:
        wake, counters = self.event.wake, self.ctx.counters
        if exc.code in (AlreadyClaimed.code, NotFound.code):
            counters.claims_skipped += 1
            self.ctx.last_claim(exc.code.lower())
            log.info("claim %s: skipped (%s) for %s", wake.wake_id, exc.code, wake.entity)
            return
        counters.claims_failed += 1
        self.ctx.last_claim("error")
        log.warning("claim %s failed for %s: %s", wake.wake_id, wake.entity, exc)
        self.ctx.report(exc, f"claim {wake.wake_id}")

    # --- handler ------------------------------------------------------------------------------

    async def _process(self, notification: WakeNotification) -> WakeNotification | None:
        # One span per claim (with OpenTelemetry): the handler, its heartbeats and the done or
        # release run in it, and the server calls carry its context.
        with claim_span(notification) as span:
            self.phase = Phase.RUNNING
            wake = self.wake = Wake(notification, self.ctx.transport)
            wake.runner_stopping = not self.ctx.accepting()
            handler_task = self._handler_task = asyncio.create_task(
                self._call_handler(wake), name=f"pullwake-handler-{notification.claim_id}"
            )
            beats = asyncio.create_task(self._claim_heartbeats(wake, handler_task))
            try:
                await asyncio.wait({handler_task})
                failures = self._failures_in_a_row(wake, handler_task)
                if span is not None and not handler_task.cancelled():
                    error = handler_task.exception()
                    if error is not None:
                        handler_failed(span, error)
                if failures:
                    await self._hold(wake, handler_task, failures)
            except asyncio.CancelledError:
                handler_task.cancel()
                raise
            finally:
                beats.cancel()
            self.phase = Phase.FINISHING
            return await self._conclude(wake, handler_task, failures)

    async def _call_handler(self, wake: Wake) -> None:
        await self.ctx.handler(wake)

    def _failures_in_a_row(self, wake: Wake, handler_task: asyncio.Task[None]) -> int:
        """Count the handler's outcome for the entity: the failures in a row (this one
        included) when it failed without progress, else 0 (and the entity starts over)."""
        if handler_task.cancelled():
            return 0  # the runner stops, or the claim was lost: not the handler's failure
        error = handler_task.exception()
        if isinstance(error, ClaimLost) or self._lost is not None:
            return 0
        failures = self.ctx.failures
        if error is None or wake.acked_offset > wake.notification.acked_offset:
            failures.forget(self.entity)
            return 0
        return failures.failed(self.entity)

    async def _hold(self, wake: Wake, handler_task: asyncio.Task[None], failures: int) -> None:
        """Keep the failed claim (still heartbeated) for the retry delay before it ends: the
        server wakes the entity again as soon as it ends, and no runner of the pool may retry
        it earlier. Stop, a lost claim or the entity stopping end the hold at once."""
        delay = self.ctx.failures.delay_ms(failures)
        if not self.ctx.accepting() or wake.stopping:
            delay = 0
        then = f"the claim ends in {delay / 1000:.1f} s" if delay else "the claim ends now"
        error = handler_task.exception()
        if isinstance(error, Release):
            log.info(
                "handler released %s: %s; failure %d in a row of %s, %s",
                wake.claim_id,
                error,
                failures,
                self.entity,
                then,
            )
        else:
            log.warning(
                "handler failed on %s (claim %s): %r; failure %d in a row, %s",
                self.entity,
                wake.claim_id,
                error,
                failures,
                then,
            )
        if not delay:
            return
        self.phase = Phase.HOLDING
        hurry = asyncio.create_task(self._hurry.wait())
        try:
            await wait_tasks([hurry], self.ctx.clock, delay)
        finally:
            hurry.cancel()

    async def _conclude(
        self, wake: Wake, handler_task: asyncio.Task[None], failures: int
    ) -> WakeNotification | None:
        """Done or release; the chained follow-up claim when the handler succeeded."""
        notification = wake.notification
        error = None if handler_task.cancelled() else handler_task.exception()
        if isinstance(error, ClaimLost) and self._lost is None:
            self._lost = error
        if self._lost is not None:
            self.ctx.counters.claims_lost += 1
            log.warning(
                "claim %s on %s lost (%s): no done", wake.claim_id, self.entity, self._lost.code
            )
            self.ctx.report(self._lost, f"claim {wake.claim_id}")
            return None
        progressed = wake.acked_offset > notification.acked_offset
        if handler_task.cancelled():
            reason = self._interrupted or "handler cancelled"
            if progressed:
                await self._finish_done(notification, wake.acked_offset)
            else:
                await self._finish_release(notification, reason)
            return None
        if isinstance(error, Release) and not progressed:
            if not failures:
                log.info("handler released %s: %s", wake.claim_id, error)
            if await self._finish_release(notification, str(error) or "released by the handler"):
                await self._check_parked(notification, notification.acked_offset)
            return None
        if error is not None:
            self.ctx.counters.handler_errors += 1
            if not failures:
                log.warning(
                    "handler failed on %s (claim %s): %r", self.entity, wake.claim_id, error
                )
            self.ctx.report(error, f"handler for {self.entity}")
            await self._finish_done(notification, wake.acked_offset)
            if failures:
                await self._check_parked(notification, wake.acked_offset)
            return None
        acked = max(wake.acked_offset, wake.delivered_offset)
        return await self._finish_done(notification, acked, chain=self._may_chain())

    async def _check_parked(self, notification: WakeNotification, acked: int) -> None:
        """After a claim ended without progress: the server re-wakes an entity with work
        left unless it parked it (``PULLWAKE_MAX_ATTEMPTS`` such claims in a row) or it is no
        longer runnable. Its answer said no wake: read which, and warn when it is parked."""
        if self._next_wake or acked >= notification.tail_offset:
            return
        entity = notification.entity
        try:
            state = await self.ctx.transport.entity(notification)
        except ApiError as exc:
            log.warning(
                "entity %s gets no wake although work is pending (parked, paused or stopped; "
                "reading it failed: %s)",
                entity.url,
                exc,
            )
            return
        reason = state.dispatch.parked_reason
        if reason is None:
            log.info("entity %s gets no wake: it is %s", entity.url, state.status)
            return
        self.ctx.failures.forget(entity.url)
        self.ctx.counters.entities_parked += 1
        log.warning(
            "entity %s parked by the server: %s; it gets no wakes until its creator sends "
            'resume (POST /v1/entities/%s/%s/signal {"signal": "resume"})',
            entity.url,
            reason,
            entity.type,
            entity.id,
        )

    def _may_chain(self) -> bool:
        """Ask for the follow-up claim only while nothing else waits for this slot, and not
        for ever: a busy entity must not starve the others (they get their turn via a wake)."""
        return (
            self.ctx.chaining.supported
            and self.ctx.accepting()
            and self._chained_claims < CHAIN_LIMIT
            and not self.ctx.others_waiting(self.entity)
        )

    async def _claim_heartbeats(self, wake: Wake, handler_task: asyncio.Task[None]) -> None:
        notification = wake.notification
        interval = self.ctx.claim_heartbeat_ms or min(10_000, max(notification.lease_ms // 3, 100))
        clock = self.ctx.clock
        healthy = True
        while True:
            wait = interval if healthy else min(interval, 1_000)
            await clock.sleep_ms(max(min(wait, self._deadline_ms - clock.now_ms()), 0))
            if clock.now_ms() >= self._deadline_ms:
                self._lose(handler_task, ClaimLost("LEASE_EXPIRED", "no heartbeat got through"))
                return
            sent = clock.now_ms()
            try:
                answer = await self.ctx.transport.claim_heartbeat(notification)
            except ApiError as exc:
                if exc.code in LOST_CODES:
                    self._lose(handler_task, ClaimLost(exc.code, exc.detail))
                    return
                healthy = False
                log.info("claim heartbeat for %s failed: %s", wake.claim_id, exc)
                continue
            healthy = True
            self._deadline_ms = sent + notification.lease_ms
            wake.entity_status = answer.entity_status
            if wake.stopping:
                self._hurry.set()

    def _lose(self, handler_task: asyncio.Task[None], lost: ClaimLost) -> None:
        self._lost = lost
        handler_task.cancel(str(lost))
        self._hurry.set()

    # --- done / release -----------------------------------------------------------------------

    async def _finish_done(
        self, notification: WakeNotification, acked: int, *, chain: bool = False
    ) -> WakeNotification | None:
        """Send done (retried while the lease may hold); with ``chain``, the follow-up claim
        the server answers when work is still pending."""
        answers: list[tuple[float, DoneResponse]] = []

        transport, chaining = self.ctx.transport, self.ctx.chaining

        async def call() -> None:
            sent_ms = self.ctx.clock.now_ms()
            ask = chain and chaining.supported
            try:
                answer = await transport.done(notification, acked, claim_next=ask)
            except ApiError as exc:
                if not (ask and refuses_claim_next(exc)):
                    raise
                answer = await transport.done(notification, acked)  # an old server
                chaining.refused(exc)
            answers.append((sent_ms, answer))

        if not await self._finish(notification, "done", call):
            return None
        self.ctx.counters.dones_sent += 1
        now = self.ctx.clock.now_ms()
        log.info(
            "done %s: %s epoch %d acked %d (claimed %d..%d); wake→claim %.0f ms, "
            "claim→done %.0f ms",
            notification.claim_id,
            notification.entity.url,
            notification.epoch,
            acked,
            notification.acked_offset,
            notification.tail_offset,
            self._claimed_ms - self.received_ms,
            now - self._claimed_ms,
        )
        sent_ms, answer = answers[-1]
        self._next_wake = answer.next_wake
        if answer.next_claim is not None:
            self._chained(answer.next_claim, sent_ms, now)
        return answer.next_claim

    def _chained(self, notification: WakeNotification, sent_ms: float, now_ms: float) -> None:
        """Take the follow-up claim a done answered (its lease began before the answer)."""
        self._chained_claims += 1
        self.ctx.counters.claims_succeeded += 1
        self.ctx.last_claim("chained")
        self.received_ms = self._claimed_ms = now_ms
        self._deadline_ms = sent_ms + notification.lease_ms
        self._lost = None
        log.debug(
            "claim %s: chained %s epoch %d, %d message(s) (tail %d)",
            notification.claim_id,
            notification.entity.url,
            notification.epoch,
            len(notification.messages),
            notification.tail_offset,
        )

    async def _finish_release(self, notification: WakeNotification, error: str) -> bool:
        """Send release (retried while the lease may hold); True once the server took it."""

        async def call() -> None:
            answer = await self.ctx.transport.release(notification, error)
            self._next_wake = answer.next_wake

        if not await self._finish(notification, "release", call):
            return False
        self.ctx.counters.releases_sent += 1
        log.info("released %s on %s: %s", notification.claim_id, notification.entity.url, error)
        return True

    async def _finish(
        self, notification: WakeNotification, what: str, call: Callable[[], Awaitable[Any]]
    ) -> bool:
        """Retry ``call`` with backoff while the lease may still hold; True once it succeeded."""
        backoff = self.ctx.new_backoff(500, 10_000)
        clock = self.ctx.clock
        self._next_wake = True  # until this call's answer says otherwise
        while True:
            try:
                await call()
                return True
            except ApiError as exc:
                if not exc.transient:
                    log.warning("%s for %s refused: %s", what, notification.claim_id, exc)
                    self.ctx.report(exc, f"{what} {notification.claim_id}")
                    return False
                delay = backoff.next_delay_ms()
                if clock.now_ms() + delay >= self._deadline_ms:
                    log.warning(
                        "%s for %s failed (%s); lease is running out, the server will hand the "
                        "work on",
                        what,
                        notification.claim_id,
                        exc,
                    )
                    self.ctx.report(exc, f"{what} {notification.claim_id}")
                    return False
                self.ctx.counters.done_retries += 1
                log.info(
                    "%s for %s failed (%s); retry in %d ms", what, notification.claim_id, exc, delay
                )
                await clock.sleep_ms(delay)


async def drain(
    jobs: Iterable[Job],
    clock: Clock,
    *,
    claim_grace_ms: int,
    drain_timeout_ms: int,
    finish_timeout_ms: int,
) -> None:
    """The stop sequence for in-flight jobs.

    Claims still in flight get ``claim_grace_ms`` (a claim granted after that is released),
    handlers get ``drain_timeout_ms`` to finish, then are cancelled and their claims released
    (or done, when they acked progress) within ``finish_timeout_ms``; whatever is left is dropped.
    """
    tasks = {job: job.task for job in jobs if job.task is not None}
    for job in tasks:
        if job.wake is not None:
            job.wake.runner_stopping = True
        job.hurry()
    claiming = [task for job, task in tasks.items() if job.phase is Phase.CLAIMING]
    for task in await wait_tasks(claiming, clock, claim_grace_ms):
        task.cancel()
    left = await wait_tasks(tasks.values(), clock, drain_timeout_ms)
    for job, task in tasks.items():
        if task in left:
            job.interrupt("runner stopped before the handler finished")
    for task in await wait_tasks(left, clock, finish_timeout_ms):
        log.warning("abandoning %s at shutdown", task.get_name())
        task.cancel()
    await asyncio.gather(*tasks.values(), return_exceptions=True)
