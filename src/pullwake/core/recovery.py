"""Recovery use cases run by the arq worker: lease expiry, re-delivery, stranded entries,
Redis-loss repair and stream hygiene. Each is safe to run in several workers at once.

A pass costs what changed, not the fleet: lease expiry and re-delivery read indexed queues of
due rows (a wake found unread, because its runner is offline, is parked and left out until a
reader shows up); stream repair checks the runners queued for it (a session connected, a reader
found its group gone), every runner once after Redis lost or may have lost data (its ``run_id``
changed, or the marker key is gone), and otherwise one slice of the fleet per pass so that each
runner is still checked within ``PULLWAKE_SWEEP_INTERVAL_MS``; hygiene goes through the
registered runners the same way within ``PULLWAKE_HYGIENE_INTERVAL_MS``. Redis is asked about a
slice in one pipelined round trip.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from redis.exceptions import RedisError, ResponseError

from pullwake.config import Settings
from pullwake.core.ports import RecoveryStore
from pullwake.core.steps import NewWake, lease_interval, record, step_limits
from pullwake.metrics import WAKES_PARKED, WAKES_REDELIVERED
from pullwake.publish import Publisher
from pullwake.store.recovery import OutstandingWake, StaleWake
from pullwake.streams import WakeStreams
from pullwake.streams.probe import StreamProbe, StreamState

__all__ = ["Recovery", "RecoveryReport"]

log = logging.getLogger(__name__)
RECOVERY_CONSUMER = "pullwake-recovery"
_CHECKING = " checking"  # the marker's value while a full check runs: "<run_id> checking"
_QUEUED_RETRY_MS = 1_000
SWEEP_MIN_RUNNERS = 50
"""A sweep slice checks at least this many runners: a small fleet is checked whole every few
passes."""
REBUILD_RUNNERS = 500
"""Runners per slice of the full check after Redis lost (or may have lost) data."""
PASS_BUDGET_S = 0.25
"""A pass that finds a lot to do stops taking more after about this long; the next pass goes
on (the full check after a Redis loss, a backlog of stale wakes)."""


@dataclass(slots=True)
class RecoveryReport:
    """What one recovery pass did (logged, and counted by metrics)."""

    expired_claims: int = 0
    rewakes: int = 0
    redelivered: int = 0
    wakes_parked: int = 0
    stranded_reclaimed: int = 0
    stranded_republished: int = 0
    streams_repaired: int = 0
    consumers_deleted: int = 0
    entries_trimmed: int = 0
    errors: list[str] = field(default_factory=list)

    def any(self) -> bool:
        """True when the pass changed something."""
        return any(getattr(self, name) for name in self.__slots__ if name != "errors")


@dataclass(slots=True)
class _Cursor:
    """Where a sweep over runner ids stands: a slice per pass, sized so that a round over the
    fleet takes about ``period_ms``."""

    period_ms: int
    after: str | None = None
    """The last runner id checked; None: the next slice starts a new round."""
    per_pass: int = SWEEP_MIN_RUNNERS

    def begin(self, fleet: int, interval_ms: int) -> str:
        """Start a round over ``fleet`` runners, a slice every ``interval_ms``."""
        passes = max(1, self.period_ms // interval_ms)
        self.per_pass = max(SWEEP_MIN_RUNNERS, math.ceil(fleet / passes))
        self.after = ""
        return self.after

    def advance(self, runner_ids: list[str]) -> bool:
        """Move past a slice; True when the round is over."""
        if len(runner_ids) < self.per_pass:
            self.after = None
            return True
        self.after = runner_ids[-1]
        return False


@dataclass(slots=True)
class _FullCheck:
    """Every runner's stream checked once under one Redis ``run_id``."""

    run_id: str
    cursor: _Cursor
    runners: int = 0
    lost_streams: int = 0
    lost_wakes: int = 0


