"""Webhook targets: a local HTTP target on a loopback port, the real arq job run by an
in-process arq worker, and WebhookDelivery driven directly for the edge cases.

Signatures are checked with an independent implementation of the Standard Webhooks scheme.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import json
import logging
import secrets
import socket
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import timedelta
from typing import Any
from urllib.parse import urlsplit

import asyncpg
import httpx
import pytest
from arq.worker import Worker
from redis.asyncio import Redis
from standardwebhooks import Webhook

from pullwake.config import Settings
from pullwake.http import create_app
from pullwake.model import Principal
from pullwake.services import Services
from pullwake.testing import serve_in_background
from pullwake.webhooks import WebhookDelivery
from support.webhook import Hit, ScriptedTarget

from .helpers import ServiceWorld, running_worker

OWNER = "user:hooks@example.com"
MAX_ATTEMPTS = 3


@pytest.fixture
def server_settings(settings: Settings) -> Settings:
    return settings.with_(
        webhook_allow_private=True,
        webhook_max_attempts=MAX_ATTEMPTS,
        webhook_backoff_ms=50,
        webhook_timeout_ms=2_000,
        claim_lease_ms=5_000,
    )


# --- the target --------------------------------------------------------------------------------


@pytest.fixture
async def target() -> AsyncIterator[ScriptedTarget]:
    app = ScriptedTarget()
    async with serve_in_background(app) as base_url:
        app.base_url = base_url
        yield app


def new_secret() -> str:
    return "whsec_" + base64.b64encode(secrets.token_bytes(32)).decode()


def verify_signature(secret: str, hit: Hit) -> None:
    """Standard Webhooks, written out independently of pullwake.webhooks."""
    key = base64.b64decode(secret.removeprefix("whsec_"))
    msg_id, timestamp = hit.headers["webhook-id"], hit.headers["webhook-timestamp"]
    signed = f"{msg_id}.{timestamp}.{hit.body.decode()}".encode()
    expected = base64.b64encode(hmac.new(key, signed, hashlib.sha256).digest()).decode()
    offered = hit.headers["webhook-signature"].split(" ")
    assert f"v1,{expected}" in offered, (offered, expected)
    assert abs(int(timestamp) - time.time()) < 60
    # and as a receiver would, with the Standard Webhooks reference library
    assert Webhook(secret).verify(hit.body, dict(hit.headers)) == json.loads(hit.body)


# --- the arq worker, in process ------------------------------------------------------------------


@pytest.fixture
async def arq_worker(server_settings: Settings) -> AsyncIterator[Worker]:
    """The real ``deliver_webhook`` job (no periodic jobs) consuming this test's arq queue."""
    async with running_worker(server_settings, pullwake_jobs=[]) as worker:
        yield worker


# --- the world -----------------------------------------------------------------------------------


@dataclass
class World(ServiceWorld):
    """The owner's webhook entities, their wakes and claims, and the target's callbacks."""

    async def webhook_entity(self, url: str, secret: str | None, messages: int = 0) -> str:
        path = f"/v1/entities/hook/{secrets.token_hex(5)}"
        hook: dict[str, Any] = {"type": "webhook", "url": url}
        if secret is not None:
            hook["secret"] = secret
        r = await self.http.put(
            path, json={"dispatch_policy": {"targets": [hook]}}, headers=self.headers
        )
        assert r.status_code == 201, r.text
        for n in range(messages):
            await self.send(path, {"n": n})
        return path

    async def claim_row(self, claim_id: str) -> asyncpg.Record:
        row = await self.db.fetchrow("SELECT * FROM claims WHERE id = $1", claim_id)
        assert row is not None
        return row

    async def wait(self, query: str, *args: Any, timeout: float = 10) -> Any:
        """Poll a SQL scalar until it is truthy."""
        deadline = time.monotonic() + timeout
        while True:
            value = await self.db.fetchval(query, *args)
            if value:
                return value
            if time.monotonic() > deadline:
                raise AssertionError(f"not true within {timeout} s: {query} {args}")
            await asyncio.sleep(0.02)

    async def callback(
        self, notification: dict[str, Any], name: str, token: str | None = None, **body: Any
    ) -> httpx.Response:
        """What the target does: POST a callback URL with the claim token."""
        url = notification["callbacks"][name]
        assert url.startswith(self.svc.settings.public_url.rstrip("/") + "/v1/"), url
        return await self.http.post(
            urlsplit(url).path,
            json={"epoch": notification["epoch"], **body},
            headers={"Authorization": f"Bearer {token or notification['claim_token']}"},
        )


