"""OpenTelemetry tracing: a W3C trace context given on send follows the message to its claim.

A send may carry a ``traceparent`` header (OpenTelemetry's HTTP client instrumentations add
it; :mod:`pullwake.client` adds the current span's). The server keeps it with the message
(migration 0012): the server's own span when tracing is on in the server, else the sender's
context as given. Whoever claims the message gets it back (``messages[].traceparent``), and the
runner library starts one span per claim, a child of the first traced message's context and
linked to every other's, around the handler and the done. Its calls to the server (heartbeat,
done, release, events) carry the claim span's context, so a traced server adds them to the
same trace: one message's whole path in Jaeger or Tempo.

Everything here works without OpenTelemetry installed (the ``otel`` extra): sends still keep a
valid ``traceparent`` as given, and the runner makes no spans. With only ``opentelemetry-api``,
spans go to whatever tracer provider the application configured (none: no-ops). ``pullwake
serve``, ``worker`` and ``runner`` configure one themselves with ``PULLWAKE_OTEL=on``
(:func:`configure`): the SDK, exporting over OTLP/HTTP as the standard ``OTEL_*`` variables say.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

from pullwake import __version__
from pullwake.errors import ConfigError

if TYPE_CHECKING:
    from opentelemetry.trace import Span

    from pullwake.wire import WakeNotification

try:
    from opentelemetry import trace
    from opentelemetry.trace import Link, SpanContext, SpanKind, Status, StatusCode, TraceFlags
except ImportError:  # the otel extra is not installed
    trace = None  # type: ignore[assignment]

__all__ = [
    "HEADER",
    "claim_span",
    "configure",
    "current_traceparent",
    "handler_failed",
    "header_bytes",
    "parse_traceparent",
    "send_trace",
]

HEADER = "traceparent"
MISSING_EXTRA = "PULLWAKE_OTEL=on needs the otel extra: pip install 'pullwake[otel]'"

_configured = False

_TRACEPARENT = re.compile(r"([0-9a-f]{2})-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})(-.*)?")
_ZERO_TRACE = "0" * 32
_ZERO_SPAN = "0" * 16


def parse_traceparent(value: str | None) -> str | None:
    """``value`` as a version-00 ``traceparent`` when it is a valid one, else None: the W3C
    Trace Context rules say an invalid header is ignored, not refused. A later version is read
    by its first four fields, as the specification asks."""
    if not value:
        return None
    match = _TRACEPARENT.fullmatch(value.strip().lower())
    if match is None:
        return None
    version, trace_id, span_id, flags, rest = match.groups()
    if version == "ff" or (version == "00" and rest) or trace_id == _ZERO_TRACE:
        return None
    if span_id == _ZERO_SPAN:
        return None
    return f"00-{trace_id}-{span_id}-{flags}"


def current_traceparent() -> str | None:
    """The current span's context as a ``traceparent`` (None: no OpenTelemetry, or no span)."""
    if trace is None:
        return None
    context = trace.get_current_span().get_span_context()
    if not context.is_valid:
        return None
    return f"00-{context.trace_id:032x}-{context.span_id:016x}-{context.trace_flags:02x}"


def send_trace(header: str | None) -> str | None:
    """The trace context a send stores with its message: the server's own current span when
    this process traces (so the claim joins the trace below the server's hop), else the
    sender's valid ``traceparent`` header, else None."""
    return current_traceparent() or parse_traceparent(header)


def header_bytes() -> bytes:
    """A ``traceparent`` header line for an outgoing HTTP/1.1 request (empty without a span)."""
    if trace is None:
        return b""
    value = current_traceparent()
    return b"" if value is None else b"traceparent: " + value.encode("ascii") + b"\r\n"


def _recording() -> bool:
    """Whether spans go anywhere: not while no tracer provider is installed (OpenTelemetry's
    proxy, or its no-op one). Checked per claim, so a provider installed later counts. A
    claim's no-op span cost about 8 µs of CPU, this check and the header lookups 2 µs."""
    provider = trace.get_tracer_provider()
    return not isinstance(provider, trace.ProxyTracerProvider | trace.NoOpTracerProvider)


def _span_context(traceparent: str) -> SpanContext:
    _, trace_id, span_id, flags = traceparent.split("-")
    return SpanContext(
        int(trace_id, 16), int(span_id, 16), is_remote=True, trace_flags=TraceFlags(int(flags, 16))
    )


@contextmanager
def claim_span(notification: WakeNotification) -> Iterator[Span | None]:
    """The runner's span of one claim, current while the block runs (handler tasks created in
    it inherit it): a ``CONSUMER`` span ``process <entity type>``, child of the first traced
    message's context and linked to every traced message's. None without OpenTelemetry."""
    if trace is None or not _recording():
        yield None
        return
    traces = [m.traceparent for m in notification.messages if m.traceparent]
    contexts = [_span_context(t) for t in dict.fromkeys(traces)]
    parent = trace.set_span_in_context(trace.NonRecordingSpan(contexts[0])) if contexts else None
    entity = notification.entity
    attributes: dict[str, Any] = {
        "messaging.system": "pullwake",
        "messaging.operation.type": "process",
        "messaging.operation.name": "claim",
        "messaging.destination.name": entity.url,
        "messaging.batch.message_count": len(notification.messages),
        "pullwake.claim.id": notification.claim_id,
        "pullwake.claim.epoch": notification.epoch,
        "pullwake.wake.id": notification.wake_id,
        "pullwake.entity.status": entity.status,
    }
    if notification.messages:
        attributes["pullwake.message.first_offset"] = notification.messages[0].offset
        attributes["pullwake.message.last_offset"] = notification.messages[-1].offset
    tracer = trace.get_tracer("pullwake", __version__)
    with tracer.start_as_current_span(
        f"process {entity.type}",
        context=parent,
        kind=SpanKind.CONSUMER,
        links=[Link(context) for context in contexts],
        attributes=attributes,
        record_exception=False,
        set_status_on_exception=False,
    ) as span:
        yield span


def handler_failed(span: Span | None, error: BaseException) -> None:
    """Record a handler's failure on its claim span."""
    if span is None or trace is None:
        return
    span.record_exception(error)
    span.set_status(Status(StatusCode.ERROR, f"{type(error).__name__}: {error}"))


def configure(service_name: str, *, enabled: bool) -> bool:
    """When ``enabled`` (``PULLWAKE_OTEL=on``): install the OpenTelemetry SDK's tracer
    provider, exporting spans over OTLP/HTTP in batches (endpoint, headers and sampling from
    the standard ``OTEL_*`` variables; ``OTEL_SERVICE_NAME`` overrides ``service_name``), unless
    one is installed already. True when spans are exported from here on.

    Raises :class:`~pullwake.errors.ConfigError` (one line) without the ``otel`` extra."""
    global _configured
    if not enabled:
        return False
    if _configured:
        return True
    try:
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor
    except ImportError:
        raise ConfigError(MISSING_EXTRA) from None
    name = os.environ.get("OTEL_SERVICE_NAME") or service_name
    resource = Resource.create({"service.name": name, "service.version": __version__})
    provider = TracerProvider(resource=resource)
    provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
    trace.set_tracer_provider(provider)
    _configured = True
    return True
