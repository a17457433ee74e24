"""Small helpers for the integration tests: they talk to the live server over HTTP only."""

from __future__ import annotations

import asyncio
import json
import secrets
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import httpx
from redis.asyncio import Redis

from pullwake.config import Settings

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


async def wait_for(
    check: Callable[[], Awaitable[Any]], *, timeout: float = 5.0, interval: float = 0.02
) -> Any:
    """Poll ``check`` until it returns something truthy, or fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = await check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout}s (last value {value!r})")
        await asyncio.sleep(interval)


# --- runners and entities --------------------------------------------------------------------


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


@dataclass
class SseEvent:
    event: str | None
    id: str | None
    data: Any
    comments: list[str]


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
            fields: dict[str, str] = {}
            comments: list[str] = []
            data_lines: list[str] = []
            async for line in resp.aiter_lines():
                if line == "":
                    if fields or data_lines or comments:
                        data = json.loads("\n".join(data_lines)) if data_lines else None
                        events.append(
                            SseEvent(fields.get("event"), fields.get("id"), data, comments)
                        )
                        if until(events):
                            return events
                    fields, comments, data_lines = {}, [], []
                    continue
                if line.startswith(":"):
                    comments.append(line[1:].strip())
                    continue
                name, _, value = line.partition(":")
                value = value[1:] if value.startswith(" ") else value
                if name == "data":
                    data_lines.append(value)
                else:
                    fields[name] = value
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


async def done(
    http: httpx.AsyncClient, notification: dict[str, Any], acked_offset: int, **over: Any
) -> httpx.Response:
    body = {"epoch": notification["epoch"], "acked_offset": acked_offset, **over}
    return await http.post(
        f"/v1/claims/{notification['claim_id']}/done",
        json=body,
        headers=bearer(notification["claim_token"]),
    )


async def heartbeat(
    http: httpx.AsyncClient, notification: dict[str, Any], **over: Any
) -> httpx.Response:
    body = {"epoch": notification["epoch"], **over}
    return await http.post(
        f"/v1/claims/{notification['claim_id']}/heartbeat",
        json=body,
        headers=bearer(notification["claim_token"]),
    )


async def release(
    http: httpx.AsyncClient, notification: dict[str, Any], **over: Any
) -> httpx.Response:
    body = {"epoch": notification["epoch"], **over}
    return await http.post(
        f"/v1/claims/{notification['claim_id']}/release",
        json=body,
        headers=bearer(notification["claim_token"]),
    )


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
