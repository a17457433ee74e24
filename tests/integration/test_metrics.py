"""/metrics: Prometheus text with Postgres-backed gauges and process counters, each driven by
the real thing (a send, a claim, a lease expiry, a Redis loss, a webhook POST, a prune) and read
back through the live server's ``/metrics``, parsed by prometheus_client's own parser."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families
from redis.asyncio import Redis

from pullwake.config import Settings
from pullwake.metrics import OTHER_RUNNERS, WorkerMetrics
from pullwake.testing import serve_in_background
from pullwake.webhooks import WebhookDelivery
from support.webhook import Hit, Reply, WebhookTarget

from .helpers import (
    ALICE,
    append_event,
    claim_next,
    create_entity,
    done,
    heartbeat,
    read_wake,
    register_runner,
    release,
    send,
    stream_key,
    wait_for,
)

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


@pytest.fixture
def top_runners() -> int:
    """PULLWAKE_METRICS_TOP_RUNNERS of the server (a test parametrizes it to change it)."""
    return 1_000


@pytest.fixture
def server_settings(settings: Settings, top_runners: int) -> Settings:
    return settings.with_(
        metrics_top_runners=top_runners,
        claim_lease_ms=2_000,
        redeliver_after_ms=500,
        retention_ms=1,
        webhook_allow_private=True,  # the webhook target listens on loopback
    )


async def scrape(http: httpx.AsyncClient) -> Samples:
    """Every sample of ``/metrics``, parsed as Prometheus would (a parse error fails)."""
    r = await http.get("/metrics")
    assert r.status_code == 200, r.text
    assert r.headers["content-type"].startswith("text/plain")
    samples: Samples = {}
    for family in text_string_to_metric_families(r.text):
        for sample in family.samples:
            key = (sample.name, frozenset(sample.labels.items()))
            assert key not in samples, f"duplicate series {key}"
            samples[key] = sample.value
    return samples


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


def series(samples: Samples, name: str) -> dict[frozenset[tuple[str, str]], float]:
    return {labels: v for (n, labels), v in samples.items() if n == name}


class Delta:
    """What changed in ``/metrics`` since it was created."""

    def __init__(self, http: httpx.AsyncClient, before: Samples) -> None:
        self.http = http
        self.before = before

    @classmethod
    async def start(cls, http: httpx.AsyncClient) -> Delta:
        return cls(http, await scrape(http))

    async def __call__(self, name: str, **labels: str) -> float:
        now = await scrape(self.http)
        return value(now, name, **labels) - value(self.before, name, **labels)


async def test_metrics_report_backlog_liveness_and_counters(api: Any) -> None:
    headers = await api.as_("user:metrics@example.com")
    r = await api.http.post("/v1/runners", json={"id": "m-runner"}, headers=headers)
    assert r.status_code == 201
    await api.http.post("/v1/runners/m-runner/heartbeat", json={}, headers=headers)
    policy = {"targets": [{"type": "runner", "runner_id": "m-runner"}]}
    r = await api.http.put("/v1/entities/m/one", json={"dispatch_policy": policy}, headers=headers)
    assert r.status_code == 201
    delta = await Delta.start(api.http)
    for n in range(3):
        r = await api.http.post("/v1/entities/m/one/messages", json={"payload": n}, headers=headers)
        assert r.status_code == 202

    text = await scrape(api.http)
    assert value(text, "pullwake_runner_outstanding_wakes", runner="m-runner") == 1
    assert value(text, "pullwake_runner_liveness", runner="m-runner", state="online") == 1
    assert value(text, "pullwake_runner_liveness", runner="m-runner", state="expired") == 0
    assert value(text, "pullwake_runners", state="online") == 1
    assert value(text, "pullwake_runners", state="offline") == 0
    assert value(text, "pullwake_pending_messages") == 3
    assert value(text, "pullwake_entities", status="idle") == 1
    assert value(text, "pullwake_dead_letters") == 0
    assert value(text, "pullwake_runner_oldest_wake_age_seconds", runner="m-runner") >= 0
    assert not series(text, "pullwake_runner_active_claims").get(
        frozenset({("runner", OTHER_RUNNERS)})
    )  # every runner has its own series: no _other
    assert await delta("pullwake_sends_total", outcome="queued") == 1
    assert await delta("pullwake_sends_total", outcome="coalesced") == 2
    assert await delta("pullwake_wakes_created_total", reason="message") == 1
    assert await delta("pullwake_wakes_published_total", target="runner", result="ok") == 1


async def test_a_wake_claimed_done_released_and_fenced_is_counted(api: Any) -> None:
    http = api.http
    alice = await api.as_(ALICE)
    runner_id = await register_runner(http, alice)
    entity = await create_entity(http, alice, runner_id)
    delta = await Delta.start(http)

    await send(http, alice, entity, "one")
    note = await claim_next(http, alice, runner_id)
    await send(http, alice, entity, "two")  # coalesced into the active claim
    assert (await done(http, note, 1)).status_code == 200  # one left: a follow-up wake
    second = await claim_next(http, alice, runner_id)
    assert (await release(http, second)).status_code == 200  # a new wake: released
    stale = await heartbeat(http, second)  # the released claim's holder is fenced
    assert stale.status_code == 409, stale.text
    stale = await append_event(http, entity, note["claim_token"], {"late": True})
    assert stale.status_code == 409, stale.text

    assert await delta("pullwake_claims_total", outcome="claimed") == 2
    assert await delta("pullwake_wake_to_claim_seconds_count") == 2
    assert await delta("pullwake_claim_ends_total", reason="done") == 1
    assert await delta("pullwake_claim_ends_total", reason="release") == 1
    assert await delta("pullwake_claim_to_done_seconds_count") == 1
    assert await delta("pullwake_claim_to_done_seconds_sum") > 0
    assert await delta("pullwake_sends_total", outcome="coalesced") == 1
    assert await delta("pullwake_wakes_created_total", reason="message") == 1
    assert await delta("pullwake_wakes_created_total", reason="follow_up") == 1
    assert await delta("pullwake_wakes_created_total", reason="released") == 1
    assert await delta("pullwake_wakes_published_total", target="runner", result="ok") == 3
    assert await delta("pullwake_fenced_rejections_total", endpoint="heartbeat", code="FENCED") == 1
    assert await delta("pullwake_fenced_rejections_total", endpoint="events", code="FENCED") == 1


async def test_lease_expiry_is_a_claim_end_a_new_wake_and_fences_the_late_holder(
    api: Any, db: Any
) -> None:
    http = api.http
    alice = await api.as_(ALICE)
    runner_id = await register_runner(http, alice)
    entity = await create_entity(http, alice, runner_id)
    await send(http, alice, entity, "work")
    note = await claim_next(http, alice, runner_id)
    delta = await Delta.start(http)
    for table in ("dispatch_state", "claims"):
        column = "active_lease_expires_at" if table == "dispatch_state" else "lease_expires_at"
        await db.execute(
            f"UPDATE {table} SET {column} = now() - interval '1 second' WHERE entity_url = $1",
            entity.url,
        )

    report = await api.services.recovery.expire_claims()
    assert report.expired_claims == 1
    late = await heartbeat(http, note)
    assert late.status_code == 409, late.text

    assert await delta("pullwake_claim_ends_total", reason="lease_expired") == 1
    assert await delta("pullwake_wakes_created_total", reason="lease_expired") == 1
    assert await delta("pullwake_claim_to_done_seconds_count") == 0  # not a done
    assert (
        await delta("pullwake_fenced_rejections_total", endpoint="heartbeat", code="LEASE_EXPIRED")
        == 1
    )


async def test_redelivery_and_the_rebuild_after_redis_lost_data_are_counted(
    api: Any, db: Any, redis: Redis
) -> None:
    http = api.http
    alice = await api.as_(ALICE)
    runner_id = await register_runner(http, alice)
    entity = await create_entity(http, alice, runner_id)
    await send(http, alice, entity, "never claimed")
    await read_wake(http, alice, runner_id)  # read by a session that never claims it
    await db.execute("UPDATE wakes SET delivered_at = now() - interval '2 seconds'")
    delta = await Delta.start(http)

    assert (await api.services.recovery.redeliver()).redelivered == 1
    assert await delta("pullwake_wakes_redelivered_total", cause="unclaimed") == 1

    await redis.delete(stream_key(api.settings, runner_id))  # Redis lost the stream
    report = await api.services.recovery.repair_streams()
    assert report.redelivered == 1
    assert await delta("pullwake_wakes_redelivered_total", cause="redis_lost") == 1
    assert await delta("pullwake_wakes_published_total", target="runner", result="ok") == 2
    assert await delta("pullwake_wakes_created_total", reason="message") == 0


async def test_open_wake_streams_are_a_gauge(api: Any) -> None:
    http = api.http
    alice = await api.as_(ALICE)
    runner_id = await register_runner(http, alice)
    assert value(await scrape(http), "pullwake_wake_streams") == 0
    async with http.stream(
        "GET", f"/v1/runners/{runner_id}/wakes", params={"session": "g1"}, headers=alice
    ) as resp:
        assert resp.status_code == 200

        async def one_open() -> bool:
            return value(await scrape(http), "pullwake_wake_streams") == 1

        await wait_for(one_open)

    async def none_open() -> bool:
        return value(await scrape(http), "pullwake_wake_streams") == 0

    await wait_for(none_open)


async def test_http_requests_are_counted_by_route_template_and_status(api: Any) -> None:
    http = api.http
    alice = await api.as_(ALICE)
    runner_id = await register_runner(http, alice)
    entity = await create_entity(http, alice, runner_id)
    route = "/v1/entities/{type_name}/{entity_id}/messages"
    before = await scrape(http)
    await send(http, alice, entity, 1)
    missing = await http.post(
        "/v1/entities/nope/nothing/messages", json={"payload": 1}, headers=alice
    )
    assert missing.status_code == 404

    after = await scrape(http)
    requests = {
        dict(labels)["path"]
        for labels in series(after, "pullwake_http_requests_total")
        if dict(labels)["app_name"] == "pullwake"
    }
    assert all(entity.id not in path for path in requests), requests  # templates, not paths
    labels = {"method": "POST", "path": route, "app_name": "pullwake"}
    for status, count in (("202", 1), ("404", 1)):
        name = "pullwake_http_requests_total"
        got = value(after, name, **labels, status_code=status)
        assert got - value(before, name, **labels, status_code=status) == count, requests
    assert value(after, "pullwake_http_request_duration_seconds_count", **labels, status_code="202")


async def test_wake_streams_stay_out_of_the_http_request_metrics(api: Any) -> None:
    """An open wake stream is counted by ``pullwake_wake_streams``, not as an HTTP request in
    progress (an hour-long request says nothing as a duration)."""
    http = api.http
    alice = await api.as_(ALICE)
    runner_id = await register_runner(http, alice)
    await read_wake_stream_briefly(http, alice, runner_id)
    after = await scrape(http)
    paths = {
        dict(labels)["path"]
        for name in ("pullwake_http_requests_total", "pullwake_http_requests_in_progress")
        for labels in series(after, name)
    }
    assert not any(path.endswith("/wakes") for path in paths), paths
    assert "/v1/runners" in paths  # the registration above was counted


async def read_wake_stream_briefly(http: Any, headers: dict[str, str], runner_id: str) -> None:
    async with http.stream("GET", f"/v1/runners/{runner_id}/wakes", headers=headers) as resp:
        assert resp.status_code == 200
        async for line in resp.aiter_lines():
            if line.startswith(": connected"):
                break


async def test_retention_pruning_is_counted_by_table(api: Any, db: Any) -> None:
    http = api.http
    alice = await api.as_(ALICE)
    runner_id = await register_runner(http, alice)
    entity = await create_entity(http, alice, runner_id)
    await send(http, alice, entity, "old")
    note = await claim_next(http, alice, runner_id)
    assert (await done(http, note, 1)).status_code == 200
    await send(http, alice, entity, "keeps the first wake from being the latest")
    delta = await Delta.start(http)
    await asyncio.sleep(0.01)  # PULLWAKE_RETENTION_MS=1

    report = await api.services.retention.prune()
    assert report.rows["wakes"] >= 1
    for table, removed in report.rows.items():
        assert await delta("pullwake_pruned_rows_total", table=table) == removed


class _FailOnFail(WebhookTarget):
    """200 on any path but ``/fail``, which answers 500."""

    def respond(self, hit: Hit) -> Reply:
        return (500 if hit.path == "/fail" else 200), {}, {}


@pytest.fixture
async def webhook_target() -> AsyncIterator[str]:
    async with serve_in_background(_FailOnFail()) as base_url:
        yield base_url


@pytest.mark.parametrize(("path", "result"), [("/ok", "delivered"), ("/fail", "retry")])
async def test_webhook_attempts_are_counted_by_result(
    api: Any, webhook_target: str, path: str, result: str
) -> None:
    http = api.http
    alice = await api.as_(ALICE)
    hook = {"type": "webhook", "url": webhook_target + path}
    entity = await create_entity(http, alice, dispatch_policy={"targets": [hook]})
    sent = await send(http, alice, entity, "hook")
    services = api.services
    delta = await Delta.start(http)
    async with httpx.AsyncClient() as client:
        delivery = WebhookDelivery(
            services.webhook_claims, services.callbacks, services.settings, client
        )
        outcome = await delivery.deliver(sent["wake"]["id"], 1)
    assert outcome.result == result
    assert await delta("pullwake_webhook_attempts_total", result=result) == 1


@pytest.mark.parametrize("top_runners", [2])
async def test_per_runner_series_are_bounded_to_the_top_runners_plus_other(
    api: Any, db: Any
) -> None:
    http = api.http
    alice = await api.as_(ALICE)
    backlog = {"busy": 3, "middle": 2, "quiet": 1, "idle": 0}
    for name, count in backlog.items():
        runner_id = await register_runner(http, alice, f"rank-{name}")
        for _ in range(count):
            await send(http, alice, await create_entity(http, alice, runner_id), name)
    await db.execute(  # the oldest wake of the rest is the quiet runner's
        "UPDATE wakes SET created_at = now() - interval '1 hour' WHERE runner_id = 'rank-quiet'"
    )

    samples = await scrape(http)
    outstanding = {
        dict(labels)["runner"]: v
        for labels, v in series(samples, "pullwake_runner_outstanding_wakes").items()
    }
    assert outstanding == {"rank-busy": 3, "rank-middle": 2, OTHER_RUNNERS: 1}
    oldest = value(samples, "pullwake_runner_oldest_wake_age_seconds", runner=OTHER_RUNNERS)
    assert 3_500 < oldest < 3_700
    liveness = {dict(labels)["runner"] for labels in series(samples, "pullwake_runner_liveness")}
    assert liveness == {"rank-busy", "rank-middle"}
    assert value(samples, "pullwake_runners", state="offline") == 4  # never seen: all of them


def test_the_worker_collector_serves_the_workers_series_only() -> None:
    """What ``pullwake worker --metrics-port`` serves (tests/e2e scrapes the real process)."""
    names = {family.name for family in WorkerMetrics().collect()}
    assert {
        "pullwake_wakes_created",
        "pullwake_wakes_published",
        "pullwake_wakes_redelivered",
        "pullwake_claim_ends",
        "pullwake_webhook_attempts",
        "pullwake_pruned_rows",
    } <= names
    assert "pullwake_sends" not in names  # the API's
    assert not any(name.startswith("pullwake_http") for name in names)
    assert any(name.startswith("process_") for name in names)
