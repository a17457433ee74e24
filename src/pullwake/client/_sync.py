"""``Client``: :class:`~pullwake.client.AsyncClient`'s calls, blocking, over ``httpx.Client``."""

from __future__ import annotations

import time
from collections.abc import Iterator, Mapping, Sequence
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

__all__ = ["Client"]

T = TypeVar("T")


class Client:
    """A pullwake API client: ``with Client(url, token) as client: ...``.

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
        transport: httpx.BaseTransport | None = None,
        http: httpx.Client | None = None,
    ) -> None:
        self._settings = ClientSettings.resolve(
            base_url, token, retry, headers, injected=http is not None
        )
        self._owns_http = http is None
        self._http = http or httpx.Client(timeout=timeout, transport=transport)

    @property
    def base_url(self) -> str:
        """The server root the calls go to ("" with an injected client's own base URL)."""
        return self._settings.prefix

    @property
    def retry(self) -> RetryPolicy:
        return self._settings.retry

    def close(self) -> None:
        """Close the connections (not those of an injected ``http`` client)."""
        if self._owns_http:
            self._http.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def _run(self, call: Call[T]) -> T:
        settings = self._settings
        tries = 0
        while True:
            tries += 1
            try:
                response = self._http.request(
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
            time.sleep(delay)

    # --- entity types and entities -----------------------------------------------------------

    def put_entity_type(
        self, name: str, default_dispatch_policy: Policy | None = None
    ) -> EntityTypeView:
        """Create or replace an entity type (its default dispatch policy); its owner only."""
        return self._run(_calls.put_entity_type(name, default_dispatch_policy))

    def get_entity_type(self, name: str) -> EntityTypeView:
        return self._run(_calls.get_entity_type(name))

    def create_entity(
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
        return self._run(call)

    def get_entity(self, entity: str) -> EntityView:
        """The entity with its dispatch state (members only)."""
        return self._run(_calls.get_entity(entity))

    def signal(self, entity: str, signal: Signal) -> EntityView:
        """``pause``, ``resume``, ``stop`` or ``kill`` the entity (its creator only)."""
        return self._run(_calls.signal(entity, signal))

    def set_members(self, entity: str, members: Sequence[str]) -> EntityView:
        """Replace the principals (``user:...``, ``service:...`` or ``*``) that may send to and
        read the entity (its creator only)."""
        return self._run(_calls.set_members(entity, members))

    # --- messages and events -----------------------------------------------------------------

    def send(
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
        return self._run(_calls.send(entity, payload, idempotency_key, traceparent))

    def send_batch(
        self, messages: Sequence[Item], *, traceparent: str | None = None
    ) -> list[BatchResult]:
        """``POST /v1/messages``: a result per message, in order (``problem`` set on those that
        failed alone). Each message is a :class:`~pullwake.wire.BatchItem` or a mapping with
        ``entity`` ("/type/id"), ``payload`` and optionally ``idempotency_key`` and
        ``traceparent``; a message without its own trace context gets the current span's, or
        ``traceparent``."""
        if not messages:
            return []
        return self._run(_calls.send_batch(messages, traceparent))

    def message_page(self, entity: str, *, after: int = 0, limit: int = 100) -> MessagePage:
        """One page of the inbox: messages after offset ``after``."""
        return self._run(_calls.message_page(entity, after, limit))

    def messages(self, entity: str, *, after: int = 0, limit: int = 100) -> Iterator[MessageView]:
        """Every message after ``after``, a page of ``limit`` at a time."""
        while True:
            page = self.message_page(entity, after=after, limit=limit)
            yield from page.messages
            if not page.more:
                return
            after = page.next_after

    def event_page(self, entity: str, *, after: int = 0, limit: int = 100) -> EventPage:
        """One page of the events log: events after offset ``after``."""
        return self._run(_calls.event_page(entity, after, limit))

    def events(self, entity: str, *, after: int = 0, limit: int = 100) -> Iterator[EventView]:
        """Every event after ``after``, a page of ``limit`` at a time."""
        while True:
            page = self.event_page(entity, after=after, limit=limit)
            yield from page.events
            if not page.more:
                return
            after = page.next_after

    def get_wake(self, wake_id: str) -> WakeView:
        """A wake of the audit log (members of its entity only)."""
        return self._run(_calls.get_wake(wake_id))

    # --- runners -----------------------------------------------------------------------------

    def register_runner(
        self, runner_id: str, *, label: str = "", kind: RunnerKind = "local"
    ) -> RunnerView:
        """Register a runner owned by the caller, or update its label and kind."""
        return self._run(_calls.register_runner(runner_id, label, kind))

    def list_runners(self) -> list[RunnerView]:
        """The caller's runners."""
        return self._run(_calls.list_runners())

    def get_runner(self, runner_id: str) -> RunnerView:
        return self._run(_calls.get_runner(runner_id))

    def runner_health(self, runner_id: str) -> RunnerHealthView:
        """Liveness, backlog, diagnostics and a verdict with its issues."""
        return self._run(_calls.runner_health(runner_id))

    def enable_runner(self, runner_id: str) -> RunnerView:
        return self._run(_calls.set_runner_enabled(runner_id, True))

    def disable_runner(self, runner_id: str) -> RunnerView:
        """Wakes for a disabled runner wait until it is enabled again."""
        return self._run(_calls.set_runner_enabled(runner_id, False))

    def delete_runner(self, runner_id: str) -> None:
        self._run(_calls.delete_runner(runner_id))
