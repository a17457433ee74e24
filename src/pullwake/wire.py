"""msgspec Structs for HTTP bodies and stream entries; encoders and decoders built once."""

from __future__ import annotations

import re
from datetime import datetime
from typing import Annotated, Any, ClassVar, Literal

import msgspec
from msgspec import Meta

from pullwake.errors import PayloadTooLarge
from pullwake.model import ID_PATTERN, PRINCIPAL_PATTERN

__all__ = [
    "MAX_SAFE_INT",
    "ClaimHeartbeatRequest",
    "ClaimHeartbeatResponse",
    "ClaimRequest",
    "DispatchPolicy",
    "DispatchView",
    "DoneRequest",
    "DoneResponse",
    "EntityCreate",
    "EntityTypePut",
    "EntityTypeView",
    "EntityView",
    "EventAppend",
    "EventView",
    "FieldError",
    "MessageView",
    "Problem",
    "ReleaseRequest",
    "RunnerHeartbeat",
    "RunnerRegister",
    "RunnerView",
    "SendRequest",
    "SendResponse",
    "SignalRequest",
    "WakeEntry",
    "WakeNotification",
    "WakeView",
    "encode_payload",
]

Id = Annotated[str, Meta(pattern=ID_PATTERN, description="[A-Za-z0-9][A-Za-z0-9._-]{0,127}")]
Label = Annotated[str, Meta(max_length=200)]
MAX_SAFE_INT = 2**53 - 1
"""Largest offset or epoch accepted: exact in every JSON implementation (JavaScript included)."""
Offset = Annotated[int, Meta(ge=0, le=MAX_SAFE_INT)]
Epoch = Annotated[int, Meta(ge=1, le=MAX_SAFE_INT)]
RunnerKind = Literal["local", "cloud-worker", "sandbox", "ci", "server"]
TagMap = Annotated[
    dict[Annotated[str, Meta(min_length=1, max_length=64)], Annotated[str, Meta(max_length=256)]],
    Meta(max_length=32),
]


class Base(msgspec.Struct, forbid_unknown_fields=True, omit_defaults=False):
    """Shared base: request bodies reject unknown fields."""

    runner_text: ClassVar[tuple[str, ...]] = ()
    """Fields of free text the runner itself produces: text Postgres cannot store is cleaned
    there, while anywhere else it is refused (see ``pullwake.text``)."""


# --- dispatch policy -------------------------------------------------------------------------


class RunnerTarget(Base, tag="runner", tag_field="type"):
    runner_id: Id


class WebhookTarget(Base, tag="webhook", tag_field="type"):
    url: Annotated[str, Meta(min_length=8, max_length=2048, pattern=r"^https?://")]
    secret: Annotated[str, Meta(min_length=16, max_length=256)] | None = None


Target = RunnerTarget | WebhookTarget


class DispatchPolicy(Base):
    """``{"targets": [target]}`` with exactly one target."""

    targets: Annotated[list[Target], Meta(min_length=1, max_length=1)]


def public_policy(policy: DispatchPolicy) -> dict[str, Any]:
    """The policy as returned to callers: webhook secrets are write-only."""
    raw: dict[str, Any] = msgspec.to_builtins(policy)
    for target in raw["targets"]:
        target.pop("secret", None)
    return raw


# --- runners ---------------------------------------------------------------------------------


class RunnerRegister(Base):
    id: Id
    label: Label = ""
    kind: RunnerKind = "local"


class RunnerView(msgspec.Struct):
    id: str
    owner_principal: str
    label: str
    kind: str
    admin_status: str
    liveness: str
    last_seen_at: datetime | None
    lease_expires_at: datetime | None
    created_at: datetime
    updated_at: datetime


Diagnostics = Annotated[dict[str, Any], Meta(max_length=64)]


class RunnerHeartbeat(Base):
    runner_text = ("diagnostics",)
    lease_ms: Annotated[int, Meta(ge=1_000, le=86_400_000)] | None = None
    diagnostics: Diagnostics | None = None


class RunnerHeartbeatResponse(msgspec.Struct):
    ok: bool
    liveness: str
    lease_expires_at: datetime


# --- entities --------------------------------------------------------------------------------


class EntityTypePut(Base):
    default_dispatch_policy: DispatchPolicy | None = None


class EntityTypeView(msgspec.Struct):
    name: str
    default_dispatch_policy: dict[str, Any] | None
    created_at: datetime
    updated_at: datetime
    owner_principal: str | None = None


class InitialMessage(Base):
    payload: Any
    idempotency_key: Annotated[str, Meta(min_length=1, max_length=200)] | None = None


