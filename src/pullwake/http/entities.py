"""Entity type, entity, inbox, events and signal routes."""

from __future__ import annotations

from typing import Annotated, Any

from litestar import Request, Response, get, post, put
from litestar.params import HeaderParameter, JSONBody, Parameter

from pullwake.config import PAGE_LIMIT_CEILING
from pullwake.core.entities import ClaimReader, Reader
from pullwake.errors import Forbidden, InvalidRequest
from pullwake.http.auth import bearer, claim_token
from pullwake.http.deps import IdParam, PrincipalDep, ServicesDep, provide_principal
from pullwake.http.docs import (
    API_TOKEN,
    CLAIM_TOKEN,
    EITHER_TOKEN,
    OptionalBody,
    PullwakeOperation,
    problems,
    success,
)
from pullwake.model import Signal, entity_url
from pullwake.tracing import send_trace
from pullwake.wire import (
    MAX_SAFE_INT,
    BatchSendRequest,
    BatchSendResponse,
    EntityCreate,
    EntityTypePut,
    EntityTypeView,
    EntityView,
    EventAppend,
    EventPage,
    FieldError,
    MembersPut,
    MessagePage,
    OffsetResponse,
    SendRequest,
    SendResponse,
    SignalRequest,
)

__all__ = ["entity_routes"]

TraceHeader = Annotated[
    str | None,
    HeaderParameter(
        name="traceparent",
        required=False,
        description="W3C trace context of the send (OpenTelemetry): kept with the message and "
        "handed to its claim, whose span joins this trace. An invalid value is ignored.",
    ),
]

After = Annotated[
    int, Parameter(ge=0, le=MAX_SAFE_INT, description="return items after this offset")
]
Limit = Annotated[
    int,
    Parameter(
        ge=1,
        le=PAGE_LIMIT_CEILING,
        description="page size, at most PULLWAKE_PAGE_LIMIT_MAX (default 1000)",
    ),
]


def _limit(services: ServicesDep, limit: int) -> int:
    if limit > services.settings.page_limit_max:
        raise InvalidRequest(
            f"limit {limit} exceeds the maximum page size {services.settings.page_limit_max}",
            errors=[FieldError(message="too large", key="limit", source="query")],
        )
    return limit


@put(
    "/entity-types/{name:str}",
    status_code=200,
    summary="Create or update an entity type",
    responses={**success(201, EntityTypeView, "created"), **problems(403, body=True)},
    operation_class=OptionalBody,
    operation_id="putEntityType",
    description=(
        "Creates the entity type with the caller as its owner, or updates the owner's type: "
        "its default dispatch policy applies to the entities its owner creates without one. "
        "Another principal's type is 403 FORBIDDEN."
    ),
    security=API_TOKEN,
)
async def put_entity_type(
    name: IdParam,
    services: ServicesDep,
    principal: PrincipalDep,
    data: JSONBody[EntityTypePut | None] = None,
) -> Response[EntityTypeView]:
    body = data or EntityTypePut()
    view, created = await services.entity_types.put(principal, name, body.default_dispatch_policy)
    return Response(view, status_code=201 if created else 200)


@get(
    "/entity-types/{name:str}",
    summary="One entity type",
    responses=problems(403, 404),
    operation_id="getEntityType",
    description="One of the caller's entity types (webhook secrets are never returned).",
    security=API_TOKEN,
    operation_class=PullwakeOperation,
)
async def get_entity_type(
    name: IdParam, services: ServicesDep, principal: PrincipalDep
) -> EntityTypeView:
    return await services.entity_types.get(principal, name)


@put(
    "/entities/{type_name:str}/{entity_id:str}",
    status_code=201,
    summary="Create an entity",
    responses={
        **success(200, EntityView, "the entity existed: unchanged"),
        **problems(403, 404, 409, 429, body=True),
    },
    operation_class=OptionalBody,
    operation_id="createEntity",
    description=(
        "Creates the entity with the caller as its creator (201), or answers an existing one "
        "unchanged (200). Without a dispatch policy the type's default applies if the caller "
        "owns the type. A runner target must be the caller's (403) and enabled (409 "
        "RUNNER_DISABLED). An initial message counts against the send rate."
    ),
    security=API_TOKEN,
)
async def create_entity(
    type_name: IdParam,
    entity_id: IdParam,
    services: ServicesDep,
    principal: PrincipalDep,
    data: JSONBody[EntityCreate | None] = None,
) -> Response[EntityView]:
    body = data or EntityCreate()
    if body.initial_message is not None:
        await services.limits.check_send(principal)
    view, created = await services.dispatcher.create_entity(principal, type_name, entity_id, body)
    return Response(view, status_code=201 if created else 200)


