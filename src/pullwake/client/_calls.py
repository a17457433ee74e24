"""Every API call the clients make, as data: method, path, body, how to decode the answer and
whether repeating it is safe. The async and the sync client only differ in how they send it."""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Generic, Literal, TypeVar

import httpx
import msgspec

from pullwake.client.errors import (
    InvalidResponse,
    Unreachable,
    error_from_response,
    parse_retry_after,
)
from pullwake.client.retry import RetryPolicy
from pullwake.tracing import HEADER as TRACE_HEADER
from pullwake.tracing import current_traceparent, parse_traceparent
from pullwake.wire import (
    BatchItem,
    BatchResult,
    BatchSendResponse,
    DispatchPolicy,
    EntityTypeView,
    EntityView,
    EventPage,
    InitialMessage,
    MessagePage,
    RunnerView,
    SendResponse,
    WakeView,
)

__all__ = ["DEFAULT_SERVER", "Call", "ClientSettings", "RunnerHealthView"]

T = TypeVar("T")

DEFAULT_SERVER = "http://127.0.0.1:8000"
DEFAULT_TIMEOUT_S = 10.0
_ID = r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}"
_ID_RE = re.compile(rf"{_ID}(?!\n)")
_ENTITY_RE = re.compile(rf"/({_ID})/({_ID})(?!\n)")
_WAKE_RE = re.compile(r"wk_[0-9a-f]{12,40}(?!\n)")

Signal = Literal["pause", "resume", "stop", "kill"]
RunnerKind = Literal["local", "cloud-worker", "sandbox", "ci", "server"]
Policy = DispatchPolicy | Mapping[str, Any]
Item = BatchItem | Mapping[str, Any]


class HealthVerdict(msgspec.Struct):
    status: str
    """``healthy``, ``degraded`` or ``unhealthy``."""
    issues: list[dict[str, Any]]
    """Each with a ``code``, a ``severity`` and a ``message``."""


class RunnerHealthView(msgspec.Struct):
    """``GET /v1/runners/{id}/health`` (the server answers a plain object: typed here)."""

    runner_id: str
    admin_status: str
    liveness: str
    last_seen_at: datetime | None
    lease_expires_at: datetime | None
    active_claims: int
    backlog: dict[str, Any]
    diagnostics: dict[str, Any] | None
    health: HealthVerdict


class _RunnerList(msgspec.Struct):
    runners: list[RunnerView]


def _decoder(kind: type[T]) -> Callable[[bytes], T]:
    return msgspec.json.Decoder(kind).decode


def _nothing(_: bytes) -> None:
    return None


def _runner_list(body: bytes) -> list[RunnerView]:
    return _decode_runners(body).runners


def _batch_results(body: bytes) -> list[BatchResult]:
    return _decode_batch(body).results


_decode_runners = _decoder(_RunnerList)
_decode_batch = _decoder(BatchSendResponse)
_entity = _decoder(EntityView)
_entity_type = _decoder(EntityTypeView)
_send = _decoder(SendResponse)
_messages = _decoder(MessagePage)
_events = _decoder(EventPage)
_wake = _decoder(WakeView)
_runner = _decoder(RunnerView)
_health = _decoder(RunnerHealthView)
_encode = msgspec.json.Encoder().encode


@dataclass(frozen=True, slots=True)
class Call(Generic[T]):
    """One request; ``idempotent``: the same effect however often it is sent."""

    method: str
    path: str
    decode: Callable[[bytes], T]
    body: bytes | None = None
    params: Mapping[str, int] | None = None
    idempotent: bool = False
    headers: Mapping[str, str] | None = None

    def result(self, response: httpx.Response) -> T:
        """The decoded answer, or the exception the error response stands for."""
        if response.is_success:
            try:
                return self.decode(response.content)
            except msgspec.DecodeError as exc:
                raise InvalidResponse(
                    f"unexpected answer to {self.method} {self.path}: {exc}",
                    status=response.status_code,
                    response=response,
                ) from exc
        raise error_from_response(response)

    def unreachable(self, exc: httpx.TransportError) -> Unreachable:
        """The error for a try that got no answer."""
        why = str(exc) or "no answer"
        return Unreachable(f"{self.method} /v1{self.path}: {type(exc).__name__}: {why}")