@pytest.fixture
async def world(
    api: Any, services: Services, db: asyncpg.Connection, redis: Redis
) -> AsyncIterator[World]:
    world = World(api, services, db, await api.as_(OWNER))
    yield world
    # arq keeps its job keys outside our key prefix: remove this test's.
    ids = [r["id"] for r in await db.fetch("SELECT id FROM wakes")]
    keys = [f"arq:{kind}:{i}" for i in ids for kind in ("job", "retry", "in-progress", "result")]
    if keys:
        await redis.delete(*keys)


async def current_wake(world: World, path: str) -> str:
    dispatch = (await world.get(path))["dispatch"]
    wake_id = dispatch["outstanding_wake_id"] or (dispatch["active_claim"] or {}).get("claim_id")
    assert wake_id, dispatch
    return str(wake_id)


# --- delivery through the arq job --------------------------------------------------------------


async def test_signed_notification_then_the_target_calls_back(
    world: World, target: ScriptedTarget, arq_worker: Worker
):
    secret = new_secret()
    path = await world.webhook_entity(target.url, secret)
    sent = await world.send(path, {"hello": "hook"})
    wake_id = sent["wake"]["id"]

    (hit,) = await target.wait_hits(1)

    assert hit.path == "/hook"
    assert hit.headers["content-type"] == "application/json"
    assert hit.headers["webhook-id"] == wake_id
    verify_signature(secret, hit)
    notification = hit.json()
    assert notification["wake_id"] == notification["claim_id"] == wake_id
    assert notification["claim_token"].startswith("pwc_")
    assert notification["entity"]["url"] == path.removeprefix("/v1/entities")
    assert [m["payload"] for m in notification["messages"]] == [{"hello": "hook"}]
    assert notification["acked_offset"] == 0
    assert notification["tail_offset"] == 1
    assert set(notification["callbacks"]) >= {"heartbeat", "done", "release", "events"}
    assert secret not in hit.body.decode()
    # The claim outlives the request and the longest back-off (from the settings), no more.
    s = world.svc.settings
    assert s.claim_lease_ms + s.webhook_timeout_ms < notification["lease_ms"]
    assert notification["lease_ms"] <= s.claim_lease_ms + s.webhook_timeout_ms + 1_000
    await world.wait(
        "SELECT attempts = 1 AND delivery_status = 'delivered' FROM wakes WHERE id = $1", wake_id
    )

    # 2xx without {"done": true}: delivered, and the claim stays active for the callbacks.
    entity = await world.get(path)
    assert entity["status"] == "running"
    assert entity["dispatch"]["active_claim"]["claim_id"] == wake_id
    assert entity["dispatch"]["active_claim"]["runner_id"] is None
    r = await world.callback(notification, "heartbeat")
    assert r.status_code == 200, r.text
    # The job retried after a worker crash that followed the 2xx: no second POST, and the
    # target's token keeps working (re-issuing it would fence the target mid-work).
    async with httpx.AsyncClient() as http:
        retried = await WebhookDelivery(
            world.svc.webhook_claims, world.svc.callbacks, world.svc.settings, http
        ).deliver(wake_id, 2)
    assert retried.result == "skipped"
    assert len(target.hits) == 1
    r = await world.http.post(
        urlsplit(notification["callbacks"]["events"]).path,
        json={"payload": {"progress": 1}},
        headers={"Authorization": f"Bearer {notification['claim_token']}"},
    )
    assert r.status_code == 201, r.text
    r = await world.callback(notification, "done", acked_offset=1)
    assert r.status_code == 200, r.text
    assert r.json() == {"ok": True, "next_wake": False}
    entity = await world.get(path)
    assert entity["status"] == "idle"
    assert entity["dispatch"]["acked_offset"] == 1
    assert len(target.hits) == 1


