"""After-commit delivery of new wakes: XADD for runner targets, an enqueue hook for webhooks."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Iterable
from typing import Protocol

from redis.exceptions import RedisError

from pullwake.core.steps import NewWake
from pullwake.metrics import WAKES_PUBLISHED
from pullwake.store import Store
from pullwake.streams import WakeStreams
from pullwake.wire import WakeEntry

__all__ = ["DeliveryLog", "Publisher", "WebhookEnqueuer"]

log = logging.getLogger(__name__)


class WebhookEnqueuer(Protocol):
    """Seam for webhook delivery (an arq job per wake)."""

    async def enqueue_webhook(self, wake_id: str) -> None: ...


def wake_entry(wake: NewWake) -> WakeEntry:
    """The compact stream/SSE form of a wake."""
    created = wake.created_at.isoformat().replace("+00:00", "Z")
    return WakeEntry(wake.id, wake.entity_url, wake.epoch, wake.reason, created)


class DeliveryLog:
    """Records which wakes reached their stream (``delivered``, with the entry id), in batches
    and off the request path: one UPDATE for every wake published while the previous one ran.

    Losing a batch (a crash, Postgres down) loses nothing: the wakes stay ``queued`` and
    recovery publishes them again, a duplicate entry that a claim answers harmlessly. A claim
    records its wake as delivered itself, whichever comes first."""

    def __init__(self, store: Store) -> None:
        self.store = store
        self._pending: dict[str, str] = {}
        self._wakeup = asyncio.Event()
        self._writing = asyncio.Lock()
        self._task: asyncio.Task[None] | None = None

    def add(self, wake_id: str, entry_id: str) -> None:
        """Note a published wake; written soon."""
        self._pending[wake_id] = entry_id
        if self._task is None or self._task.done():
            self._task = asyncio.get_running_loop().create_task(self._run(), name="delivery-log")
        self._wakeup.set()

    async def _run(self) -> None:
        while True:
            await self._wakeup.wait()
            self._wakeup.clear()
            await self.flush()

    async def flush(self) -> None:
        """Write what is pending now (and wait for a write in flight)."""
        async with self._writing:
            batch, self._pending = self._pending, {}
            if not batch:
                return
            try:
                await self.store.mark_delivered(list(batch), list(batch.values()))
            except Exception as exc:  # bookkeeping only: recovery re-publishes queued wakes
                log.warning("could not record the delivery of %d wakes: %s", len(batch), exc)

    async def close(self) -> None:
        """Stop the writer after a last flush."""
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        await self.flush()


class Publisher:
    """Publishes committed wakes. A failure loses nothing: the wake row stays ``queued``."""

    def __init__(
        self, store: Store, streams: WakeStreams, webhooks: WebhookEnqueuer | None = None
    ) -> None:
        self.store = store
        self.streams = streams
        self.webhooks = webhooks
        self.deliveries = DeliveryLog(store)

    async def publish(self, wakes: Iterable[NewWake | None]) -> None:
        """Deliver each wake (runner wakes in one Redis pipeline); log and record failures
        instead of raising."""
        runner_wakes: list[NewWake] = []
        for wake in wakes:
            if wake is None:
                continue
            if wake.target_type == "runner" and wake.runner_id is not None:
                runner_wakes.append(wake)
            elif wake.target_type == "webhook" and self.webhooks is not None:
                try:
                    await self.webhooks.enqueue_webhook(wake.id)
                except (RedisError, OSError) as exc:
                    WAKES_PUBLISHED.labels("webhook", "failed").inc()
                    log.warning(
                        "enqueue of webhook wake %s failed: %s",
                        wake.id,
                        exc,
                        extra={"entity": wake.entity_url, "wake": wake.id, "epoch": wake.epoch},
                    )
                else:
                    WAKES_PUBLISHED.labels("webhook", "ok").inc()
        if runner_wakes:
            await self._publish_runners(runner_wakes)

    async def _publish_runners(self, wakes: list[NewWake]) -> None:
        try:
            results = await self.streams.publish_many(
                [(w.runner_id, wake_entry(w)) for w in wakes if w.runner_id is not None]
            )
        except (RedisError, OSError) as exc:
            results = [exc] * len(wakes)
        for wake, result in zip(wakes, results, strict=True):
            if isinstance(result, Exception):
                WAKES_PUBLISHED.labels("runner", "failed").inc()
                log.warning(
                    "XADD of wake %s for runner %s failed: %s",
                    wake.id,
                    wake.runner_id,
                    result,
                    extra={
                        "entity": wake.entity_url,
                        "wake": wake.id,
                        "epoch": wake.epoch,
                        "runner": wake.runner_id,
                    },
                )
                await self._record_failure(wake.id, f"publish failed: {type(result).__name__}")
            else:
                WAKES_PUBLISHED.labels("runner", "ok").inc()
                if log.isEnabledFor(logging.DEBUG):
                    log.debug(
                        "published wake %s of %s (epoch %d, %s) to runner %s",
                        wake.id,
                        wake.entity_url,
                        wake.epoch,
                        wake.reason,
                        wake.runner_id,
                        extra={
                            "entity": wake.entity_url,
                            "wake": wake.id,
                            "epoch": wake.epoch,
                            "runner": wake.runner_id,
                        },
                    )
                self.deliveries.add(wake.id, result)

    async def flush(self) -> None:
        """Record the deliveries still pending (recovery passes and tests wait for them)."""
        await self.deliveries.flush()

    async def close(self) -> None:
        await self.deliveries.close()

    async def _record_failure(self, wake_id: str, error: str) -> None:
        try:
            await self.store.mark_publish_failed(wake_id, error)
        except Exception:
            log.exception("could not record publish failure of wake %s", wake_id)
