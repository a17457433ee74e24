"""Runner routes: registration, liveness, health, admin status, wake stream and claim."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Annotated, Any

from litestar import Request, Response, delete, get, post
from litestar.params import JSONBody, Parameter
from litestar.response import ServerSentEvent, ServerSentEventMessage
from redis.exceptions import RedisError

from pullwake.core.claims import NoWork
from pullwake.errors import PullwakeError, RunnerDisabled
from pullwake.http.auth import request_since, resolve_principal
from pullwake.http.deps import IdParam, PrincipalDep, ServicesDep
from pullwake.http.docs import OptionalBody, problems, success
from pullwake.limits import SseSlot
from pullwake.model import ID_PATTERN, AdminStatus
from pullwake.wire import (
    ClaimDone,
    ClaimRequest,
    RunnerHeartbeat,
    RunnerHeartbeatResponse,
    RunnerRegister,
    RunnerView,
    WakeEntry,
    WakeNotification,
    json_encoder,
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
)
async def register_runner(
    data: JSONBody[RunnerRegister], services: ServicesDep, principal: PrincipalDep
) -> Response[RunnerView]:
    view, created = await services.runners.register(principal, data)
    return Response(view, status_code=201 if created else 200)


@get("/runners", summary="List the caller's runners", responses=problems())
async def list_runners(
    services: ServicesDep, principal: PrincipalDep
) -> dict[str, list[RunnerView]]:
    return {"runners": await services.runners.list_owned(principal)}


@get("/runners/{runner_id:str}", summary="One runner", responses=problems(403, 404))
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
)
async def delete_runner(runner_id: IdParam, services: ServicesDep, principal: PrincipalDep) -> None:
    await services.runners.delete(principal, runner_id)


@get(
    "/runners/{runner_id:str}/wakes",
    summary="Server-Sent Events stream of wakes",
    responses=problems(403, 404, 409, 429),
)
async def runner_wakes(
    request: Request[Any, Any, Any],
    runner_id: IdParam,
    services: ServicesDep,
    principal: PrincipalDep,
    session: Annotated[str | None, Parameter(pattern=ID_PATTERN, max_length=128)] = None,
) -> ServerSentEvent:
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

    async def still_allowed() -> bool:
        """Re-check the caller: a revoked token or a deleted runner ends the stream."""
        since = time.monotonic_ns()  # now, not when the stream was opened
        try:
            caller = await resolve_principal(
                request, services.tokens, services.settings, services.authenticate, since=since
            )
            await services.runners.access(caller, runner_id, since=since)
        except PullwakeError as exc:
            log.info("closing wake stream of runner %s: %s", runner_id, exc.detail)
            return False
        return True

    return ServerSentEvent(
        _wake_events(services, runner_id, consumer, slot, still_allowed),
        headers={"Cache-Control": "no-store", "X-Accel-Buffering": "no"},
    )


_PAGE = 100


async def _read_unless_draining(
    services: ServicesDep, runner_id: str, consumer: str, *, pending_after: str | None
) -> list[tuple[str, WakeEntry]] | None:
    """One XREADGROUP (this session's pending entries after ``pending_after``, or new ones
    when it is None), abandoned with None as soon as the server starts shutting down."""
    if services.draining.is_set():
        return None
    read = asyncio.ensure_future(
        services.streams.read(
            runner_id,
            consumer,
            own_pending=pending_after is not None,
            after=pending_after or "0",
            count=_PAGE,
            block_ms=services.settings.sse_block_ms,
        )
    )
    drain = asyncio.ensure_future(services.draining.wait())
    try:
        await asyncio.wait({read, drain}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        drain.cancel()
        if not read.done():
            read.cancel()
            with contextlib.suppress(asyncio.CancelledError, RedisError, OSError):
                await read
    return read.result() if not read.cancelled() else None


async def _wake_events(
    services: ServicesDep,
    runner_id: str,
    consumer: str,
    slot: SseSlot,
    still_allowed: Callable[[], Awaitable[bool]],
) -> AsyncIterator[ServerSentEventMessage]:
    """This session's own pending entries first, then new ones; comments keep the line alive.

    Once per keep-alive interval the session's slot is refreshed and the caller re-checked.
    """
    keepalive_s = services.settings.sse_keepalive_ms / 1000
    yield ServerSentEventMessage(data=None, comment=f"connected session={consumer}", retry=1000)
    log.info("runner %s session %s connected to its wake stream", runner_id, consumer)
    last_write = last_check = time.monotonic()
    pending_after: str | None = "0"
    try:
        while True:
            if time.monotonic() - last_check >= keepalive_s:
                if not await still_allowed():
                    return
                await slot.refresh()
                last_check = time.monotonic()
            entries = await _read_unless_draining(
                services, runner_id, consumer, pending_after=pending_after
            )
            if entries is None:
                log.info("runner %s session %s: server shutting down", runner_id, consumer)
                return
            # This session's own pending entries come in pages: page on until one is short.
            if pending_after is not None:
                pending_after = entries[-1][0] if len(entries) == _PAGE else None
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
        # The response's task is being cancelled when the client goes away: shield the release.
        with contextlib.suppress(asyncio.CancelledError, RedisError, OSError):
            await asyncio.shield(slot.close())


@post(
    "/runners/{runner_id:str}/claim",
    status_code=200,
    summary="Claim a wake",
    responses={
        **success(204, None, "no pending work: nothing to do (the stream entry was acked)"),
        **problems(403, 404, 409, body=True),
    },
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