async def test_a_delivery_carries_the_first_traced_messages_trace_context(
    world: World, target: ScriptedTarget, arq_worker: Worker
):
    """The receiver's own span can join the sender's trace (W3C ``traceparent``)."""
    path = await world.webhook_entity(target.url, new_secret())
    context = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
    r = await world.http.post(
        f"{path}/messages",
        json={"payload": 1},
        headers={**world.headers, "traceparent": context},
    )
    assert r.status_code == 202, r.text
    (hit,) = await target.wait_hits(1)
    assert hit.headers["traceparent"] == context
    assert hit.json()["messages"][0]["traceparent"] == context
    # The attempt is recorded before the test ends (the worker is not stopped mid-job).
    await world.wait(
        "SELECT delivery_status = 'delivered' FROM wakes WHERE id = $1", r.json()["wake"]["id"]
    )


async def test_default_secret_signs_targets_without_their_own(
    api: Any, world: World, target: ScriptedTarget, server_settings: Settings
):
    secret = new_secret()
    settings = server_settings.with_(webhook_secret=secret)
    path = await world.webhook_entity(target.url, None, messages=1)
    wake_id = await current_wake(world, path)
    async with httpx.AsyncClient() as http:
        outcome = await WebhookDelivery(
            world.svc.webhook_claims, world.svc.callbacks, settings, http
        ).deliver(wake_id, 1)
    assert outcome.result == "delivered"
    (hit,) = target.hits
    verify_signature(secret, hit)


async def test_done_answer_finishes_the_claim_at_once(
    world: World, target: ScriptedTarget, arq_worker: Worker
):
    target.default = (200, {"done": True}, {})
    path = await world.webhook_entity(target.url, new_secret(), messages=3)
    url = path.removeprefix("/v1/entities")

    await world.wait(
        "SELECT acked_offset = 3 AND active_claim_id IS NULL AND outstanding_wake_id IS NULL "
        "FROM dispatch_state WHERE entity_url = $1",
        url,
    )

    entity = await world.get(path)
    assert entity["status"] == "idle"
    # The first wake may have raced the later sends: a follow-up wake then carried the rest.
    # Either way every message went out exactly once and each claim ended with its done.
    offsets = [m["offset"] for h in target.hits for m in h.json()["messages"]]
    assert offsets == [1, 2, 3]
    claims = await world.db.fetch(
        "SELECT status, end_reason, acked_offset FROM claims WHERE entity_url = $1 ORDER BY epoch",
        url,
    )
    assert [(c["status"], c["end_reason"]) for c in claims] == [("released", "done")] * len(
        target.hits
    )
    assert claims[-1]["acked_offset"] == 3
    wakes = await world.db.fetch(
        "SELECT delivery_status, claim_status FROM wakes WHERE entity_url = $1", url
    )
    assert {(w["delivery_status"], w["claim_status"]) for w in wakes} == {
        ("delivered", "completed")
    }


