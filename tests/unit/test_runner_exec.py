"""``--exec``: a failing command's stderr becomes a release error the server can store."""

from __future__ import annotations

import pytest
from _runner_fakes import FakeTransport, notification, wake_event

from pullwake.runner.clock import FakeClock
from pullwake.runner.execute import exec_handler
from pullwake.runner.health import sanitize
from pullwake.runner.wake import Release, Wake


async def test_stderr_with_nul_releases_with_clean_text() -> None:
    wake = Wake(notification(wake_event()), FakeTransport(FakeClock()))
    handler = exec_handler(r"printf 'bad\000out pwk_SECRET' >&2; exit 3")
    with pytest.raises(Release) as raised:
        await handler(wake)
    reason = str(raised.value)
    assert reason == "command exited with status 3: bad\ufffdout pwk_***"
    assert "\x00" not in reason


def test_sanitize_replaces_what_postgres_refuses() -> None:
    assert sanitize("a\x00b\ud800c") == "a\ufffdb\ufffdc"
    assert sanitize("fine text") == "fine text"
