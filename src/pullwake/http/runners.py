"""Runner routes: registration, liveness, health, admin status, wake stream and claim."""

from __future__ import annotations

import logging
import secrets
import time
from typing import Annotated, Any

from litestar import Request, Response, delete, get, post
from litestar.openapi.datastructures import ResponseSpec
from litestar.params import JSONBody, Parameter

from pullwake.core.claims import NoWork
from pullwake.errors import PullwakeError, RunnerDisabled
from pullwake.http.auth import bearer, request_since, resolve_principal
from pullwake.http.deps import NO_HTTP_METRICS, IdParam, PrincipalDep, ServicesDep
from pullwake.http.docs import (
    API_TOKEN,
    OptionalBody,
    PullwakeOperation,
    problems,
    success,
)
from pullwake.http.wakestream import MEDIA_TYPE, WakeStream
from pullwake.model import ID_PATTERN, AdminStatus, Principal, hash_token
from pullwake.streams.audit import Credential
from pullwake.wire import (
    ClaimDone,
    ClaimRequest,
    RunnerHeartbeat,
    RunnerHeartbeatResponse,
    RunnerRegister,
    RunnerView,
    WakeNotification,
)

__all__ = ["runner_routes"]

log = logging.getLogger(__name__)


@post(
    "/runners",
    status_code=201,
    summary="Register or update a runner",
    responses={
        **success(200, RunnerView, "the runner existed: updated"),
        **problems(403, body=True),
    },
    operation_id="registerRunner",
    description=(
        "Registers the runner `id` with the caller as its owner, or updates the label and "
        "kind of the caller's own runner. An id owned by another principal (even one it "
        "deleted: ids are reserved) is 403 FORBIDDEN, and so is a new runner past "
        "PULLWAKE_MAX_RUNNERS_PER_PRINCIPAL. Never re-enables a disabled runner."
    ),
    security=API_TOKEN,
    operation_class=PullwakeOperation,
)
async def register_runner(
    data: JSONBody[RunnerRegister], services: ServicesDep, principal: PrincipalDep
) -> Response[RunnerView]:
    view, created = await services.runners.register(principal, data)
    return Response(view, status_code=201 if created else 200)


@get(
    "/runners",
    summary="List the caller's runners",
    responses=problems(),
    operation_id="listRunners",
    description="The runners the caller owns.",
    security=API_TOKEN,
    operation_class=PullwakeOperation,
)
async def list_runners(
    services: ServicesDep, principal: PrincipalDep
) -> dict[str, list[RunnerView]]:
    return {"runners": await services.runners.list_owned(principal)}


@get(
    "/runners/{runner_id:str}",
    summary="One runner",
    responses=problems(403, 404),
    operation_id="getRunner",
    description="One of the caller's runners: admin status, liveness and lease.",
    security=API_TOKEN,
    operation_class=PullwakeOperation,
)
async def get_runner(
    runner_id: IdParam, services: ServicesDep, principal: PrincipalDep
) -> RunnerView:
    return await services.runners.get(principal, runner_id)


@post(
    "/runners/{runner_id:str}/heartbeat",
    status_code=200,
    summary="Extend runner liveness",
    responses=problems(403, 404, body=True),
    operation_class=OptionalBody,
    operation_id="heartbeatRunner",
    description=(
        "Marks the runner alive for `lease_ms` (default PULLWAKE_RUNNER_LEASE_MS, capped by "
        "PULLWAKE_MAX_RUNNER_LEASE_MS) and stores its sanitized diagnostics."
    ),
    security=API_TOKEN,
)
async def runner_heartbeat(
    request: Request[Any, Any, Any],
    runner_id: IdParam,
    services: ServicesDep,
    principal: PrincipalDep,
    data: JSONBody[RunnerHeartbeat | None] = None,
) -> RunnerHeartbeatResponse:
    return await services.runners.heartbeat(
        principal, runner_id, data or RunnerHeartbeat(), since=request_since(request)
    )


@get(
    "/runners/{runner_id:str}/health",
    summary="Liveness, backlog and verdict",
    responses=problems(403, 404),
    operation_id="getRunnerHealth",
    description=(
        "Liveness, active claims, backlog (outstanding and undelivered wakes, parked "
        "entities, the oldest outstanding age, stream length and pending entries) and a "
        "verdict: healthy, degraded or unhealthy with its issues."
    ),
    security=API_TOKEN,
    operation_class=PullwakeOperation,
)
async def runner_health(
    runner_id: IdParam, services: ServicesDep, principal: PrincipalDep
) -> dict[str, Any]:
    return await services.runners.health(principal, runner_id)


@post(
    "/runners/{runner_id:str}/enable",
    status_code=200,
    summary="Enable a runner",
    responses=problems(403, 404),
    operation_id="enableRunner",
    description="Enables the runner and re-publishes its outstanding wakes.",
    security=API_TOKEN,
    operation_class=PullwakeOperation,
)
async def enable_runner(
    runner_id: IdParam, services: ServicesDep, principal: PrincipalDep
) -> RunnerView:
    return await services.runners.set_admin_status(principal, runner_id, AdminStatus.ENABLED)