@dataclass(frozen=True, slots=True)
class ClientSettings:
    """What both clients are built from (see :class:`pullwake.client.AsyncClient`)."""

    prefix: str
    token: str | None
    retry: RetryPolicy
    headers: Mapping[str, str]

    @classmethod
    def resolve(
        cls,
        base_url: str | None,
        token: str | None,
        retry: RetryPolicy | None,
        headers: Mapping[str, str] | None,
        *,
        injected: bool,
    ) -> ClientSettings:
        if base_url is None:
            base_url = "" if injected else os.environ.get("PULLWAKE_SERVER_URL") or DEFAULT_SERVER
        if token is None:
            token = os.environ.get("PULLWAKE_TOKEN") or None
        all_headers = {"Accept": "application/json", **(headers or {})}
        if token:
            all_headers["Authorization"] = f"Bearer {token}"
        return cls(base_url.rstrip("/"), token, retry or RetryPolicy(), all_headers)

    def url(self, path: str) -> str:
        return f"{self.prefix}/v1{path}"

    def headers_for(self, call: Call[Any]) -> dict[str, str]:
        """The request's headers: the client's, the body's type, and the W3C trace context of
        the current OpenTelemetry span (when there is one) unless the call gives its own."""
        headers = dict(self.headers)
        if call.body is not None:
            headers["Content-Type"] = "application/json"
        trace = current_traceparent()
        if trace is not None:
            headers[TRACE_HEADER] = trace
        if call.headers:
            headers.update(call.headers)
        return headers

    def delay_after_error(
        self, call: Call[Any], exc: httpx.TransportError, tries: int
    ) -> float | None:
        """Seconds before trying ``call`` again after it got no answer; None: give up."""
        if not call.idempotent or not self.retry.retries_error(exc):
            return None
        return self.retry.delay_s(tries)

    def delay_after_answer(
        self, call: Call[Any], response: httpx.Response, tries: int
    ) -> float | None:
        """Seconds before trying ``call`` again after ``response``; None: take this answer."""
        if not call.idempotent or not self.retry.retries_status(response.status_code):
            return None
        retry_after = parse_retry_after(response.headers.get("retry-after"))
        return self.retry.delay_s(tries, retry_after=retry_after)


# --- addresses -------------------------------------------------------------------------------


def _id(value: str, what: str) -> str:
    if not isinstance(value, str) or not _ID_RE.fullmatch(value):
        raise ValueError(f"{what} must match [A-Za-z0-9][A-Za-z0-9._-]{{0,127}}, got {value!r}")
    return value


def entity_path(entity: str) -> str:
    """``/type/id`` as its API path below ``/v1``; ValueError for anything else."""
    if isinstance(entity, str) and _ENTITY_RE.fullmatch(entity):
        return f"/entities{entity}"
    if isinstance(entity, str) and _ENTITY_RE.fullmatch(f"/{entity}"):
        raise ValueError(f"an entity is written /type/id, with the leading '/': /{entity}")
    raise ValueError(
        f"an entity is written /type/id (type and id: [A-Za-z0-9][A-Za-z0-9._-]*), got {entity!r}"
    )


def _json(body: Any) -> bytes:
    return _encode(body)


def _some(**fields: Any) -> dict[str, Any]:
    return {k: v for k, v in fields.items() if v is not None}


# --- entity types and entities ---------------------------------------------------------------


def put_entity_type(name: str, default_dispatch_policy: Policy | None) -> Call[EntityTypeView]:
    body = _json(_some(default_dispatch_policy=default_dispatch_policy))
    path = f"/entity-types/{_id(name, 'an entity type')}"
    return Call("PUT", path, _entity_type, body, idempotent=True)


def get_entity_type(name: str) -> Call[EntityTypeView]:
    path = f"/entity-types/{_id(name, 'an entity type')}"
    return Call("GET", path, _entity_type, idempotent=True)


def create_entity(
    entity: str,
    *,
    dispatch_policy: Policy | None,
    tags: Mapping[str, str] | None,
    members: Sequence[str] | None,
    initial_message: InitialMessage | None,
) -> Call[EntityView]:
    body = _some(
        dispatch_policy=dispatch_policy,
        tags=None if tags is None else dict(tags),
        members=None if members is None else list(members),
        initial_message=initial_message,
    )
    # A PUT: an existing entity is answered unchanged, its initial message not sent again.
    return Call("PUT", entity_path(entity), _entity, _json(body), idempotent=True)


