"""Which wakes this process holds: one waiting wake per entity, and the entities in flight."""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from typing import Generic, TypeVar

from pullwake.runner.transport import WakeEvent

__all__ = ["Offer", "WakeBook"]

J = TypeVar("J")


@dataclass(frozen=True, slots=True)
class Offer:
    """What happened to an offered wake."""

    kept: bool  # it is now the entity's waiting wake (False: an equal/newer one was kept)
    deferred: bool  # the entity is in flight here, so it waits for that job to end


class WakeBook(Generic[J]):
    """Never two jobs for one entity; the newest waiting wake per entity; a concurrency limit.

    Waiting entities are served first come, first served; a newer wake for an entity that is
    already waiting replaces the older one in place.
    """

    def __init__(self, concurrency: int) -> None:
        self.concurrency = concurrency
        self._waiting: OrderedDict[str, tuple[WakeEvent, float]] = OrderedDict()
        self._active: dict[str, J] = {}

    def offer(self, event: WakeEvent, received_ms: float) -> Offer:
        """Remember ``event`` as its entity's waiting wake unless a newer one is waiting."""
        entity = event.wake.entity
        previous = self._waiting.get(entity)
        kept = previous is None or event.wake.epoch >= previous[0].wake.epoch
        if kept:
            self._waiting[entity] = (event, received_ms)
        return Offer(kept=kept, deferred=entity in self._active)

    def take_ready(self) -> list[tuple[WakeEvent, float]]:
        """Waiting wakes that may be claimed now (entity idle here, a slot free); removed."""
        ready: list[tuple[WakeEvent, float]] = []
        for entity in list(self._waiting):
            if len(self._active) + len(ready) >= self.concurrency:
                break
            if entity not in self._active:
                ready.append(self._waiting.pop(entity))
        return ready

    def begin(self, entity: str, job: J) -> None:
        """Mark ``entity`` in flight with ``job``."""
        assert entity not in self._active, f"{entity} is already in flight"
        self._active[entity] = job

    def end(self, entity: str, job: J) -> None:
        """``job`` for ``entity`` ended (a no-op if another job replaced it)."""
        if self._active.get(entity) is job:
            del self._active[entity]

    def clear_waiting(self) -> None:
        """Forget every waiting wake (stop)."""
        self._waiting.clear()

    @property
    def active(self) -> dict[str, J]:
        """Entities in flight and their jobs (a copy)."""
        return dict(self._active)

    def others_waiting(self, entity: str) -> bool:
        """Whether a wake of another entity waits for a slot (chaining must then let go)."""
        return any(waiting != entity for waiting in self._waiting)

    @property
    def waiting(self) -> int:
        """How many entities have a waiting wake."""
        return len(self._waiting)
