"""Claim callbacks (claim token) and the wake audit view."""

from __future__ import annotations

from typing import Annotated, Any

from litestar import Request, Response, get, post
from litestar.params import JSONBody, Parameter

from pullwake.http.auth import claim_token
from pullwake.http.deps import PrincipalDep, ServicesDep
from pullwake.http.docs import API_TOKEN, CLAIM_TOKEN, PullwakeOperation, problems
from pullwake.wire import (
    ClaimHeartbeatRequest,
    ClaimHeartbeatResponse,
    DoneRequest,
    DoneResponse,
    ReleaseRequest,
    ReleaseResponse,
    WakeView,
)

__all__ = ["claim_routes"]

ClaimId = Annotated[str, Parameter(pattern=r"^wk_[0-9a-f]{12,40}(?!\n)$", max_length=64)]


@post(
    "/claims/{claim_id:str}/heartbeat",
    status_code=200,
    summary="Extend a claim's lease",
    responses=problems(403, 404, 409, body=True),
    operation_id="heartbeatClaim",
    description=(
        "Extends the claim's lease; 409 FENCED for a stale epoch or an ended claim, "
        "LEASE_EXPIRED once its lease passed."
    ),
    security=CLAIM_TOKEN,
    operation_class=PullwakeOperation,
)
async def claim_heartbeat(
    request: Request[Any, Any, Any],
    claim_id: ClaimId,
    data: JSONBody[ClaimHeartbeatRequest],
    services: ServicesDep,
) -> ClaimHeartbeatResponse:
    expires, status = await services.callbacks.heartbeat(claim_id, claim_token(request), data.epoch)
    return ClaimHeartbeatResponse(ok=True, lease_expires_at=expires, entity_status=status)


@post(
    "/claims/{claim_id:str}/done",
    status_code=200,
    summary="Finish a claim and ack",
    responses=problems(403, 404, 409, body=True),
    operation_id="completeClaim",
    description=(
        "Ends the claim, acknowledging the inbox up to `acked_offset`. With `claim_next: "
        "true` and work still pending, the answer holds the follow-up claim itself "
        "(`next_claim`) instead of a new wake."
    ),
    security=CLAIM_TOKEN,
    operation_class=PullwakeOperation,
)
async def claim_done(
    request: Request[Any, Any, Any],
    claim_id: ClaimId,
    data: JSONBody[DoneRequest],
    services: ServicesDep,
) -> Response[DoneResponse]:
    answer = await services.callbacks.done(
        claim_id, claim_token(request), data.epoch, data.acked_offset, claim_next=data.claim_next
    )
    # A chained claim carries its token: like a claim's answer, never cached.
    headers = {"Cache-Control": "no-store"} if answer.next_claim is not None else None
    return Response(answer, headers=headers)


@post(
    "/claims/{claim_id:str}/release",
    status_code=200,
    summary="Give a claim up",
    responses=problems(403, 404, 409, body=True),
    operation_id="releaseClaim",
    description="Gives the claim up without acknowledging; its work is woken again (`released`).",
    security=CLAIM_TOKEN,
    operation_class=PullwakeOperation,
)
async def claim_release(
    request: Request[Any, Any, Any],
    claim_id: ClaimId,
    data: JSONBody[ReleaseRequest],
    services: ServicesDep,
) -> ReleaseResponse:
    return await services.callbacks.release(claim_id, claim_token(request), data.epoch, data.error)


@get(
    "/wakes/{wake_id:str}",
    summary="A wake (audit log)",
    responses=problems(403, 404),
    operation_id="getWake",
    description=(
        "One wake row, for an audit: its reason, status, target and timestamps (webhook "
        "secrets are never returned)."
    ),
    security=API_TOKEN,
    operation_class=PullwakeOperation,
)
async def get_wake(wake_id: ClaimId, services: ServicesDep, principal: PrincipalDep) -> WakeView:
    return await services.dispatcher.get_wake(wake_id, principal)


claim_routes = [claim_heartbeat, claim_done, claim_release, get_wake]
