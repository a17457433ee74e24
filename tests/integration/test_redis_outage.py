"""Redis is a delivery hint: while it is down, sends are still accepted and stored, and the
wakes reach the runner once Redis is back."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from typing import Any

import asyncpg
import httpx
import pytest

from pullwake.config import Settings
from pullwake.http import create_app
from pullwake.model import Principal
from pullwake.testing import free_port, serve_in_background

from .helpers import read_wake, redis_down, register_runner, runner_policy


@contextlib.asynccontextmanager
async def _server(
    settings: Settings,
) -> AsyncIterator[tuple[Any, httpx.AsyncClient, dict[str, str]]]:
    app = create_app(settings)
    async with serve_in_background(app) as base:
        services = app.state["pullwake"]
        raw, _ = await services.tokens.create(Principal.parse("user:o@example.com"), "t")
        async with httpx.AsyncClient(base_url=base, timeout=10) as http:
            yield services, http, {"Authorization": f"Bearer {raw}"}


@pytest.mark.timeout(60)
async def test_sends_during_a_redis_outage_are_kept_and_delivered_afterwards(
    settings: Settings, db: asyncpg.Connection
) -> None:
    async with _server(settings) as (services, http, auth):
        await register_runner(http, auth, "outage-runner")
        r = await http.put(
            "/v1/entities/job/o1",
            json={"dispatch_policy": runner_policy("outage-runner")},
            headers=auth,
        )
        assert r.status_code == 201, r.text

        with redis_down(services):
            r = await http.post("/v1/entities/job/o1/messages", json={"payload": 1}, headers=auth)
            assert r.status_code == 202, r.text  # accepted: Postgres has it
            wake_id = r.json()["wake"]["id"]
            r = await http.get("/v1/runners/outage-runner/wakes", headers=auth)
            assert r.status_code == 503, r.text
            assert r.headers["content-type"].startswith("application/problem+json")
            assert r.json()["code"] == "UNAVAILABLE"
            health = await http.get("/v1/runners/outage-runner/health", headers=auth)
            assert health.status_code == 200, health.text
            assert "redis_unavailable" in {i["code"] for i in health.json()["health"]["issues"]}

        row = await db.fetchrow(
            "SELECT delivery_status, last_error FROM wakes WHERE id = $1", wake_id
        )
        assert row["delivery_status"] == "queued"
        assert "publish failed" in row["last_error"]

        await asyncio.sleep(1.1)  # queued wakes are retried after a second
        report = await services.recovery.redeliver()
        assert report.redelivered == 1
        wake = await read_wake(http, auth, "outage-runner")
        assert wake.data["wake_id"] == wake_id


@pytest.mark.timeout(60)
async def test_the_api_starts_and_takes_sends_without_redis(
    settings: Settings, db: asyncpg.Connection
) -> None:
    dead = settings.with_(redis_url=f"redis://127.0.0.1:{free_port()}/0")
    async with _server(dead) as (_services, http, auth):
        assert (await http.get("/healthz")).status_code == 200
        ready = await http.get("/readyz")
        assert ready.status_code == 503, ready.text
        assert ready.json()["code"] == "UNAVAILABLE"
        # a runner and its entity are Postgres-only; the message is kept for later delivery
        await register_runner(http, auth, "no-redis-runner")
        policy = runner_policy("no-redis-runner")
        r = await http.put("/v1/entities/job/n1", json={"dispatch_policy": policy}, headers=auth)
        assert r.status_code == 201, r.text
        r = await http.post("/v1/entities/job/n1/messages", json={"payload": 1}, headers=auth)
        assert r.status_code == 202, r.text
    assert await db.fetchval("SELECT delivery_status FROM wakes") == "queued"
    assert await db.fetchval("SELECT count(*) FROM inbox_messages") == 1
