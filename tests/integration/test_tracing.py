"""OpenTelemetry: a trace context given on send follows the message through the server, the
claim and the runner's handler, against a live server, with the SDK's in-memory exporter."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from typing import Any

import pytest
from opentelemetry import trace
from opentelemetry.sdk.trace import ReadableSpan, SpanProcessor, TracerProvider
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode

from pullwake.client import AsyncClient
from pullwake.config import Settings
from pullwake.runner import Runner, Wake

from .helpers import ALICE, create_entity, get_entity, register_runner, send, wait_for

TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"
SPAN = "00f067aa0ba902b7"


class _Recording(SpanProcessor):
    """Exports ended spans while a test records (the global provider outlives the test)."""

    def __init__(self) -> None:
        self.exporter = InMemorySpanExporter()
        self.on = False

    def on_end(self, span: ReadableSpan) -> None:
        if self.on:
            self.exporter.export([span])


_PROCESSOR = _Recording()


@pytest.fixture
def spans() -> Iterator[InMemorySpanExporter]:
    """The spans ended during the test (the SDK's provider, installed once per process)."""
    if not isinstance(trace.get_tracer_provider(), TracerProvider):
        provider = TracerProvider()
        provider.add_span_processor(_PROCESSOR)
        trace.set_tracer_provider(provider)
    _PROCESSOR.exporter.clear()
    _PROCESSOR.on = True
    yield _PROCESSOR.exporter
    _PROCESSOR.on = False
    _PROCESSOR.exporter.clear()


@pytest.fixture
def server_settings(settings: Settings, request: pytest.FixtureRequest) -> Settings:
    return settings.with_(otel=getattr(request, "param", False))


def _hex(span: ReadableSpan) -> tuple[str, str]:
    assert span.context is not None
    return f"{span.context.trace_id:032x}", f"{span.context.span_id:016x}"


def _parent(span: ReadableSpan) -> str | None:
    return None if span.parent is None else f"{span.parent.span_id:016x}"


def _named(spans: InMemorySpanExporter, needle: str) -> list[ReadableSpan]:
    return [s for s in spans.get_finished_spans() if needle in s.name]


async def _run_until_done(
    api: Any, runner_id: str, handler: Any, http: Any, alice: Any, entity: Any
) -> None:
    runner = Runner(api.base_url, runner_id, handler, await api.make_token(ALICE))
    await runner.start()
    try:

        async def acked() -> bool:
            state = await get_entity(http, alice, entity)
            return bool(state["dispatch"]["acked_offset"] == state["dispatch"]["tail_offset"])

        await wait_for(acked, timeout=15)
    finally:
        await runner.stop()


@pytest.mark.parametrize("server_settings", [True], indirect=True)
async def test_one_messages_path_is_one_trace(api, http, alice, spans) -> None:
    """sender span -> server send span -> runner's claim span -> the handler's span, and the
    runner's done call as a server span below the claim span."""
    runner_id = await register_runner(http, alice)
    entity = await create_entity(http, alice, runner_id)
    tracer = trace.get_tracer("test")
    async with AsyncClient(api.base_url, await api.make_token(ALICE)) as client:
        with tracer.start_as_current_span("sender") as sender:
            await client.send(entity.url, {"text": "hi"})
    trace_id = f"{sender.get_span_context().trace_id:032x}"
    sender_id = f"{sender.get_span_context().span_id:016x}"

    handled: list[str] = []

    async def handle(wake: Wake) -> None:
        with tracer.start_as_current_span("handler work"):
            handled.append(wake.claim_id)

    await _run_until_done(api, runner_id, handle, http, alice, entity)
    assert len(handled) == 1

    (send_span,) = [s for s in _named(spans, "messages") if s.kind is SpanKind.SERVER]
    assert _hex(send_span)[0] == trace_id
    assert _parent(send_span) == sender_id  # the client sent the sender's context
    # The message keeps the server span's context (the server traces itself).
    page = (await http.get(f"/v1/entities{entity.url}/messages", headers=alice)).json()
    assert send_span.context is not None
    flags = f"{send_span.context.trace_flags:02x}"
    assert page["messages"][0]["traceparent"] == f"00-{trace_id}-{_hex(send_span)[1]}-{flags}"

    (claim_span,) = [s for s in spans.get_finished_spans() if s.kind is SpanKind.CONSUMER]
    assert claim_span.name == f"process {entity.type}"
    assert _hex(claim_span)[0] == trace_id
    assert _parent(claim_span) == _hex(send_span)[1]
    attributes = dict(claim_span.attributes or {})
    assert attributes["messaging.system"] == "pullwake"
    assert attributes["messaging.destination.name"] == entity.url
    assert attributes["pullwake.claim.id"] == handled[0]
    assert attributes["messaging.batch.message_count"] == 1

    (work,) = _named(spans, "handler work")
    assert _hex(work)[0] == trace_id
    assert _parent(work) == _hex(claim_span)[1]

    done_spans = [s for s in _named(spans, "done") if s.kind is SpanKind.SERVER]
    assert done_spans, [s.name for s in spans.get_finished_spans()]
    assert all(_hex(s)[0] == trace_id for s in done_spans)
    assert all(_parent(s) == _hex(claim_span)[1] for s in done_spans)
    # The wake stream is left out: an hours-long request is no span.
    assert not [s for s in spans.get_finished_spans() if "/wakes" in s.name]


async def test_coalesced_messages_are_links_of_one_claim_span(api, http, alice, spans) -> None:
    """Without server tracing the sender's context is kept as given; a claim of several
    messages is a child of the first and linked to each."""
    runner_id = await register_runner(http, alice)
    entity = await create_entity(http, alice, runner_id)
    contexts = [f"00-{n:032x}-{n + 100:016x}-01" for n in (1, 2)]
    for n, context in enumerate(contexts):
        await send(http, {**alice, "traceparent": context}, entity, {"n": n})
    await send(http, alice, entity, {"n": "untraced"})

    async def handle(wake: Wake) -> None:
        assert [m.traceparent async for m in wake.messages] == [*contexts, None]

    await _run_until_done(api, runner_id, handle, http, alice, entity)
    (claim_span,) = [s for s in spans.get_finished_spans() if s.kind is SpanKind.CONSUMER]
    assert _hex(claim_span)[0] == f"{1:032x}"
    assert _parent(claim_span) == f"{101:016x}"
    linked = [
        (f"{link.context.trace_id:032x}", f"{link.context.span_id:016x}")
        for link in claim_span.links
    ]
    assert linked == [(f"{1:032x}", f"{101:016x}"), (f"{2:032x}", f"{102:016x}")]
    assert claim_span.attributes is not None
    assert claim_span.attributes["messaging.batch.message_count"] == 3
    assert claim_span.status.status_code is StatusCode.UNSET


async def test_a_failing_handler_marks_its_claim_span(api, http, alice, spans) -> None:
    runner_id = await register_runner(http, alice)
    entity = await create_entity(http, alice, runner_id)
    await send(http, {**alice, "traceparent": f"00-{TRACE}-{SPAN}-01"}, entity, {"n": 1})
    calls: list[int] = []

    async def handle(wake: Wake) -> None:
        calls.append(1)
        if len(calls) == 1:
            raise RuntimeError("boom")

    runner = Runner(api.base_url, runner_id, handle, await api.make_token(ALICE), retry_delay_ms=50)
    await runner.start()
    try:
        await wait_for(lambda: asyncio.sleep(0, len(calls) >= 2), timeout=15)
        await wait_for(
            lambda: asyncio.sleep(
                0, len([s for s in spans.get_finished_spans() if s.kind is SpanKind.CONSUMER]) >= 2
            ),
            timeout=15,
        )
    finally:
        await runner.stop()
    failed, succeeded = [s for s in spans.get_finished_spans() if s.kind is SpanKind.CONSUMER][:2]
    assert failed.status.status_code is StatusCode.ERROR
    assert "boom" in (failed.status.description or "")
    assert [e.name for e in failed.events] == ["exception"]
    assert succeeded.status.status_code is StatusCode.UNSET
    assert _hex(failed)[0] == _hex(succeeded)[0] == TRACE  # both claims of the same message


async def test_trace_contexts_given_on_send_are_checked(api, http, alice) -> None:
    """An invalid header is ignored (W3C Trace Context), a batch item's own context wins over
    the request's, and an invalid one in a body is a 400 naming the field."""
    runner_id = await register_runner(http, alice)
    entity = await create_entity(http, alice, runner_id)
    good = f"00-{TRACE}-{SPAN}-01"
    for bad in (
        "nonsense",
        f"00-{'0' * 32}-{SPAN}-01",
        f"ff-{TRACE}-{SPAN}-01",
        f"00-{TRACE}-{SPAN}-01-x",
    ):
        await send(http, {**alice, "traceparent": bad}, entity, {"bad": bad})
    # A later version is read by its first four fields; upper case is normalised.
    future = f"01-{TRACE}-{SPAN}-01-future"
    await send(http, {**alice, "traceparent": future}, entity, {"v": 1})
    other = f"00-{'1' * 32}-{'2' * 16}-00"
    answer = await http.post(
        "/v1/messages",
        headers={**alice, "traceparent": good.upper()},
        json={
            "messages": [
                {"entity": entity.url, "payload": 1},
                {"entity": entity.url, "payload": 2, "traceparent": other},
            ]
        },
    )
    assert answer.status_code == 200, answer.text
    page = (await http.get(f"/v1/entities{entity.url}/messages", headers=alice)).json()
    assert [m.get("traceparent") for m in page["messages"]] == [None] * 4 + [good, good, other]

    answer = await http.post(
        "/v1/messages",
        headers=alice,
        json={"messages": [{"entity": entity.url, "payload": 1, "traceparent": "nonsense"}]},
    )
    assert answer.status_code == 400
    assert answer.json()["errors"][0]["key"] == "messages[0].traceparent"


async def test_the_client_sends_the_current_span_or_the_given_context(
    api, http, alice, spans
) -> None:
    runner_id = await register_runner(http, alice)
    entity = await create_entity(http, alice, runner_id)
    tracer = trace.get_tracer("test")
    given = f"00-{TRACE}-{SPAN}-01"
    async with AsyncClient(api.base_url, await api.make_token(ALICE)) as client:
        with tracer.start_as_current_span("sender") as sender:
            await client.send(entity.url, 1)
            await client.send(entity.url, 2, traceparent=given)
            await client.send_batch([{"entity": entity.url, "payload": 3}])
        await client.send(entity.url, 4)  # no span: no context
        with pytest.raises(ValueError, match="not a W3C traceparent"):
            await client.send(entity.url, 5, traceparent="nonsense")
    context = sender.get_span_context()
    current = f"00-{context.trace_id:032x}-{context.span_id:016x}-{context.trace_flags:02x}"
    page = (await http.get(f"/v1/entities{entity.url}/messages", headers=alice)).json()
    assert [m.get("traceparent") for m in page["messages"]] == [current, given, current, None]
