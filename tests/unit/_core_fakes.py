"""Fakes shared by the unit tests of the use cases (``pullwake.core``)."""

from __future__ import annotations

from typing import Any

from pullwake.store.steps import NewWake


class FakePublisher:
    """Records the wakes a use case publishes after its commit (None entries skipped)."""

    def __init__(self) -> None:
        self.published: list[NewWake] = []

    async def publish(self, wakes: Any) -> None:
        self.published.extend(w for w in wakes if w is not None)