Member = Annotated[
    str,
    Meta(
        pattern=rf"^(\*|{PRINCIPAL_PATTERN})(?!\n)$",
        description="a principal (kind:id) or '*' for every principal",
    ),
]


Members = Annotated[list[Member], Meta(max_length=64)]


class EntityCreate(Base):
    dispatch_policy: DispatchPolicy | None = None
    tags: TagMap | None = None
    initial_message: InitialMessage | None = None
    members: Members | None = None


class MembersPut(Base):
    members: Members


class ActiveClaimView(msgspec.Struct):
    claim_id: str
    runner_id: str | None
    epoch: int
    lease_expires_at: datetime


class DispatchView(msgspec.Struct):
    tail_offset: int
    acked_offset: int
    epoch: int
    outstanding_wake_id: str | None
    active_claim: ActiveClaimView | None
    parked_reason: str | None
    failed_attempts: int


class EntityView(msgspec.Struct):
    url: str
    type: str
    id: str
    status: str
    dispatch_policy: dict[str, Any]
    tags: dict[str, str]
    created_by: str
    created_at: datetime
    dispatch: DispatchView
    members: list[str] = msgspec.field(default_factory=list)
    send_result: SendResponse | None = None


class SendRequest(Base):
    payload: Any
    idempotency_key: Annotated[str, Meta(min_length=1, max_length=200)] | None = None


class WakeRef(msgspec.Struct, omit_defaults=True):
    id: str | None
    status: Literal["queued", "coalesced", "held"]
    reason: str | None = None


class SendResponse(msgspec.Struct):
    offset: int
    wake: WakeRef
    duplicate: bool = False


Traceparent = Annotated[
    str,
    Meta(
        pattern=r"^[0-9a-f]{2}-[0-9a-f]{32}-[0-9a-f]{16}-[0-9a-f]{2}(-[^\n]*)?(?!\n)$",
        max_length=512,
        description="a W3C trace context (traceparent), e.g. "
        "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
    ),
]


EntityPath = Annotated[
    str,
    Meta(
        pattern=r"^/[A-Za-z0-9][A-Za-z0-9._-]{0,127}/[A-Za-z0-9][A-Za-z0-9._-]{0,127}(?!\n)$",
        description="the entity's URL, /{type}/{id}",
    ),
]


class BatchItem(Base):
    entity: EntityPath
    payload: Any
    idempotency_key: Annotated[str, Meta(min_length=1, max_length=200)] | None = None
    traceparent: Traceparent | None = None
    """This message's W3C trace context; default: the request's ``traceparent`` header."""


class BatchSendRequest(Base):
    messages: Annotated[list[BatchItem], Meta(min_length=1)]


class ItemProblem(msgspec.Struct):
    status: int
    code: str
    detail: str


class BatchResult(msgspec.Struct, omit_defaults=True):
    """One item's outcome: what a single send answers, or the problem it would have raised."""

    entity: str
    offset: int | None = None
    wake: WakeRef | None = None
    duplicate: bool = False
    problem: ItemProblem | None = None


class BatchSendResponse(msgspec.Struct):
    results: list[BatchResult]


class MessageView(msgspec.Struct, omit_defaults=True):
    offset: int
    payload: Any
    sender: str
    created_at: datetime
    traceparent: str | None = None
    """The W3C trace context the send carried (absent when it carried none)."""


class MessagePage(msgspec.Struct):
    messages: list[MessageView]
    next_after: int
    tail_offset: int
    more: bool


class EventAppend(Base):
    payload: Any
    epoch: Epoch | None = None


class EventView(msgspec.Struct):
    offset: int
    payload: Any
    sender: str
    claim_id: str | None
    created_at: datetime


class EventPage(msgspec.Struct):
    events: list[EventView]
    next_after: int
    more: bool


class OffsetResponse(msgspec.Struct):
    offset: int


class SignalRequest(Base):
    signal: Literal["pause", "resume", "stop", "kill"]


# --- wakes and claims ------------------------------------------------------------------------


class WakeEntry(msgspec.Struct):
    """A wake as carried in the runner stream and the SSE ``data:`` line."""

    wake_id: str
    entity: str
    epoch: int
    reason: str
    created_at: str


class WakeView(msgspec.Struct):
    id: str
    entity_url: str
    epoch: int
    target: dict[str, Any]
    runner_id: str | None
    reason: str
    delivery_status: str
    claim_status: str
    stream_entry_id: str | None
    attempts: int
    last_error: str | None
    created_at: datetime
    delivered_at: datetime | None
    claimed_at: datetime | None
    resolved_at: datetime | None


