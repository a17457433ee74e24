"""Helpers for the integration tests: calls to the live server over HTTP, the wake stream, and
for the tests that also look underneath, a world over the service graph, the worker in process
and a Redis outage."""

from __future__ import annotations

import asyncio
import contextlib
import secrets
import warnings
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from typing import Any

import asyncpg
import httpx
from arq.worker import Worker
from redis.asyncio import ConnectionPool, Redis

from pullwake.config import Settings
from pullwake.services import Services
from pullwake.tasks import create_worker, worker_settings
from pullwake.testing import free_port
from support.sse import SseEvent, sse_events
from support.wait import wait_for as wait_for  # re-exported for the tests

ALICE = "user:alice@example.com"
BOB = "user:bob@example.com"
CAROL = "user:carol@example.com"
GROUP = "pullwake"
PROBLEM = "application/problem+json"


def uid(prefix: str = "x") -> str:
    """A unique id that matches the id pattern."""
    return f"{prefix}-{secrets.token_hex(5)}"


def stream_key(settings: Settings, runner_id: str) -> str:
    return f"{settings.redis_key_prefix}:{{runner:{runner_id}}}:wakes"


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def assert_problem(
    resp: httpx.Response, status: int, code: str | None = None, where: str = ""
) -> dict[str, Any]:
    """The response is a problem+json with ``status`` and ``code``; returns the body.

    ``where`` names the request in failure messages (for checks made in a loop).
    """
    where = where or f"{resp.request.method} {resp.request.url.path}"
    assert resp.status_code == status, (where, resp.status_code, resp.text)
    content_type = resp.headers.get("content-type", "").split(";")[0].strip()
    assert content_type == PROBLEM, (where, resp.headers)
    body: dict[str, Any] = resp.json()
    assert body["status"] == status, (where, body)
    assert body["title"], (where, body)
    assert body["type"].startswith("https://"), (where, body)
    assert isinstance(body["detail"], str), (where, body)
    assert body["detail"], (where, body)
    if code is not None:
        assert body["code"] == code, (where, body)
    return body


async def register_runner(
    http: httpx.AsyncClient, headers: dict[str, str], runner_id: str | None = None, **body: Any
) -> str:
    runner_id = runner_id or uid("runner")
    resp = await http.post("/v1/runners", json={"id": runner_id, **body}, headers=headers)
    assert resp.status_code in (200, 201), resp.text
    return runner_id


def runner_policy(runner_id: str) -> dict[str, Any]:
    return {"targets": [{"type": "runner", "runner_id": runner_id}]}


@dataclass
class Entity:
    type: str
    id: str

    @property
    def url(self) -> str:
        return f"/{self.type}/{self.id}"

    @property
    def path(self) -> str:
        return f"/v1/entities/{self.type}/{self.id}"


async def create_entity(
    http: httpx.AsyncClient,
    headers: dict[str, str],
    runner_id: str | None = None,
    *,
    entity_type: str | None = None,
    entity_id: str | None = None,
    expect: int = 201,
    **body: Any,
) -> Entity:
    entity = Entity(entity_type or uid("type"), entity_id or uid("ent"))
    if runner_id is not None:
        body.setdefault("dispatch_policy", runner_policy(runner_id))
    resp = await http.put(entity.path, json=body, headers=headers)
    assert resp.status_code == expect, resp.text
    return entity


async def send(
    http: httpx.AsyncClient,
    headers: dict[str, str],
    entity: Entity,
    payload: Any,
    idempotency_key: str | None = None,
) -> dict[str, Any]:
    body: dict[str, Any] = {"payload": payload}
    if idempotency_key is not None:
        body["idempotency_key"] = idempotency_key
    resp = await http.post(f"{entity.path}/messages", json=body, headers=headers)
    assert resp.status_code == 202, resp.text
    result: dict[str, Any] = resp.json()
    return result


async def get_entity(
    http: httpx.AsyncClient, headers: dict[str, str], entity: Entity
) -> dict[str, Any]:
    resp = await http.get(entity.path, headers=headers)
    assert resp.status_code == 200, resp.text
    result: dict[str, Any] = resp.json()
    return result


