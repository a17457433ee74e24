"""``pullwake send`` refuses text Postgres cannot store before it opens any connection."""

from __future__ import annotations

import pytest

from pullwake.cli import main


@pytest.mark.parametrize(
    ("payload", "key", "named"),
    [
        (r'{"a": {"b": "x\u0000"}}', None, "payload.a.b"),
        (r'{"a": "\ud800"}', None, "payload.a"),
        ('{"a": 1}', "k\x00", "idempotency_key"),
    ],
)
def test_send_refuses_unstorable_text(
    payload: str,
    key: str | None,
    named: str,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Nothing listens there: the refusal must come before any connection is tried.
    monkeypatch.setenv("PULLWAKE_DATABASE_URL", "postgresql://nobody@127.0.0.1:9/none")
    monkeypatch.setenv("PULLWAKE_REDIS_URL", "redis://127.0.0.1:9/0")
    argv = ["send", "/t/e", payload] + (["--idempotency-key", key] if key else [])
    assert main(argv) == 2
    assert named in capsys.readouterr().err