def get_entity(entity: str) -> Call[EntityView]:
    return Call("GET", entity_path(entity), _entity, idempotent=True)


def signal(entity: str, name: Signal) -> Call[EntityView]:
    body = _json({"signal": name})
    return Call("POST", f"{entity_path(entity)}/signal", _entity, body)


def set_members(entity: str, members: Sequence[str]) -> Call[EntityView]:
    body = _json({"members": list(members)})
    return Call("PUT", f"{entity_path(entity)}/members", _entity, body, idempotent=True)


# --- messages and events ---------------------------------------------------------------------


def _trace_header(traceparent: str | None) -> dict[str, str] | None:
    if traceparent is None:
        return None
    if parse_traceparent(traceparent) is None:
        raise ValueError(f"not a W3C traceparent: {traceparent!r}")
    return {TRACE_HEADER: traceparent}


def send(
    entity: str, payload: Any, idempotency_key: str | None, traceparent: str | None = None
) -> Call[SendResponse]:
    fields = {"payload": payload}
    if idempotency_key is not None:
        fields["idempotency_key"] = idempotency_key
    body = _json(fields)
    path = f"{entity_path(entity)}/messages"
    headers = _trace_header(traceparent)
    return Call("POST", path, _send, body, idempotent=idempotency_key is not None, headers=headers)


def _item(item: Item) -> Any:
    if isinstance(item, BatchItem):
        return item
    raw = dict(item)
    entity_path(raw.get("entity"))  # type: ignore[arg-type]  # checked there
    return raw


def _key_of(item: Any) -> Any:
    return item.idempotency_key if isinstance(item, BatchItem) else item.get("idempotency_key")


def send_batch(messages: Sequence[Item], traceparent: str | None = None) -> Call[list[BatchResult]]:
    items = [_item(item) for item in messages]
    keyed = all(_key_of(item) is not None for item in items)
    body = _json({"messages": items})
    headers = _trace_header(traceparent)
    return Call("POST", "/messages", _batch_results, body, idempotent=keyed, headers=headers)


def message_page(entity: str, after: int, limit: int) -> Call[MessagePage]:
    params = {"after": after, "limit": limit}
    path = f"{entity_path(entity)}/messages"
    return Call("GET", path, _messages, params=params, idempotent=True)


def event_page(entity: str, after: int, limit: int) -> Call[EventPage]:
    params = {"after": after, "limit": limit}
    return Call("GET", f"{entity_path(entity)}/events", _events, params=params, idempotent=True)


def get_wake(wake_id: str) -> Call[WakeView]:
    if not isinstance(wake_id, str) or not _WAKE_RE.fullmatch(wake_id):
        raise ValueError(f"a wake id looks like wk_ and hex digits, got {wake_id!r}")
    return Call("GET", f"/wakes/{wake_id}", _wake, idempotent=True)


# --- runners ---------------------------------------------------------------------------------


def _runner_path(runner_id: str) -> str:
    return f"/runners/{_id(runner_id, 'a runner id')}"


def register_runner(runner_id: str, label: str, kind: RunnerKind) -> Call[RunnerView]:
    body = _json({"id": _id(runner_id, "a runner id"), "label": label, "kind": kind})
    return Call("POST", "/runners", _runner, body)


def list_runners() -> Call[list[RunnerView]]:
    return Call("GET", "/runners", _runner_list, idempotent=True)


def get_runner(runner_id: str) -> Call[RunnerView]:
    return Call("GET", _runner_path(runner_id), _runner, idempotent=True)


def runner_health(runner_id: str) -> Call[RunnerHealthView]:
    return Call("GET", f"{_runner_path(runner_id)}/health", _health, idempotent=True)


def set_runner_enabled(runner_id: str, enabled: bool) -> Call[RunnerView]:
    action = "enable" if enabled else "disable"
    return Call("POST", f"{_runner_path(runner_id)}/{action}", _runner)


def delete_runner(runner_id: str) -> Call[None]:
    return Call("DELETE", _runner_path(runner_id), _nothing, idempotent=True)