async def signal(
    http: httpx.AsyncClient, headers: dict[str, str], entity: Entity, name: str
) -> dict[str, Any]:
    resp = await http.post(f"{entity.path}/signal", json={"signal": name}, headers=headers)
    assert resp.status_code == 200, resp.text
    result: dict[str, Any] = resp.json()
    return result


# --- wakes over SSE ---------------------------------------------------------------------------


async def read_sse(
    http: httpx.AsyncClient,
    headers: dict[str, str],
    runner_id: str,
    session: str | None,
    *,
    until: Callable[[list[SseEvent]], bool],
    timeout: float = 5.0,
) -> list[SseEvent]:
    """Open the runner's wake stream, collect events until ``until(events)``, then close it.

    ``session=None`` connects without a session (the server picks a fresh consumer name).
    Comment-only blocks are returned as events with ``event=None`` and their comments.
    """
    events: list[SseEvent] = []
    async with asyncio.timeout(timeout):
        async with http.stream(
            "GET",
            f"/v1/runners/{runner_id}/wakes",
            params={} if session is None else {"session": session},
            headers=headers,
            timeout=httpx.Timeout(timeout + 5),
        ) as resp:
            assert resp.status_code == 200, (await resp.aread()).decode()
            assert resp.headers["content-type"].startswith("text/event-stream")
            async for event in sse_events(resp.aiter_lines()):
                events.append(event)
                if until(events):
                    return events
    raise AssertionError(f"wake stream ended early: {events!r}")


def wakes_of(events: list[SseEvent]) -> list[SseEvent]:
    return [e for e in events if e.event == "wake"]


async def read_wakes(
    http: httpx.AsyncClient,
    headers: dict[str, str],
    runner_id: str,
    session: str | None = None,
    *,
    count: int = 1,
    timeout: float = 5.0,
) -> list[SseEvent]:
    """The first ``count`` wake events of the runner's stream for ``session``."""
    events = await read_sse(
        http,
        headers,
        runner_id,
        session or uid("s"),
        until=lambda evs: len(wakes_of(evs)) >= count,
        timeout=timeout,
    )
    return wakes_of(events)[:count]


async def read_wake(
    http: httpx.AsyncClient,
    headers: dict[str, str],
    runner_id: str,
    session: str | None = None,
    *,
    timeout: float = 5.0,
) -> SseEvent:
    """The first wake event of the runner's stream."""
    (event,) = await read_wakes(http, headers, runner_id, session, count=1, timeout=timeout)
    return event


# --- claims -----------------------------------------------------------------------------------


async def claim(
    http: httpx.AsyncClient,
    headers: dict[str, str],
    runner_id: str,
    wake_id: str,
    entry_id: str | None = None,
) -> httpx.Response:
    body = {"wake_id": wake_id}
    if entry_id is not None:
        body["entry_id"] = entry_id
    return await http.post(f"/v1/runners/{runner_id}/claim", json=body, headers=headers)


async def claim_ok(
    http: httpx.AsyncClient,
    headers: dict[str, str],
    runner_id: str,
    wake_id: str,
    entry_id: str | None = None,
) -> dict[str, Any]:
    resp = await claim(http, headers, runner_id, wake_id, entry_id)
    assert resp.status_code == 200, resp.text
    body: dict[str, Any] = resp.json()
    assert "claim_token" in body, body
    return body


async def claim_next(
    http: httpx.AsyncClient, headers: dict[str, str], runner_id: str, session: str | None = None
) -> dict[str, Any]:
    """Read the runner's next wake from its stream (as ``session``) and claim it: the claim's
    notification."""
    wake = await read_wake(http, headers, runner_id, session)
    return await claim_ok(http, headers, runner_id, wake.data["wake_id"], wake.id)


async def holder_call(
    http: httpx.AsyncClient, notification: dict[str, Any], action: str, **body: Any
) -> httpx.Response:
    """``POST /v1/claims/{id}/{action}`` with the claim's token and epoch (``body`` adds to or
    overrides the fields)."""
    return await http.post(
        f"/v1/claims/{notification['claim_id']}/{action}",
        json={"epoch": notification["epoch"], **body},
        headers=bearer(notification["claim_token"]),
    )


