"""W3C trace context parsing and the OpenTelemetry glue, with and without OpenTelemetry."""

from __future__ import annotations

import builtins
from datetime import UTC, datetime
from typing import Any

import pytest

from pullwake import tracing
from pullwake.errors import ConfigError
from pullwake.wire import Callbacks, MessageView, NotificationEntity, WakeNotification

TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"
SPAN = "00f067aa0ba902b7"


@pytest.mark.parametrize(
    ("given", "kept"),
    [
        (f"00-{TRACE}-{SPAN}-01", f"00-{TRACE}-{SPAN}-01"),
        (f"  00-{TRACE.upper()}-{SPAN}-00 ", f"00-{TRACE}-{SPAN}-00"),
        (f"01-{TRACE}-{SPAN}-01-more-fields", f"00-{TRACE}-{SPAN}-01"),  # a later version
        (f"00-{TRACE}-{SPAN}-01-more", None),  # version 00 has exactly four fields
        (f"ff-{TRACE}-{SPAN}-01", None),  # version ff is invalid
        (f"00-{'0' * 32}-{SPAN}-01", None),  # an all-zero trace id
        (f"00-{TRACE}-{'0' * 16}-01", None),  # an all-zero span id
        (f"00-{TRACE[:-1]}-{SPAN}-01", None),
        ("00-xyz", None),
        ("", None),
        (None, None),
    ],
)
def test_traceparent_parsing_follows_w3c_trace_context(given: str | None, kept: str | None) -> None:
    assert tracing.parse_traceparent(given) == kept


def _notification(*traces: str | None) -> WakeNotification:
    now = datetime.now(UTC)
    return WakeNotification(
        claim_id="wk_1",
        wake_id="wk_1",
        epoch=3,
        claim_token="pwc_x",
        lease_ms=1000,
        lease_expires_at=now,
        entity=NotificationEntity("/chat/a", "chat", "a", "running", {}, "user:alice"),
        acked_offset=0,
        tail_offset=len(traces),
        messages=[MessageView(n + 1, {}, "user:alice", now, t) for n, t in enumerate(traces)],
        more_messages=False,
        callbacks=Callbacks("h", "d", "r", "e", "m"),
    )


def test_without_opentelemetry_nothing_is_traced_and_nothing_fails(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(tracing, "trace", None)
    assert tracing.current_traceparent() is None
    assert tracing.header_bytes() == b""
    # The server still keeps the sender's valid context.
    assert tracing.send_trace(f"00-{TRACE}-{SPAN}-01") == f"00-{TRACE}-{SPAN}-01"
    with tracing.claim_span(_notification(f"00-{TRACE}-{SPAN}-01")) as span:
        assert span is None
    tracing.handler_failed(None, RuntimeError("x"))


def test_the_claim_span_is_current_inside_and_sends_its_context() -> None:
    from opentelemetry.sdk.trace import TracerProvider

    tracer = TracerProvider().get_tracer("test")
    with tracer.start_as_current_span("outer") as outer:
        context = outer.get_span_context()
        expected = f"00-{context.trace_id:032x}-{context.span_id:016x}-{context.trace_flags:02x}"
        assert tracing.current_traceparent() == expected
        assert tracing.header_bytes() == f"traceparent: {expected}\r\n".encode()
        # On the server, its own span wins over the header it was sent.
        assert tracing.send_trace(f"00-{TRACE}-{SPAN}-01") == expected


def test_configure_is_off_unless_enabled_and_says_which_extra_is_missing(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    assert tracing.configure("pullwake-test", enabled=False) is False
    real_import = builtins.__import__

    def no_sdk(name: str, *args: Any, **kwargs: Any) -> Any:
        if name.startswith(("opentelemetry.sdk", "opentelemetry.exporter")):
            raise ImportError(name)
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_sdk)
    monkeypatch.setattr(tracing, "_configured", False)
    with pytest.raises(ConfigError, match=r"pip install 'pullwake\[otel\]'"):
        tracing.configure("pullwake-test", enabled=True)


def test_the_setting_reads_on_and_off() -> None:
    from pullwake.config import Settings

    assert Settings.from_env({"PULLWAKE_OTEL": "on"}).otel is True
    assert Settings.from_env({}).otel is False
    with pytest.raises(ConfigError, match="PULLWAKE_OTEL"):
        Settings.from_env({"PULLWAKE_OTEL": "maybe"})