async def test_500_500_200_is_processed_once_after_backoff(
    world: World, target: ScriptedTarget, arq_worker: Worker
):
    target.answer(500, 500)
    path = await world.webhook_entity(target.url, new_secret(), messages=1)
    wake_id = await current_wake(world, path)

    hits = await target.wait_hits(3)
    await world.wait(
        "SELECT attempts = 3 AND delivery_status = 'delivered' FROM wakes WHERE id = $1", wake_id
    )

    assert [h.headers["webhook-id"] for h in hits] == [wake_id] * 3
    backoff = world.svc.settings.webhook_backoff_ms / 1000
    assert hits[1].at - hits[0].at >= backoff * 0.8
    assert hits[2].at - hits[1].at >= 2 * backoff * 0.8
    wake = await world.wake_row(wake_id)
    assert wake["last_error"] is None
    assert wake["claim_status"] == "claimed"
    tokens = [h.json()["claim_token"] for h in hits]
    assert len(set(tokens)) == 3, "each attempt re-issues the claim with a fresh token"
    # Only the answered attempt's token holds the claim: the target processed it once.
    final = hits[2].json()
    for stale in tokens[:2]:
        r = await world.callback(final, "done", token=stale, acked_offset=1)
        assert r.status_code in (403, 409), r.text
    r = await world.callback(final, "done", acked_offset=1)
    assert r.status_code == 200, r.text
    assert (await world.get(path))["dispatch"]["acked_offset"] == 1
    await asyncio.sleep(0.3)
    assert len(target.hits) == 3


async def test_always_failing_target_is_dead_lettered_parked_and_resumable(
    world: World, target: ScriptedTarget, arq_worker: Worker
):
    target.default = (500, {"nope": True}, {})
    path = await world.webhook_entity(target.url, new_secret(), messages=1)
    wake_id = await current_wake(world, path)

    await world.wait("SELECT delivery_status = 'failed' FROM wakes WHERE id = $1", wake_id)

    assert len(target.hits) == MAX_ATTEMPTS
    wake = await world.wake_row(wake_id)
    assert wake["attempts"] == MAX_ATTEMPTS
    assert wake["last_error"] == "HTTP 500"
    assert (await world.claim_row(wake_id))["status"] == "failed"
    entity = await world.get(path)
    assert entity["status"] == "idle"
    dispatch = entity["dispatch"]
    assert dispatch["active_claim"] is None
    assert dispatch["outstanding_wake_id"] is None
    assert dispatch["parked_reason"] == (
        f"webhook delivery failed after {MAX_ATTEMPTS} attempts: HTTP 500"
    )
    r = await world.http.get(f"/v1/wakes/{wake_id}", headers=world.headers)
    assert r.status_code == 200, r.text
    assert r.json()["delivery_status"] == "failed"
    # Held while parked, nothing more is attempted.
    assert (await world.send(path, {"n": "more"}))["wake"]["status"] == "held"
    await asyncio.sleep(0.3)
    assert len(target.hits) == MAX_ATTEMPTS

    # The target is fixed; resume makes the work deliverable again.
    target.default = (200, {"done": True}, {})
    r = await world.http.post(f"{path}/signal", json={"signal": "resume"}, headers=world.headers)
    assert r.status_code == 200, r.text
    assert r.json()["dispatch"]["parked_reason"] is None
    await world.wait(
        "SELECT acked_offset = 2 FROM dispatch_state WHERE entity_url = $1",
        path.removeprefix("/v1/entities"),
    )
    entity = await world.get(path)
    assert entity["status"] == "idle"
    assert entity["dispatch"]["parked_reason"] is None
    assert len(target.hits) == MAX_ATTEMPTS + 1


async def test_redirects_are_not_followed(world: World, target: ScriptedTarget, arq_worker: Worker):
    target.default = (307, {}, {"location": f"{target.base_url}/elsewhere"})
    path = await world.webhook_entity(target.url, new_secret(), messages=1)
    wake_id = await current_wake(world, path)

    await world.wait("SELECT delivery_status = 'failed' FROM wakes WHERE id = $1", wake_id)

    assert {h.path for h in target.hits} == {"/hook"}
    assert len(target.hits) == MAX_ATTEMPTS
    assert (await world.wake_row(wake_id))["last_error"] == "HTTP 307"


# --- edge cases, WebhookDelivery driven directly -----------------------------------------------


@pytest.fixture
async def delivery(world: World) -> AsyncIterator[WebhookDelivery]:
    async with httpx.AsyncClient() as http:
        yield WebhookDelivery(
            world.svc.webhook_claims, world.svc.callbacks, world.svc.settings, http
        )