async def done(
    http: httpx.AsyncClient, notification: dict[str, Any], acked_offset: int, **over: Any
) -> httpx.Response:
    return await holder_call(http, notification, "done", acked_offset=acked_offset, **over)


async def heartbeat(
    http: httpx.AsyncClient, notification: dict[str, Any], **over: Any
) -> httpx.Response:
    return await holder_call(http, notification, "heartbeat", **over)


async def release(
    http: httpx.AsyncClient, notification: dict[str, Any], **over: Any
) -> httpx.Response:
    return await holder_call(http, notification, "release", **over)


async def append_event(
    http: httpx.AsyncClient, entity: Entity, token: str, payload: Any, **over: Any
) -> httpx.Response:
    return await http.post(
        f"{entity.path}/events", json={"payload": payload, **over}, headers=bearer(token)
    )


# --- Redis ------------------------------------------------------------------------------------


async def xpending_count(redis: Redis, settings: Settings, runner_id: str) -> int:
    info = await redis.xpending(stream_key(settings, runner_id), GROUP)
    return int(info["pending"])


async def xlen(redis: Redis, settings: Settings, runner_id: str) -> int:
    return int(await redis.xlen(stream_key(settings, runner_id)))


# --- a world of one owner, over the API and the service graph --------------------------------


@dataclass
class ServiceWorld:
    """One owner on the live API (``api``, tests/conftest.py's ``Api``; ``headers``), with the
    test's own service graph and a Postgres connection: what a test that drives the API and
    looks at (or moves) the state underneath needs. Test files extend it."""

    api: Any
    svc: Services
    db: asyncpg.Connection
    headers: dict[str, str]

    @property
    def http(self) -> httpx.AsyncClient:
        client: httpx.AsyncClient = self.api.http
        return client

    async def send(self, path: str, payload: Any) -> dict[str, Any]:
        """Send ``payload`` to the entity at API path ``path``; the 202 answer."""
        r = await self.http.post(
            f"{path}/messages", json={"payload": payload}, headers=self.headers
        )
        assert r.status_code == 202, r.text
        body: dict[str, Any] = r.json()
        return body

    async def get(self, path: str) -> dict[str, Any]:
        """``GET path`` as the owner; the 200 answer."""
        r = await self.http.get(path, headers=self.headers)
        assert r.status_code == 200, r.text
        body: dict[str, Any] = r.json()
        return body

    async def wake_row(self, wake_id: str) -> asyncpg.Record:
        """The wake's row in Postgres."""
        row = await self.db.fetchrow("SELECT * FROM wakes WHERE id = $1", wake_id)
        assert row is not None
        return row


# --- the worker in process, Redis gone ----------------------------------------------------------


@contextlib.asynccontextmanager
async def running_worker(settings: Settings, **ctx: Any) -> AsyncIterator[Worker]:
    """The real arq worker of ``settings`` running in this event loop (its context updated
    with ``ctx``: ``pullwake_jobs=[]`` leaves out the periodic jobs); stopped on exit."""
    ws: Any = worker_settings(settings)
    worker = create_worker(
        settings, ctx={**ws.ctx, **ctx}, handle_signals=False, poll_delay=0.02, keep_result=0
    )
    task = asyncio.create_task(worker.main())
    try:
        yield worker
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError, TimeoutError):
            await asyncio.wait_for(task, 15)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)  # arq calls redis' close()
            await worker.close()


@contextlib.contextmanager
def redis_down(services: Services) -> Iterator[None]:
    """Point the services' Redis client at a closed port, as if Redis had gone away."""
    working = services.redis.connection_pool
    services.redis.connection_pool = ConnectionPool.from_url(
        f"redis://127.0.0.1:{free_port()}/0", decode_responses=True, socket_connect_timeout=0.2
    )
    try:
        yield
    finally:
        services.redis.connection_pool = working