@get(
    "/entities/{type_name:str}/{entity_id:str}",
    summary="Entity with its dispatch state",
    responses=problems(403, 404),
    operation_id="getEntity",
    description=(
        "The entity, its members and its dispatch state (offsets, epoch, the outstanding wake"
        " and the active claim)."
    ),
    security=API_TOKEN,
    operation_class=PullwakeOperation,
)
async def get_entity(
    type_name: IdParam, entity_id: IdParam, services: ServicesDep, principal: PrincipalDep
) -> EntityView:
    return await services.dispatcher.get_entity(entity_url(type_name, entity_id), principal)


@post(
    "/entities/{type_name:str}/{entity_id:str}/messages",
    status_code=202,
    summary="Send a message (wakes or coalesces)",
    responses=problems(403, 404, 409, 429, body=True),
    operation_id="sendMessage",
    description=(
        "Appends the payload to the entity's inbox and wakes its target, or coalesces into "
        "the outstanding wake. The same idempotency key with the same JSON value answers the "
        "first send again (`duplicate: true`); with another payload it is 409 "
        "IDEMPOTENCY_MISMATCH. 429 RATE_LIMITED past the caller's send rate. A `traceparent` "
        "header is kept with the message for its claim's trace."
    ),
    security=API_TOKEN,
    operation_class=PullwakeOperation,
)
async def send_message(
    type_name: IdParam,
    entity_id: IdParam,
    data: JSONBody[SendRequest],
    services: ServicesDep,
    principal: PrincipalDep,
    traceparent: TraceHeader = None,
) -> SendResponse:
    await services.limits.check_send(principal)
    url = entity_url(type_name, entity_id)
    return await services.dispatcher.send(
        principal, url, data.payload, data.idempotency_key, traceparent=send_trace(traceparent)
    )


@post(
    "/messages",
    status_code=200,
    summary="Send a batch of messages to any entities (one result per item)",
    responses=problems(429, body=True),
    operation_id="sendMessages",
    description=(
        "Sends up to PULLWAKE_MAX_BATCH messages to any entities in one Postgres round trip, "
        "in order per entity. Each item answers what a single send would, or carries its own "
        "`problem` (not found, forbidden, not runnable, an idempotency mismatch, too large); "
        "the batch as a whole is refused only when invalid, too long or over the send rate."
    ),
    security=API_TOKEN,
    operation_class=PullwakeOperation,
)
async def send_batch(
    data: JSONBody[BatchSendRequest],
    services: ServicesDep,
    principal: PrincipalDep,
    traceparent: TraceHeader = None,
) -> BatchSendResponse:
    """Items fail on their own (``problem``: not found, not a member, not runnable, too large);
    the batch as a whole is refused only when invalid, too long or over the send rate. An
    item's own ``traceparent`` wins over the request's."""
    services.batch.check_size(len(data.messages))
    await services.limits.check_send(principal, len(data.messages))
    trace = send_trace(traceparent)
    return BatchSendResponse(await services.batch.send(principal, data.messages, trace=trace))


@get(
    "/entities/{type_name:str}/{entity_id:str}/messages",
    summary="Page the inbox (members, or the entity's live claim token)",
    responses=problems(403, 404, 409),
    operation_id="listMessages",
    description=(
        "A page of the entity's inbox after offset `after`, for its members or the live claim"
        " token of its active claim (409 LEASE_EXPIRED once that claim's lease passed)."
    ),
    security=EITHER_TOKEN,
    operation_class=PullwakeOperation,
)
async def list_messages(
    request: Request[Any, Any, Any],
    type_name: IdParam,
    entity_id: IdParam,
    services: ServicesDep,
    after: After = 0,
    limit: Limit = 100,
) -> MessagePage:
    url = entity_url(type_name, entity_id)
    reader = await _reader(request, services, url)
    return await services.dispatcher.list_messages(url, after, _limit(services, limit), reader)