async def backdate_lease(world: World, path: str) -> None:
    url = path.removeprefix("/v1/entities")
    past = timedelta(seconds=1)
    await world.db.execute(
        "UPDATE dispatch_state SET active_lease_expires_at = now() - $2::interval "
        "WHERE entity_url = $1",
        url,
        past,
    )
    await world.db.execute(
        "UPDATE claims SET lease_expires_at = now() - $2::interval "
        "WHERE entity_url = $1 AND status = 'active'",
        url,
        past,
    )


async def test_retry_finding_the_lease_expired_hands_the_work_on(
    world: World, target: ScriptedTarget, delivery: WebhookDelivery
):
    target.default = (500, {}, {})
    path = await world.webhook_entity(target.url, new_secret(), messages=1)
    wake_id = await current_wake(world, path)
    assert (await delivery.deliver(wake_id, attempt=1)).result == "retry"
    await backdate_lease(world, path)

    outcome = await delivery.deliver(wake_id, attempt=2)

    assert outcome.result == "skipped"
    assert len(target.hits) == 1
    dispatch = (await world.get(path))["dispatch"]
    assert dispatch["active_claim"] is None
    assert dispatch["outstanding_wake_id"] not in (None, wake_id), "the work must be re-woken"
    assert dispatch["epoch"] == 2


async def test_late_final_failure_does_not_park_work_already_handed_on(
    world: World, target: ScriptedTarget, delivery: WebhookDelivery
):
    target.default = (500, {}, {})
    path = await world.webhook_entity(target.url, new_secret(), messages=1)
    wake_id = await current_wake(world, path)
    assert (await delivery.deliver(wake_id, attempt=1)).result == "retry"
    await backdate_lease(world, path)
    assert (await world.svc.recovery.expire_claims()).rewakes == 1
    handed_on = (await world.get(path))["dispatch"]["outstanding_wake_id"]

    # The old attempt's job gives up late (its failure was decided before the expiry).
    await world.svc.webhook_claims.fail(wake_id, "HTTP 500", MAX_ATTEMPTS)

    dispatch = (await world.get(path))["dispatch"]
    assert dispatch["parked_reason"] is None
    assert dispatch["outstanding_wake_id"] == handed_on


async def test_target_resolving_to_a_private_address_is_refused_at_delivery(
    world: World, target: ScriptedTarget, server_settings: Settings
):
    host = socket.gethostname()
    try:
        addresses = {info[4][0] for info in socket.getaddrinfo(host, None)}
    except OSError:
        pytest.skip(f"{host} does not resolve")
    if not all(a.startswith(("127.", "10.", "192.168.", "172.", "::1")) for a in addresses):
        pytest.skip(f"{host} resolves to {addresses}")
    port = urlsplit(target.base_url).port
    path = await world.webhook_entity(f"http://{host}:{port}/hook", new_secret(), messages=1)
    wake_id = await current_wake(world, path)
    strict = server_settings.with_(webhook_allow_private=False)
    async with httpx.AsyncClient() as http:
        outcome = await WebhookDelivery(
            world.svc.webhook_claims, world.svc.callbacks, strict, http
        ).deliver(wake_id, 1)

    assert outcome.result == "failed"
    assert target.hits == []
    assert "private" in (await world.get(path))["dispatch"]["parked_reason"]


async def test_a_dns_lookup_that_never_answers_is_bounded_by_the_attempt_timeout(
    world: World, target: ScriptedTarget, server_settings: Settings
):
    """PULLWAKE_WEBHOOK_TIMEOUT_MS bounds the whole attempt, the address check included."""
    path = await world.webhook_entity("http://hooks.example.com/hook", new_secret(), messages=1)
    wake_id = await current_wake(world, path)
    strict = server_settings.with_(webhook_allow_private=False, webhook_timeout_ms=300)

    async def blackholed(host: str) -> list[str]:
        await asyncio.sleep(30)  # as a resolver whose authoritative server never answers
        raise AssertionError("not reached")

    async with httpx.AsyncClient() as http:
        delivery = WebhookDelivery(
            world.svc.webhook_claims, world.svc.callbacks, strict, http, resolve=blackholed
        )
        started = time.monotonic()
        outcome = await delivery.deliver(wake_id, 1)
    assert time.monotonic() - started < 5
    assert outcome.result == "retry"
    assert "within 300 ms" in outcome.detail
    assert target.hits == []


