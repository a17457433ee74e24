"""``AsyncClient``: the API for senders and admins, over ``httpx.AsyncClient``."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Mapping, Sequence
from types import TracebackType
from typing import Any, TypeVar

import httpx

from pullwake.client import _calls
from pullwake.client._calls import (
    DEFAULT_TIMEOUT_S,
    Call,
    ClientSettings,
    Item,
    Policy,
    RunnerHealthView,
    RunnerKind,
    Signal,
)
from pullwake.client.retry import RetryPolicy
from pullwake.wire import (
    BatchResult,
    EntityTypeView,
    EntityView,
    EventPage,
    EventView,
    InitialMessage,
    MessagePage,
    MessageView,
    RunnerView,
    SendResponse,
    WakeView,
)

__all__ = ["AsyncClient"]

T = TypeVar("T")


class AsyncClient:
    """A pullwake API client: ``async with AsyncClient(url, token) as client: ...``.

    ``base_url`` is the server's root (the API is below ``/v1``), by default
    ``PULLWAKE_SERVER_URL`` or ``http://127.0.0.1:8000``; ``token`` an API token (``pwk_...``),
    by default ``PULLWAKE_TOKEN``. ``timeout`` (seconds, or an ``httpx.Timeout``) bounds each
    try of a call; ``retry`` says which failures of repeatable calls are tried again (see
    :mod:`pullwake.client.retry`). ``transport`` replaces httpx's network transport; ``http``
    is a client of your own to send through (it keeps its own timeout and is not closed here;
    without ``base_url``, its own base URL applies). Errors raise a
    :class:`~pullwake.client.PullwakeClientError` subclass named after the problem ``code``.
    """

    def __init__(
        self,
        base_url: str | None = None,
        token: str | None = None,
        *,
        timeout: float | httpx.Timeout | None = DEFAULT_TIMEOUT_S,
        retry: RetryPolicy | None = None,
        headers: Mapping[str, str] | None = None,
        transport: httpx.AsyncBaseTransport | None = None,
        http: httpx.AsyncClient | None = None,
    ) -> None:
        self._settings = ClientSettings.resolve(
            base_url, token, retry, headers, injected=http is not None
        )
        self._owns_http = http is None
        self._http = http or httpx.AsyncClient(timeout=timeout, transport=transport)

    @property
    def base_url(self) -> str:
        """The server root the calls go to ("" with an injected client's own base URL)."""
        return self._settings.prefix

    @property
    def retry(self) -> RetryPolicy:
        return self._settings.retry

    async def aclose(self) -> None:
        """Close the connections (not those of an injected ``http`` client)."""
        if self._owns_http:
            await self._http.aclose()

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    async def _run(self, call: Call[T]) -> T:
        settings = self._settings
        tries = 0
        while True:
            tries += 1
            try:
                response = await self._http.request(
                    call.method,
                    settings.url(call.path),
                    content=call.body,
                    params=call.params,
                    headers=settings.headers_for(call),
                )
            except httpx.TransportError as exc:
                delay = settings.delay_after_error(call, exc, tries)
                if delay is None:
                    raise call.unreachable(exc) from exc
            else:
                delay = settings.delay_after_answer(call, response, tries)
                if delay is None:
                    return call.result(response)
            await asyncio.sleep(delay)

    # --- entity types and entities -----------------------------------------------------------

    async def put_entity_type(
        self, name: str, default_dispatch_policy: Policy | None = None
    ) -> EntityTypeView:
        """Create or replace an entity type (its default dispatch policy); its owner only."""
        return await self._run(_calls.put_entity_type(name, default_dispatch_policy))

    async def get_entity_type(self, name: str) -> EntityTypeView:
        return await self._run(_calls.get_entity_type(name))

    async def create_entity(
        self,
        entity: str,
        *,
        dispatch_policy: Policy | None = None,
        tags: Mapping[str, str] | None = None,
        members: Sequence[str] | None = None,
        initial_message: InitialMessage | None = None,
    ) -> EntityView:
        """``PUT /v1/entities/{type}/{id}`` for ``entity`` = ``"/type/id"``: create it, or get
        it unchanged if it exists (then ``initial_message`` is not sent again). Without
        ``dispatch_policy`` the entity type's default applies."""
        call = _calls.create_entity(
            entity,
            dispatch_policy=dispatch_policy,
            tags=tags,
            members=members,
            initial_message=initial_message,
        )
        return await self._run(call)

    async def get_entity(self, entity: str) -> EntityView:
        """The entity with its dispatch state (members only)."""
        return await self._run(_calls.get_entity(entity))

    async def signal(self, entity: str, signal: Signal) -> EntityView:
        """``pause``, ``resume``, ``stop`` or ``kill`` the entity (its creator only)."""
        return await self._run(_calls.signal(entity, signal))

    async def set_members(self, entity: str, members: Sequence[str]) -> EntityView:
        """Replace the principals (``user:...``, ``service:...`` or ``*``) that may send to and
        read the entity (its creator only)."""
        return await self._run(_calls.set_members(entity, members))

    # --- messages and events -----------------------------------------------------------------

    async def send(
        self,
        entity: str,
        payload: Any,
        *,
        idempotency_key: str | None = None,
        traceparent: str | None = None,
    ) -> SendResponse:
        """Append ``payload`` (anything JSON) to the entity's inbox: it wakes the entity or
        coalesces into the wake it has. With ``idempotency_key`` a repeat (or a retry) answers
        the first send's offset with ``duplicate=True``. The message carries the current
        OpenTelemetry span's trace context, or ``traceparent`` (a W3C trace context) when
        given; its claim's span joins that trace."""
        return await self._run(_calls.send(entity, payload, idempotency_key, traceparent))

    async def send_batch(
        self, messages: Sequence[Item], *, traceparent: str | None = None
    ) -> list[BatchResult]:
        """``POST /v1/messages``: a result per message, in order (``problem`` set on those that
        failed alone). Each message is a :class:`~pullwake.wire.BatchItem` or a mapping with
        ``entity`` ("/type/id"), ``payload`` and optionally ``idempotency_key`` and
        ``traceparent``; a message without its own trace context gets the current span's, or
        ``traceparent``."""
        if not messages:
            return []
        return await self._run(_calls.send_batch(messages, traceparent))

    async def message_page(self, entity: str, *, after: int = 0, limit: int = 100) -> MessagePage:
        """One page of the inbox: messages after offset ``after``."""
        return await self._run(_calls.message_page(entity, after, limit))

    async def messages(
        self, entity: str, *, after: int = 0, limit: int = 100
    ) -> AsyncIterator[MessageView]:
        """Every message after ``after``, a page of ``limit`` at a time."""
        while True:
            page = await self.message_page(entity, after=after, limit=limit)
            for message in page.messages:
                yield message
            if not page.more:
                return
            after = page.next_after

    async def event_page(self, entity: str, *, after: int = 0, limit: int = 100) -> EventPage:
        """One page of the events log: events after offset ``after``."""
        return await self._run(_calls.event_page(entity, after, limit))

    async def events(
        self, entity: str, *, after: int = 0, limit: int = 100
    ) -> AsyncIterator[EventView]:
        """Every event after ``after``, a page of ``limit`` at a time."""
        while True:
            page = await self.event_page(entity, after=after, limit=limit)
            for event in page.events:
                yield event
            if not page.more:
                return
            after = page.next_after

    async def get_wake(self, wake_id: str) -> WakeView:
        """A wake of the audit log (members of its entity only)."""
        return await self._run(_calls.get_wake(wake_id))

    # --- runners -----------------------------------------------------------------------------

    async def register_runner(
        self, runner_id: str, *, label: str = "", kind: RunnerKind = "local"
    ) -> RunnerView:
        """Register a runner owned by the caller, or update its label and kind."""
        return await self._run(_calls.register_runner(runner_id, label, kind))

    async def list_runners(self) -> list[RunnerView]:
        """The caller's runners."""
        return await self._run(_calls.list_runners())

    async def get_runner(self, runner_id: str) -> RunnerView:
        return await self._run(_calls.get_runner(runner_id))

    async def runner_health(self, runner_id: str) -> RunnerHealthView:
        """Liveness, backlog, diagnostics and a verdict with its issues."""
        return await self._run(_calls.runner_health(runner_id))

    async def enable_runner(self, runner_id: str) -> RunnerView:
        return await self._run(_calls.set_runner_enabled(runner_id, True))

    async def disable_runner(self, runner_id: str) -> RunnerView:
        """Wakes for a disabled runner wait until it is enabled again."""
        return await self._run(_calls.set_runner_enabled(runner_id, False))

    async def delete_runner(self, runner_id: str) -> None:
        await self._run(_calls.delete_runner(runner_id))