class Recovery:
    """Postgres-driven repair of everything Redis or a crashed process may have dropped."""

    def __init__(
        self,
        store: RecoveryStore,
        streams: WakeStreams,
        publisher: Publisher,
        settings: Settings,
        probe: StreamProbe | None = None,
    ) -> None:
        self.store = store
        self.streams = streams
        self.publisher = publisher
        self.settings = settings
        self.limits = step_limits(settings)
        self.probe = probe or StreamProbe(streams)
        self._sweep = _Cursor(settings.sweep_interval_ms)
        self._hygiene = _Cursor(settings.hygiene_interval_ms)
        self._full: _FullCheck | None = None
        self._run_id: str | None = None

    async def _publish(self, wakes: Iterable[NewWake | None]) -> None:
        """Publish and record the deliveries before the pass reports (nobody waits on a worker's
        pass, and its report then matches Postgres)."""
        await self.publisher.publish(wakes)
        await self.publisher.flush()

    # --- claim lease expiry ------------------------------------------------------------------

    async def expire_claims(self, report: RecoveryReport | None = None) -> RecoveryReport:
        """Expire active claims whose lease passed; re-wake at once when work is pending."""
        report = report or RecoveryReport()
        while True:
            steps = await self.store.expire_leases(self.settings.recovery_batch, self.limits)
            for step in steps:
                record(step)
            wakes = [step.wake for step in steps]
            report.expired_claims += len(steps)
            report.rewakes += sum(1 for w in wakes if w is not None)
            await self._publish(wakes)
            if len(steps) < self.settings.recovery_batch:
                return report

    # --- re-delivery of unclaimed wakes -------------------------------------------------------

    async def redeliver(self, report: RecoveryReport | None = None) -> RecoveryReport:
        """Publish again every live wake that was never published or not claimed in time;
        park the runner wakes whose entry nobody has read yet."""
        report = report or RecoveryReport()
        deadline = time.monotonic() + PASS_BUDGET_S
        while True:
            stale = await self.store.lock_stale_wakes(
                lease_interval(_QUEUED_RETRY_MS),
                lease_interval(self.settings.redeliver_after_ms),
                self.settings.recovery_batch,
            )
            due, unread = await self._split_unread(stale)
            await self._publish(w.to_wake("redelivery") for w in due)
            report.redelivered += len(due)
            WAKES_REDELIVERED.labels("unclaimed").inc(len(due))
            if unread:
                await self.store.park_unread([(w.id, w.stream_entry_id or "") for w in unread])
                report.wakes_parked += len(unread)
                WAKES_PARKED.inc(len(unread))
            if len(stale) < self.settings.recovery_batch or time.monotonic() > deadline:
                return report

    async def _split_unread(
        self, stale: list[StaleWake]
    ) -> tuple[list[StaleWake], list[StaleWake]]:
        """Split off the runner wakes whose entry no session has read yet (past the group's
        last-delivered id, or in a stream without a group): nobody is reading that stream, and
        publishing again every ``redeliver_after_ms`` would only pile up duplicates that an
        offline runner then reads (and claims) by the thousand when it comes back. They are
        parked instead; a lost entry is published again."""
        asked: dict[str, list[str]] = {}
        for wake in stale:
            if wake.delivery_status == "delivered" and wake.runner_id and wake.stream_entry_id:
                asked.setdefault(wake.runner_id, []).append(wake.stream_entry_id)
        states: dict[str, StreamState] = {}
        if asked:
            try:
                states = await self.probe.states(asked)
            except (RedisError, OSError):
                states = {}  # publish them: a failure is recorded, the wake stays due
        due, unread = [], []
        for wake in stale:
            state = states.get(wake.runner_id or "")
            entry_id = wake.stream_entry_id
            if state is None or state.error is not None or entry_id is None:
                due.append(wake)
            elif not state.present.get(entry_id, False):
                due.append(wake)  # the entry is gone: publish it again
            elif state.group is None or _entry_order(entry_id) > _entry_order(
                state.group.last_delivered_id
            ):
                unread.append(wake)
            else:
                due.append(wake)  # read, and still not claimed
        return due, unread

    # --- Redis: lost streams, stranded entries, hygiene ---------------------------------------

    async def repair_streams(self, report: RecoveryReport | None = None) -> RecoveryReport:
        """Check the runners queued for it, then every runner after Redis lost (or may have
        lost) data, else one slice of the runners with outstanding wakes: recreate a lost
        group, re-publish outstanding wakes whose entry is gone, XAUTOCLAIM entries stranded
        in the PEL of consumers that went away, unpark wakes whose entry was read."""
        report = report or RecoveryReport()
        deadline = time.monotonic() + PASS_BUDGET_S
        await self._watch_redis()
        while marked := await self.probe.pop_marked(self.settings.recovery_batch):
            # A session connected: its parked wakes are looked at again by re-delivery.
            await self._check(
                await self.store.runners_outstanding_wakes(marked), report, unpark_all=True
            )
            if time.monotonic() > deadline:
                break
        if self._full is not None:
            await self._full_check(report, deadline)
            return report
        cursor = self._sweep
        after = cursor.after
        if after is None:
            fleet = await self.store.count_runners_with_outstanding_wakes()
            after = cursor.begin(fleet, self.settings.recovery_interval_ms)
        wakes = await self.store.sweep_outstanding_wakes(after, cursor.per_pass)
        await self._check(wakes, report)
        cursor.advance(list(wakes))
        return report

    async def _watch_redis(self) -> None:
        """Start a full check when Redis's ``run_id`` is not the one the marker recorded: a
        restart or failover (which may have lost the last writes), or a keyspace emptied
        (FLUSHALL, a restart without persistence: the marker is gone too). While a check runs
        the marker says so, and its loss starts the check again."""
        run_id, marker = await self.probe.epoch()
        seen, self._run_id = self._run_id, run_id
        checking = f"{run_id}{_CHECKING}"
        full = self._full
        if marker == run_id or (full is not None and full.run_id == run_id and marker == checking):
            return
        if marker is None and seen is not None:
            log.warning(
                "Redis lost its data (the recovery marker is gone: FLUSHALL, or a restart without "
                "persistence); rebuilding from Postgres every runner's wake stream"
            )
        elif marker is None:
            log.info("no recovery marker in Redis: checking every runner's wake stream once")
        elif marker.endswith(_CHECKING):
            log.info(
                "a check of every runner's wake stream is under way elsewhere or was not "
                "finished: checking every stream once"
            )
        else:
            log.info(
                "Redis restarted or failed over (run_id changed): checking every runner's "
                "wake stream against Postgres once"
            )
        self._full = _FullCheck(run_id, _Cursor(0))
        await self.probe.set_epoch(checking)

    async def _full_check(self, report: RecoveryReport, deadline: float) -> None:
        full = self._full
        assert full is not None
        cursor = full.cursor
        while True:
            after = cursor.after
            if after is None:
                cursor.per_pass, after = REBUILD_RUNNERS, ""
            wakes = await self.store.sweep_outstanding_wakes(after, cursor.per_pass)
            await self._check(wakes, report)
            full.runners += len(wakes)
            if cursor.advance(list(wakes)):
                break
            if time.monotonic() > deadline:
                return
        self._full = None
        await self.probe.set_epoch(full.run_id)
        if full.lost_wakes:
            log.warning(
                "rebuilt from Postgres: %d of %d runners' wake streams had lost entries; "
                "%d outstanding wakes re-published",
                full.lost_streams,
                full.runners,
                full.lost_wakes,
            )
        else:
            log.info("checked %d runners' wake streams: nothing was lost", full.runners)

    async def _check(
        self,
        wakes: dict[str, list[OutstandingWake]],
        report: RecoveryReport,
        *,
        unpark_all: bool = False,
    ) -> None:
        """Check these runners' streams against their outstanding wakes (one round trip to
        learn their state) and repair what is missing."""
        if not wakes:
            return
        asked = {r: [w.stream_entry_id for w in ws if w.stream_entry_id] for r, ws in wakes.items()}
        states = await self.probe.states(asked)
        # A missing group is created before the rest (all in one round trip). Also the normal
        # state of a runner that never connected (a stream without a group): quietly, from id
        # 0, so that nothing in the stream is skipped.
        groupless = [r for r, st in states.items() if st.group is None and st.error is None]
        failed: dict[str, Exception | None] = {}
        if groupless:
            failed = dict(zip(groupless, await self.probe.create_groups(groupless), strict=True))
            report.streams_repaired += len(groupless)
        unpark: list[str] = []
        for runner_id, outstanding in wakes.items():
            if failed.get(runner_id) is not None:
                report.errors.append(f"{runner_id}: {failed[runner_id]}")
                log.warning("stream repair of runner %s failed: %s", runner_id, failed[runner_id])
                continue
            try:
                unpark += await self._check_runner(
                    runner_id, outstanding, states[runner_id], report, unpark_all
                )
            except (ResponseError, OSError) as exc:
                report.errors.append(f"{runner_id}: {exc}")
                log.warning("stream repair of runner %s failed: %s", runner_id, exc)
        if unpark:
            await self.store.unpark(unpark)

    async def _check_runner(
        self,
        runner_id: str,
        outstanding: list[OutstandingWake],
        state: StreamState,
        report: RecoveryReport,
        unpark_all: bool,
    ) -> list[str]:
        """Repair one runner's stream; the parked wakes to look at again."""
        if state.error is not None:
            raise state.error
        lost = [
            w
            for w in outstanding
            if w.stream_entry_id is not None and not state.present.get(w.stream_entry_id, False)
        ]
        group = state.group
        if group is None and not lost:
            log.debug("runner %s: created the group of its wake stream", runner_id)
        elif group is not None and group.pending:
            await self._reclaim_stranded(runner_id, report)
        if lost:
            self._log_loss(runner_id, state, len(lost))
            await self._publish(w.to_wake("redis_rebuild") for w in lost)
            if group is not None:
                report.streams_repaired += 1
            report.redelivered += len(lost)
            WAKES_REDELIVERED.labels("redis_lost").inc(len(lost))
        gone = {w.id for w in lost}
        read_up_to = _entry_order(group.last_delivered_id) if group is not None else (0, 0)
        return [
            w.id
            for w in outstanding
            if w.parked
            and w.id not in gone
            and (unpark_all or _entry_order(w.stream_entry_id or "0-0") <= read_up_to)
        ]

    def _log_loss(self, runner_id: str, state: StreamState, count: int) -> None:
        full = self._full
        if full is not None:  # one line when the full check is done, not one per runner
            full.lost_streams += 1
            full.lost_wakes += count
            log.debug("runner %s: %d outstanding wakes lost from Redis", runner_id, count)
        elif not state.exists:
            log.warning(
                "runner %s: wake stream missing in Redis; rebuilding from Postgres "
                "(%d outstanding wakes re-published)",
                runner_id,
                count,
            )
        else:
            log.warning(
                "runner %s: %d outstanding wakes missing from the wake stream; re-publishing",
                runner_id,
                count,
            )

    async def _reclaim_stranded(self, runner_id: str, report: RecoveryReport) -> None:
        idle_ms = self.settings.stranded_after_ms
        async for entry_id, wake_id in self.streams.autoclaim(
            runner_id, RECOVERY_CONSUMER, idle_ms
        ):
            report.stranded_reclaimed += 1
            if wake_id is not None and await self.store.wake_is_wanted(wake_id):
                wake = await self.store.get_wake(wake_id)
                if wake is not None and wake.runner_id == runner_id:
                    await self._publish([wake.to_wake("stranded")])
                    report.stranded_republished += 1
                    WAKES_REDELIVERED.labels("stranded").inc()
            await self.streams.ack(runner_id, [entry_id])
        # Newer Redis/Valkey create the claiming consumer even when nothing was claimed: do
        # not leave one recovery consumer behind per stream (it holds nothing after the acks).
        await self.streams.drop_consumer_if_empty(runner_id, RECOVERY_CONSUMER)

    async def hygiene(self, report: RecoveryReport | None = None) -> RecoveryReport:
        """For one slice of the registered runners: reclaim stranded entries, delete idle
        consumers with nothing pending, trim acked entries past retention."""
        report = report or RecoveryReport()
        cursor = self._hygiene
        after = cursor.after
        if after is None:
            fleet = await self.store.count_runners()
            after = cursor.begin(fleet, self.settings.recovery_interval_ms)
        runner_ids = await self.store.runner_ids_after(after, cursor.per_pass)
        states = await self.probe.states(dict.fromkeys(runner_ids, ()), first_entry=True)
        keep_after_ms = int(time.time() * 1000) - self.settings.stream_retention_ms
        for runner_id in runner_ids:
            state = states[runner_id]
            group = state.group
            try:
                if state.error is not None:
                    raise state.error
                if group is None:
                    continue  # no stream, or nobody ever read it: nothing to clean up
                # Stream repair only visits runners with outstanding wakes; an entry a dead
                # session left pending for a wake handled elsewhere would otherwise pin the PEL
                # (and with it trimming and consumer deletion) forever.
                if group.pending:
                    await self._reclaim_stranded(runner_id, report)
                if group.consumers:
                    report.consumers_deleted += await self.streams.delete_idle_consumers(
                        runner_id, self.settings.consumer_idle_ms
                    )
                first = state.first_entry_id
                if first is not None and _entry_order(first)[0] < min(
                    keep_after_ms, _entry_order(group.last_delivered_id)[0]
                ):
                    report.entries_trimmed += await self.streams.trim_acked(
                        runner_id, keep_after_ms
                    )
            except (ResponseError, OSError) as exc:
                report.errors.append(f"{runner_id}: {exc}")
        cursor.advance(runner_ids)
        return report

    async def run_all(self) -> RecoveryReport:
        """One full pass (tests and ``pullwake worker --once``)."""
        report = RecoveryReport()
        await self.expire_claims(report)
        await self.repair_streams(report)
        await self.redeliver(report)
        await self.hygiene(report)
        return report


def _entry_order(entry_id: str) -> tuple[int, int]:
    ms, _, seq = entry_id.partition("-")
    return int(ms), int(seq or 0)


def summary(report: RecoveryReport) -> dict[str, Any]:
    """Non-zero counters of a report, for logs."""
    return {k: getattr(report, k) for k in report.__slots__ if getattr(report, k)}
