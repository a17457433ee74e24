"""After-commit delivery of new wakes: XADD for runner targets, an enqueue hook for webhooks."""

from __future__ import annotations

import logging
from collections.abc import Iterable
from typing import Protocol

from redis.exceptions import RedisError

from pullwake.state import NewWake
from pullwake.store import Store
from pullwake.streams import WakeStreams
from pullwake.wire import WakeEntry

__all__ = ["Publisher", "WebhookEnqueuer"]

log = logging.getLogger(__name__)


class WebhookEnqueuer(Protocol):
    """Seam for webhook delivery (an arq job per wake)."""

    async def enqueue_webhook(self, wake_id: str) -> None: ...


def wake_entry(wake: NewWake) -> WakeEntry:
    """The compact stream/SSE form of a wake."""
    created = wake.created_at.isoformat().replace("+00:00", "Z")
    return WakeEntry(wake.id, wake.entity_url, wake.epoch, wake.reason, created)


class Publisher:
    """Publishes committed wakes. A failure loses nothing: the wake row stays ``queued``."""

    def __init__(
        self, store: Store, streams: WakeStreams, webhooks: WebhookEnqueuer | None = None
    ) -> None:
        self.store = store
        self.streams = streams
        self.webhooks = webhooks

    async def publish(self, wakes: Iterable[NewWake | None]) -> None:
        """Deliver each wake; log and record failures instead of raising."""
        for wake in wakes:
            if wake is None:
                continue
            if wake.target_type == "runner" and wake.runner_id is not None:
                await self._publish_runner(wake)
            elif wake.target_type == "webhook" and self.webhooks is not None:
                try:
                    await self.webhooks.enqueue_webhook(wake.id)
                except (RedisError, OSError) as exc:
                    log.warning("enqueue of webhook wake %s failed: %s", wake.id, exc)

    async def _publish_runner(self, wake: NewWake) -> None:
        assert wake.runner_id is not None
        try:
            entry_id = await self.streams.publish(wake.runner_id, wake_entry(wake))
        except (RedisError, OSError) as exc:
            log.warning("XADD of wake %s for runner %s failed: %s", wake.id, wake.runner_id, exc)
            await self._record_failure(wake.id, f"publish failed: {type(exc).__name__}")
            return
        try:
            await self.store.execute("wake_mark_delivered", wake.id, entry_id)
        except Exception:  # the wake is in Redis; bookkeeping only
            log.exception("could not record delivery of wake %s", wake.id)

    async def _record_failure(self, wake_id: str, error: str) -> None:
        try:
            await self.store.execute("wake_mark_publish_failed", wake_id, error)
        except Exception:
            log.exception("could not record publish failure of wake %s", wake_id)
