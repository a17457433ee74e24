"""Runner routes: registration, liveness, health, admin status, wake stream and claim."""

from __future__ import annotations

import logging
import secrets
import time
from collections.abc import AsyncIterator
from typing import Annotated, Any

from litestar import Response, delete, get, post
from litestar.params import JSONBody, Parameter
from litestar.response import ServerSentEvent, ServerSentEventMessage
from redis.exceptions import RedisError

from pullwake.claims import NoWork
from pullwake.errors import RunnerDisabled
from pullwake.http.deps import IdParam, PrincipalDep, ServicesDep
from pullwake.model import ID_PATTERN, AdminStatus
from pullwake.wire import (
    ClaimDone,
    ClaimRequest,
    RunnerHeartbeat,
    RunnerHeartbeatResponse,
    RunnerRegister,
    RunnerView,
    WakeNotification,
    json_encoder,
)

__all__ = ["runner_routes"]

log = logging.getLogger(__name__)


@post("/runners", status_code=201, summary="Register or update a runner")
async def register_runner(
    data: JSONBody[RunnerRegister], services: ServicesDep, principal: PrincipalDep
) -> Response[RunnerView]:
    view, created = await services.registry.register(principal, data)
    return Response(view, status_code=201 if created else 200)


@get("/runners", summary="List the caller's runners")
async def list_runners(
    services: ServicesDep, principal: PrincipalDep
) -> dict[str, list[RunnerView]]:
    return {"runners": await services.registry.list_owned(principal)}


@get("/runners/{runner_id:str}", summary="One runner")
async def get_runner(
    runner_id: IdParam, services: ServicesDep, principal: PrincipalDep
) -> RunnerView:
    return await services.registry.get(principal, runner_id)


@post("/runners/{runner_id:str}/heartbeat", status_code=200, summary="Extend runner liveness")
async def runner_heartbeat(
    runner_id: IdParam,
    services: ServicesDep,
    principal: PrincipalDep,
    data: JSONBody[RunnerHeartbeat | None] = None,
) -> RunnerHeartbeatResponse:
    return await services.registry.heartbeat(principal, runner_id, data or RunnerHeartbeat())


@get("/runners/{runner_id:str}/health", summary="Liveness, backlog and verdict")
async def runner_health(
    runner_id: IdParam, services: ServicesDep, principal: PrincipalDep
) -> dict[str, Any]:
    return await services.registry.health(principal, runner_id)


@post("/runners/{runner_id:str}/enable", status_code=200, summary="Enable a runner")
async def enable_runner(
    runner_id: IdParam, services: ServicesDep, principal: PrincipalDep
) -> RunnerView:
    return await services.registry.set_admin_status(principal, runner_id, AdminStatus.ENABLED)


@post("/runners/{runner_id:str}/disable", status_code=200, summary="Disable a runner")
async def disable_runner(
    runner_id: IdParam, services: ServicesDep, principal: PrincipalDep
) -> RunnerView:
    return await services.registry.set_admin_status(principal, runner_id, AdminStatus.DISABLED)


@delete("/runners/{runner_id:str}", status_code=204, summary="Deregister a runner")
async def delete_runner(runner_id: IdParam, services: ServicesDep, principal: PrincipalDep) -> None:
    await services.registry.delete(principal, runner_id)


@get("/runners/{runner_id:str}/wakes", summary="Server-Sent Events stream of wakes")
async def runner_wakes(
    runner_id: IdParam,
    services: ServicesDep,
    principal: PrincipalDep,
    session: Annotated[str | None, Parameter(pattern=ID_PATTERN, max_length=128)] = None,
) -> ServerSentEvent:
    row = await services.registry.owned(principal, runner_id)
    if row["admin_status"] != AdminStatus.ENABLED.value:
        raise RunnerDisabled(f"runner {runner_id!r} is disabled")
    consumer = session or f"s-{secrets.token_hex(8)}"
    await services.streams.ensure_group(runner_id)
    return ServerSentEvent(
        _wake_events(services, runner_id, consumer),
        headers={"Cache-Control": "no-store", "X-Accel-Buffering": "no"},
    )


async def _wake_events(
    services: ServicesDep, runner_id: str, consumer: str
) -> AsyncIterator[ServerSentEventMessage]:
    """This session's own pending entries first, then new ones; comments keep the line alive."""
    streams = services.streams
    keepalive_s = services.settings.sse_keepalive_ms / 1000
    yield ServerSentEventMessage(data=None, comment=f"connected session={consumer}", retry=1000)
    log.info("runner %s session %s connected to its wake stream", runner_id, consumer)
    last_write = time.monotonic()
    own_pending = True
    try:
        while True:
            entries = await streams.read(
                runner_id,
                consumer,
                own_pending=own_pending,
                count=100,
                block_ms=services.settings.sse_block_ms,
            )
            own_pending = False
            for entry_id, entry in entries:
                yield ServerSentEventMessage(
                    data=json_encoder.encode(entry).decode(), event="wake", id=entry_id
                )
                last_write = time.monotonic()
            if not entries and time.monotonic() - last_write >= keepalive_s:
                yield ServerSentEventMessage(data=None, comment="keep-alive")
                last_write = time.monotonic()
    except (RedisError, OSError) as exc:
        log.warning("wake stream of runner %s ended: %s", runner_id, exc)
    finally:
        log.info("runner %s session %s disconnected", runner_id, consumer)


@post("/runners/{runner_id:str}/claim", status_code=200, summary="Claim a wake")
async def claim_wake(
    runner_id: IdParam,
    data: JSONBody[ClaimRequest],
    services: ServicesDep,
    principal: PrincipalDep,
) -> Response[Any]:
    row = await services.registry.owned(principal, runner_id)
    if row["admin_status"] != AdminStatus.ENABLED.value:
        await services.claims.ack_entry(runner_id, data.entry_id)
        raise RunnerDisabled(f"runner {runner_id!r} is disabled")
    outcome = await services.claims.claim(runner_id, data.wake_id, data.entry_id)
    if isinstance(outcome, NoWork):
        return Response(None, status_code=204)
    if isinstance(outcome, ClaimDone):
        return Response(outcome, status_code=200)
    return Response(outcome, status_code=200, headers={"Cache-Control": "no-store"})


_ = WakeNotification  # documented response shape of claim_wake

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