@post(
    "/runners/{runner_id:str}/disable",
    status_code=200,
    summary="Disable a runner",
    responses=problems(403, 404),
    operation_id="disableRunner",
    description=(
        "Disables the runner: its wakes wait, new wake streams and claims get 409 RUNNER_DISABLED."
    ),
    security=API_TOKEN,
    operation_class=PullwakeOperation,
)
async def disable_runner(
    runner_id: IdParam, services: ServicesDep, principal: PrincipalDep
) -> RunnerView:
    return await services.runners.set_admin_status(principal, runner_id, AdminStatus.DISABLED)


@delete(
    "/runners/{runner_id:str}",
    status_code=204,
    summary="Deregister a runner",
    responses=problems(403, 404),
    operation_id="deleteRunner",
    description=(
        "Deregisters the runner: releases its active claims, retires its outstanding wakes "
        "and deletes its stream. The id stays reserved for its owner."
    ),
    security=API_TOKEN,
    operation_class=PullwakeOperation,
)
async def delete_runner(runner_id: IdParam, services: ServicesDep, principal: PrincipalDep) -> None:
    await services.runners.delete(principal, runner_id)


@get(
    "/runners/{runner_id:str}/wakes",
    summary="Server-Sent Events stream of wakes",
    responses={
        200: ResponseSpec(
            data_container=str,
            media_type=MEDIA_TYPE,
            description="``wake`` events (``id`` is the stream entry id, ``data`` the wake as "
            "JSON), a ``: keep-alive`` comment when idle; LF line endings",
            generate_examples=False,
        ),
        **problems(403, 404, 409, 429),
    },
    operation_id="streamWakes",
    opt={NO_HTTP_METRICS: True},
    description=(
        "A Server-Sent Events stream of the runner's wakes (`event: wake`, `id:` the stream "
        "entry id, `data:` the wake as JSON), with a `: keep-alive` comment when idle. A "
        "named `session` gets its own pending entries first. 429 past the open streams "
        "allowed per runner or per principal; the stream ends when the server shuts down or "
        "the caller's token is revoked."
    ),
    security=API_TOKEN,
    operation_class=PullwakeOperation,
)
async def runner_wakes(
    request: Request[Any, Any, Any],
    runner_id: IdParam,
    services: ServicesDep,
    principal: PrincipalDep,
    session: Annotated[str | None, Parameter(pattern=ID_PATTERN, max_length=128)] = None,
) -> WakeStream:
    access = await services.runners.access(principal, runner_id, since=request_since(request))
    if not access.enabled:
        raise RunnerDisabled(f"runner {runner_id!r} is disabled")
    consumer = session or f"s-{secrets.token_hex(8)}"
    slot = await services.limits.open_sse(runner_id, consumer, principal)
    try:
        await services.streams.ensure_group(runner_id)
    except BaseException:
        await slot.close()
        raise
    credential = _credential(request, services, principal)
    return WakeStream(services, runner_id, consumer, slot, credential)


def _credential(
    request: Request[Any, Any, Any], services: ServicesDep, principal: Principal
) -> Credential:
    """How the wake reader re-checks the caller once per keep-alive interval: its API token in
    one lookup with every other session's, or the host's hook asked again."""
    if services.authenticate is not None:

        async def recheck() -> str | None:
            try:
                caller = await resolve_principal(
                    request,
                    services.tokens,
                    services.settings,
                    services.authenticate,
                    since=time.monotonic_ns(),  # now, not when the stream was opened
                )
            except PullwakeError as exc:
                return exc.detail
            return None if caller.key == principal.key else "the caller changed"

        return Credential(principal.key, recheck=recheck)
    token = bearer(request)
    if token is not None and token.startswith("pwk_"):
        return Credential(principal.key, token_hash=hash_token(token))
    return Credential(principal.key)  # dev mode's asserted identity: the runner is checked


@post(
    "/runners/{runner_id:str}/claim",
    status_code=200,
    summary="Claim a wake",
    responses={
        **success(204, None, "no pending work: nothing to do (the stream entry was acked)"),
        **problems(403, 404, 409, body=True),
    },
    operation_id="claimWake",
    description=(
        "Claims the wake for the runner: 200 with the wake notification (claim token, lease, "
        'the inbox batch and the callback URLs), 200 `{"done": true}` for a paused, stopped '
        "or killed entity, 204 when there is nothing to do; 409 ALREADY_CLAIMED while another"
        " claim holds the entity."
    ),
    security=API_TOKEN,
    operation_class=PullwakeOperation,
)
async def claim_wake(
    request: Request[Any, Any, Any],
    runner_id: IdParam,
    data: JSONBody[ClaimRequest],
    services: ServicesDep,
    principal: PrincipalDep,
) -> Response[WakeNotification | ClaimDone | None]:
    """200 with the wake notification, or ``{"done": true}`` for a paused/stopped entity."""
    access = await services.runners.access(principal, runner_id, since=request_since(request))
    if not access.enabled:
        await services.claims.ack_entry(runner_id, data.entry_id)
        raise RunnerDisabled(f"runner {runner_id!r} is disabled")
    outcome = await services.claims.claim(
        runner_id, data.wake_id, data.entry_id, owner=access.owner_principal
    )
    if isinstance(outcome, NoWork):
        return Response(None, status_code=204)
    if isinstance(outcome, ClaimDone):
        return Response(outcome, status_code=200)
    return Response(outcome, status_code=200, headers={"Cache-Control": "no-store"})


runner_routes = [
    register_runner,
    list_runners,
    get_runner,
    runner_heartbeat,
    runner_health,
    enable_runner,
    disable_runner,
    delete_runner,
    runner_wakes,
    claim_wake,
]