class ClaimRequest(Base):
    wake_id: Annotated[str, Meta(min_length=1, max_length=64)]
    entry_id: Annotated[str, Meta(pattern=r"^\d{1,20}-\d{1,20}(?!\n)$")] | None = None


class NotificationEntity(msgspec.Struct):
    url: str
    type: str
    id: str
    status: str
    tags: dict[str, str]
    created_by: str


class Callbacks(msgspec.Struct):
    heartbeat: str
    done: str
    release: str
    events: str
    messages: str


class WakeNotification(msgspec.Struct):
    claim_id: str
    wake_id: str
    epoch: int
    claim_token: str
    lease_ms: int
    lease_expires_at: datetime
    entity: NotificationEntity
    acked_offset: int
    tail_offset: int
    messages: list[MessageView]
    more_messages: bool
    callbacks: Callbacks


class ClaimDone(msgspec.Struct):
    """Claim answer for an entity that must not run (paused, stopped, killed)."""

    done: bool
    reason: str


class ClaimHeartbeatRequest(Base):
    epoch: Epoch


class ClaimHeartbeatResponse(msgspec.Struct):
    ok: bool
    lease_expires_at: datetime
    entity_status: str


class DoneRequest(Base):
    epoch: Epoch
    acked_offset: Offset
    claim_next: bool = False


class DoneResponse(msgspec.Struct, omit_defaults=True):
    ok: bool
    next_wake: bool
    next_claim: WakeNotification | None = None
    """With ``claim_next`` and work still pending: the follow-up claim itself, for the same
    holder (no wake goes through the stream)."""


class ReleaseRequest(Base):
    runner_text = ("error",)
    epoch: Epoch
    error: Annotated[str, Meta(max_length=2000)] | None = None


class ReleaseResponse(msgspec.Struct):
    ok: bool
    next_wake: bool


class FieldError(msgspec.Struct):
    """One invalid value of a request, as every ``errors[]`` item is shaped."""

    message: Annotated[str, Meta(description="what is wrong with the value")]
    key: Annotated[
        str,
        Meta(
            description="where the value is: a body field path such as `messages[2].entity`, "
            "a query or path parameter or header name; empty for the body as a whole"
        ),
    ]
    source: Annotated[
        Literal["body", "query", "path", "header", "cookie"],
        Meta(description="which part of the request holds the value"),
    ]


class Problem(msgspec.Struct, omit_defaults=True):
    """RFC 9457 problem details with pullwake's stable ``code``."""

    type: str
    title: str
    status: int
    detail: str
    code: Annotated[str, Meta(description="stable machine-readable error code")]
    errors: (
        Annotated[
            list[FieldError], Meta(description="the invalid values, for a 400 that names them")
        ]
        | None
    ) = None
    extra: (
        Annotated[
            dict[str, Any],
            Meta(description="context, such as claim_id, acked_offset, tail_offset, retry_after_s"),
        ]
        | None
    ) = None


json_encoder = msgspec.json.Encoder()
policy_decoder = msgspec.json.Decoder(DispatchPolicy)


MAX_JSON_DEPTH = 64
"""Deepest nesting of arrays and objects accepted in a request body. Far below the point where
decoding or encoding would recurse out of the stack (about 1000 levels): one stored message
nested that deep would break every read of its inbox."""

_JSON_STRING = re.compile(rb'"(?:[^"\\]|\\.)*"')
_NOT_BRACKETS = bytes(b for b in range(256) if b not in b"[]{}")


def json_too_deep(body: bytes, limit: int = MAX_JSON_DEPTH) -> bool:
    """Whether the JSON text ``body`` nests arrays/objects deeper than ``limit``."""
    if body.count(b"[") + body.count(b"{") <= limit:
        return False
    depth = 0
    for char in _JSON_STRING.sub(b"", body).translate(None, _NOT_BRACKETS):
        depth += 1 if char in b"[{" else -1
        if depth > limit:
            return True
    return False


def encode_payload(payload: Any, limit_bytes: int) -> bytes:
    """The payload as JSON, or 413 ``PAYLOAD_TOO_LARGE`` past ``PULLWAKE_MAX_PAYLOAD_BYTES``."""
    encoded = json_encoder.encode(payload)
    if len(encoded) > limit_bytes:
        raise PayloadTooLarge(
            f"payload is {len(encoded)} bytes; the limit is {limit_bytes} "
            "(PULLWAKE_MAX_PAYLOAD_BYTES)"
        )
    return encoded