async def _reader(request: Request[Any, Any, Any], services: ServicesDep, url: str) -> Reader:
    """A member's principal, or the live claim token of this entity's active claim."""
    token = bearer(request)
    if token is not None and token.startswith("pwc_"):
        claim_id, claim_url = await services.callbacks.live_claim_of(token)
        if claim_url != url:
            raise Forbidden(f"this claim token does not cover {url}")
        return ClaimReader(claim_id)
    return await provide_principal(request, services)


@post(
    "/entities/{type_name:str}/{entity_id:str}/events",
    status_code=201,
    summary="Append an event (claim token, fenced)",
    responses=problems(403, 404, 409, body=True),
    operation_id="appendEvent",
    description=(
        "Appends an event to the entity's events log, with the live claim token of its active"
        " claim; a stale holder gets 409 FENCED."
    ),
    security=CLAIM_TOKEN,
    operation_class=PullwakeOperation,
)
async def append_event(
    request: Request[Any, Any, Any],
    type_name: IdParam,
    entity_id: IdParam,
    data: JSONBody[EventAppend],
    services: ServicesDep,
) -> OffsetResponse:
    token = claim_token(request)
    url = entity_url(type_name, entity_id)
    offset = await services.callbacks.append_event(token, url, data.payload, data.epoch)
    return OffsetResponse(offset)


@get(
    "/entities/{type_name:str}/{entity_id:str}/events",
    summary="Page the events log (members, or the entity's live claim token)",
    responses=problems(403, 404, 409),
    operation_id="listEvents",
    description=(
        "A page of the entity's events log after offset `after`, for its members or the live "
        "claim token of its active claim."
    ),
    security=EITHER_TOKEN,
    operation_class=PullwakeOperation,
)
async def list_events(
    request: Request[Any, Any, Any],
    type_name: IdParam,
    entity_id: IdParam,
    services: ServicesDep,
    after: After = 0,
    limit: Limit = 100,
) -> EventPage:
    url = entity_url(type_name, entity_id)
    reader = await _reader(request, services, url)
    return await services.dispatcher.list_events(url, after, _limit(services, limit), reader)


@post(
    "/entities/{type_name:str}/{entity_id:str}/signal",
    status_code=200,
    summary="pause | resume | stop | kill",
    responses=problems(403, 404, 409, body=True),
    operation_id="signalEntity",
    description=(
        "pause, resume, stop or kill the entity; only its creator may. A signal outside those"
        " four is 400 naming them."
    ),
    security=API_TOKEN,
    operation_class=PullwakeOperation,
)
async def signal_entity(
    type_name: IdParam,
    entity_id: IdParam,
    data: JSONBody[SignalRequest],
    services: ServicesDep,
    principal: PrincipalDep,
) -> EntityView:
    url = entity_url(type_name, entity_id)
    return await services.dispatcher.signal(principal, url, Signal(data.signal))


@put(
    "/entities/{type_name:str}/{entity_id:str}/members",
    status_code=200,
    summary="Replace the principals an entity grants (creator only)",
    responses=problems(403, 404, body=True),
    operation_id="setMembers",
    description=(
        "Replaces the principals (or `*`, everyone) that may read and send to the entity "
        "besides its creator; only the creator may."
    ),
    security=API_TOKEN,
    operation_class=PullwakeOperation,
)
async def put_members(
    type_name: IdParam,
    entity_id: IdParam,
    data: JSONBody[MembersPut],
    services: ServicesDep,
    principal: PrincipalDep,
) -> EntityView:
    url = entity_url(type_name, entity_id)
    return await services.dispatcher.set_members(principal, url, data.members)


entity_routes = [
    put_entity_type,
    get_entity_type,
    create_entity,
    get_entity,
    send_message,
    send_batch,
    list_messages,
    append_event,
    list_events,
    signal_entity,
    put_members,
]
