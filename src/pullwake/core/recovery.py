"""Recovery use cases run by the arq worker: lease expiry, re-delivery, stranded entries,
Redis-loss repair and stream hygiene. Each is safe to run in several workers at once."""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from redis.exceptions import RedisError, ResponseError

from pullwake.config import Settings
from pullwake.core.ports import RecoveryStore
from pullwake.core.steps import NewWake, lease_interval, record, step_limits
from pullwake.publish import Publisher
from pullwake.store.recovery import StaleWake
from pullwake.streams import WakeStreams

__all__ = ["Recovery", "RecoveryReport"]

log = logging.getLogger(__name__)
RECOVERY_CONSUMER = "pullwake-recovery"
_QUEUED_RETRY_MS = 1_000


@dataclass(slots=True)
class RecoveryReport:
    """What one recovery pass did (logged, and counted by metrics)."""

    expired_claims: int = 0
    rewakes: int = 0
    redelivered: int = 0
    stranded_reclaimed: int = 0
    stranded_republished: int = 0
    streams_repaired: int = 0
    consumers_deleted: int = 0
    entries_trimmed: int = 0
    errors: list[str] = field(default_factory=list)

    def any(self) -> bool:
        """True when the pass changed something."""
        return any(getattr(self, name) for name in self.__slots__ if name != "errors")


class Recovery:
    """Postgres-driven repair of everything Redis or a crashed process may have dropped."""

    def __init__(
        self, store: RecoveryStore, streams: WakeStreams, publisher: Publisher, settings: Settings
    ) -> None:
        self.store = store
        self.streams = streams
        self.publisher = publisher
        self.settings = settings
        self.limits = step_limits(settings)

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
        """Publish again every live wake that was never published or not claimed in time."""
        report = report or RecoveryReport()
        while True:
            stale = await self.store.lock_stale_wakes(
                lease_interval(_QUEUED_RETRY_MS),
                lease_interval(self.settings.redeliver_after_ms),
                self.settings.recovery_batch,
            )
            wakes = [w.to_wake("redelivery") for w in await self._not_waiting_unread(stale)]
            await self._publish(wakes)
            report.redelivered += len(wakes)
            if len(stale) < self.settings.recovery_batch:
                return report

    async def _not_waiting_unread(self, stale: list[StaleWake]) -> list[StaleWake]:
        """Drop runner wakes whose entry no session has read yet (past the group's
        last-delivered id): nobody is reading that stream, and publishing again every
        ``redeliver_after_ms`` would only pile up duplicates that an offline runner then reads
        (and claims) by the thousand when it comes back. A lost entry is re-published by
        :meth:`repair_streams`."""
        last_read: dict[str, tuple[int, int] | None] = {}
        keep = []
        for wake in stale:
            runner_id, entry_id = wake.runner_id, wake.stream_entry_id
            if wake.delivery_status != "delivered" or runner_id is None or entry_id is None:
                keep.append(wake)
                continue
            if runner_id not in last_read:
                try:
                    last_id = await self.streams.last_delivered_id(runner_id)
                except (RedisError, OSError):
                    last_id = None
                last_read[runner_id] = None if last_id is None else _entry_order(last_id)
            read_up_to = last_read[runner_id]
            if read_up_to is None or _entry_order(entry_id) <= read_up_to:
                keep.append(wake)
        return keep

    # --- Redis: stranded entries, lost streams, hygiene ---------------------------------------

    async def repair_streams(self, report: RecoveryReport | None = None) -> RecoveryReport:
        """For runners with outstanding wakes: recreate a lost stream/group and re-publish,
        then XAUTOCLAIM entries stranded in the PEL of consumers that went away."""
        report = report or RecoveryReport()
        for runner_id in await self.store.runners_with_outstanding_wakes():
            try:
                if not await self.streams.group_exists(runner_id):
                    await self._rebuild(runner_id, report)
                else:
                    await self._republish_lost(runner_id, report)
                    await self._reclaim_stranded(runner_id, report)
            except (ResponseError, OSError) as exc:
                report.errors.append(f"{runner_id}: {exc}")
                log.warning("stream repair of runner %s failed: %s", runner_id, exc)
        return report

    async def _rebuild(self, runner_id: str, report: RecoveryReport) -> None:
        log.warning(
            "runner %s: wake stream or group missing in Redis; rebuilding from Postgres", runner_id
        )
        await self.streams.ensure_group(runner_id)
        outstanding = await self.store.outstanding_wakes(runner_id)
        await self._publish(w.to_wake("redis_rebuild") for w in outstanding)
        report.streams_repaired += 1
        report.redelivered += len(outstanding)

    async def _republish_lost(self, runner_id: str, report: RecoveryReport) -> None:
        """Re-publish outstanding wakes whose stream entry is gone although the group exists.

        After FLUSHALL or a restart without persistence, a connected runner's SSE read gets
        NOGROUP and recreates the (empty) group within ``sse_block_ms``, long before this pass:
        without this check the lost wakes waited for ``redeliver_after_ms``. Also covers a
        failover that lost the stream's tail and MAXLEN trimming.
        """
        published = [
            (w, w.stream_entry_id)
            for w in await self.store.outstanding_wakes(runner_id)
            if w.stream_entry_id is not None
        ]
        lost = []
        for start in range(0, len(published), self.settings.recovery_batch):  # every page, not one
            page = published[start : start + self.settings.recovery_batch]
            present = await self.streams.entries_exist(runner_id, [entry for _, entry in page])
            lost += [w for (w, _), exists in zip(page, present, strict=True) if not exists]
        if not lost:
            return
        log.warning(
            "runner %s: %d outstanding wakes missing from the wake stream; re-publishing",
            runner_id,
            len(lost),
        )
        await self._publish(w.to_wake("redis_rebuild") for w in lost)
        report.streams_repaired += 1
        report.redelivered += len(lost)

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
            await self.streams.ack(runner_id, [entry_id])
        # Newer Redis/Valkey create the claiming consumer even when nothing was claimed: do
        # not leave one recovery consumer behind per stream (it holds nothing after the acks).
        await self.streams.drop_consumer_if_empty(runner_id, RECOVERY_CONSUMER)

    async def hygiene(self, report: RecoveryReport | None = None) -> RecoveryReport:
        """Delete idle consumers with nothing pending; trim acked entries past retention."""
        report = report or RecoveryReport()
        now_ms = int(time.time() * 1000)
        for runner_id in await self.store.runner_ids():
            try:
                # repair_streams only visits runners with outstanding wakes; an entry a dead
                # session left pending for a wake handled elsewhere would otherwise pin the PEL
                # (and with it trimming and consumer deletion) forever.
                if await self.streams.group_exists(runner_id):
                    await self._reclaim_stranded(runner_id, report)
                report.consumers_deleted += await self.streams.delete_idle_consumers(
                    runner_id, self.settings.consumer_idle_ms
                )
                report.entries_trimmed += await self.streams.trim_acked(
                    runner_id, now_ms - self.settings.stream_retention_ms
                )
            except (ResponseError, OSError) as exc:
                report.errors.append(f"{runner_id}: {exc}")
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