async def test_private_addresses_are_refused_at_entity_creation(settings: Settings):
    strict = settings.with_(webhook_allow_private=False)
    app = create_app(strict)
    async with serve_in_background(app) as base_url, httpx.AsyncClient(base_url=base_url) as http:
        raw, _ = await app.state["pullwake"].tokens.create(Principal.parse(OWNER), "t")
        headers = {"Authorization": f"Bearer {raw}"}
        for url in (
            "http://127.0.0.1:9/hook",
            "http://localhost:9/hook",
            "http://app.localhost/hook",
            "http://10.1.2.3/hook",
            "http://192.168.1.1/hook",
            "http://169.254.169.254/latest/meta-data",
            "http://[::1]:9/hook",
            "http://0.0.0.0/hook",
        ):
            r = await http.put(
                f"/v1/entities/hook/{secrets.token_hex(4)}",
                json={"dispatch_policy": {"targets": [{"type": "webhook", "url": url}]}},
                headers=headers,
            )
            assert r.status_code == 400, (url, r.text)
            body = r.json()
            assert body["code"] == "INVALID_REQUEST", body
            assert "private" in json.dumps(body) or "localhost" in json.dumps(body), body
        r = await http.put(
            f"/v1/entities/hook/{secrets.token_hex(4)}",
            json={
                "dispatch_policy": {
                    "targets": [{"type": "webhook", "url": "https://hooks.example.com/x"}]
                }
            },
            headers=headers,
        )
        assert r.status_code == 201, r.text


async def test_the_secret_never_appears_in_api_responses_or_logs(
    world: World, target: ScriptedTarget, arq_worker: Worker, caplog: pytest.LogCaptureFixture
):
    caplog.set_level(logging.DEBUG)
    secret = new_secret()
    policy = {"targets": [{"type": "webhook", "url": target.url, "secret": secret}]}
    texts: list[str] = []

    async def call(method: str, url: str, **kwargs: Any) -> httpx.Response:
        r = await world.http.request(method, url, headers=world.headers, **kwargs)
        assert r.status_code < 300, r.text
        texts.append(r.text)
        return r

    type_name = f"hooktype{secrets.token_hex(3)}"
    await call("PUT", f"/v1/entity-types/{type_name}", json={"default_dispatch_policy": policy})
    await call("GET", f"/v1/entity-types/{type_name}")
    path = f"/v1/entities/{type_name}/one"
    await call("PUT", path, json={"initial_message": {"payload": {"x": 1}}})
    path2 = f"/v1/entities/hook/{secrets.token_hex(4)}"
    await call("PUT", path2, json={"dispatch_policy": policy, "initial_message": {"payload": 1}})
    await target.wait_hits(2)
    await call("GET", path)
    await call("GET", path2)
    for wake_id in {h.headers["webhook-id"] for h in target.hits}:
        await call("GET", f"/v1/wakes/{wake_id}")
    await call("GET", f"{path}/messages")
    await call("GET", "/metrics")
    r = await world.http.put(path, json={"dispatch_policy": policy}, headers=world.headers)
    texts.append(r.text)

    assert texts
    for text in texts:
        assert secret not in text
        assert secret.removeprefix("whsec_") not in text
    for hit in target.hits:
        assert secret not in hit.body.decode()
        verify_signature(secret, hit)
    assert secret not in caplog.text
    assert secret.removeprefix("whsec_") not in caplog.text
    assert secret not in repr(world.svc.settings.with_(webhook_secret=secret))
