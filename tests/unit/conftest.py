"""Fixtures of the unit tests (no services)."""

from __future__ import annotations

import pytest

NOWHERE = {
    # Nothing listens there: a refusal must come before any connection is tried.
    "PULLWAKE_SERVER_URL": "http://127.0.0.1:9",
    "PULLWAKE_DATABASE_URL": "postgresql://nobody@127.0.0.1:9/none",
    "PULLWAKE_REDIS_URL": "redis://127.0.0.1:9/0",
}


@pytest.fixture
def nowhere(monkeypatch: pytest.MonkeyPatch) -> None:
    """The CLI's settings name a server, Postgres and Redis where nothing listens."""
    for name, value in NOWHERE.items():
        monkeypatch.setenv(name, value)
