"""Cluster mode (``PULLWAKE_REDIS_CLUSTER=1``) against a real Redis Cluster of three primaries
that the run starts itself (``redis_cluster`` in tests/conftest.py), with arq's queue on the
shared standalone Redis: the whole lifecycle through the live app, limits, recovery, and a
primary that restarts empty."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import asyncpg
import httpx
import pytest
from arq.worker import Worker
from redis.asyncio import Redis
from redis.asyncio.cluster import RedisCluster
from redis.exceptions import ConnectionError as RedisConnectionError

from cluster import ClusterNode, LocalCluster
from pullwake.cli import main as cli_main
from pullwake.config import Settings
from pullwake.errors import ConfigError
from pullwake.inspect import inspect_runner
from pullwake.services import Services
from pullwake.streams.client import (
    check_redis_mode,
    check_redis_mode_sync,
    publish,
    pubsub_client,
)
from pullwake.tasks import queue_name
from pullwake.testing import serve_in_background
from support.sse import SseEvent
from support.webhook import ScriptedTarget

from .helpers import (
    ALICE,
    Entity,
    assert_problem,
    claim,
    claim_ok,
    create_entity,
    done,
    get_entity,
    read_sse,
    read_wake,
    register_runner,
    running_worker,
    send,
    stream_key,
    uid,
    wait_for,
)
from .servers import serve

pytestmark = pytest.mark.timeout(120)


@pytest.fixture
def server_settings(cluster_settings: Settings) -> Settings:
    return cluster_settings.with_(
        redeliver_after_ms=500,
        stranded_after_ms=300,
        recovery_interval_ms=200,
        webhook_allow_private=True,
        webhook_backoff_ms=50,
    )


@pytest.fixture
async def worker(server_settings: Settings) -> AsyncIterator[Worker]:
    """The real worker in process: periodic recovery on the cluster, arq on the standalone."""
    async with running_worker(server_settings) as worker:
        yield worker


def runners_on_every_node(cluster: LocalCluster, settings: Settings) -> dict[int, str]:
    """One runner id per primary (by port), whose wake stream lives on that primary."""
    found: dict[int, str] = {}
    while len(found) < len(cluster.nodes):
        runner_id = uid("runner")
        node = cluster.node_of(stream_key(settings, runner_id))
        found.setdefault(node.port, runner_id)
    return found


def keys_on(node: ClusterNode, prefix: str) -> set[str]:
    with node.client() as client:
        return set(client.scan_iter(match=f"{prefix}:*"))


async def lifecycle(http: httpx.AsyncClient, headers: dict[str, str], runner_id: str) -> None:
    """Wake over SSE, claim, done: the entity ends idle with its message acked."""
    entity = await create_entity(http, headers, runner_id)
    sent = await send(http, headers, entity, {"on": runner_id})
    wake = await read_wake(http, headers, runner_id)
    assert wake.data["wake_id"] == sent["wake"]["id"]
    notification = await claim_ok(http, headers, runner_id, wake.data["wake_id"], wake.id)
    assert [m["payload"] for m in notification["messages"]] == [{"on": runner_id}]
    r = await done(http, notification, notification["tail_offset"])
    assert r.status_code == 200, r.text
    assert (await get_entity(http, headers, entity))["status"] == "idle"


async def test_lifecycle_on_every_primary(
    api: Any, redis_cluster: LocalCluster, redis: Redis, server_settings: Settings
) -> None:
    """Register, create, send, SSE wake, claim, done for a runner on each of the three
    primaries; the wake streams sit on their slot's node, nothing of them on the standalone."""
    assert isinstance(api.services.redis, RedisCluster)
    alice = await api.as_(ALICE)
    prefix = server_settings.redis_key_prefix
    runners = runners_on_every_node(redis_cluster, server_settings)
    for runner_id in runners.values():
        await register_runner(api.http, alice, runner_id)
        await lifecycle(api.http, alice, runner_id)
    for node in redis_cluster.nodes:
        assert keys_on(node, prefix) >= {stream_key(server_settings, runners[node.port])}
    standalone = [k async for k in redis.scan_iter(match=f"{prefix}:*")]
    assert not [k for k in standalone if "{runner:" in k], standalone


async def test_batch_send_spans_every_primary(
    api: Any, redis_cluster: LocalCluster, server_settings: Settings
) -> None:
    """One batch wakes runners on all three primaries: one cluster pipeline, split per node."""
    alice = await api.as_(ALICE)
    runners = list(runners_on_every_node(redis_cluster, server_settings).values())
    entities: dict[str, Entity] = {}
    for runner_id in runners:
        await register_runner(api.http, alice, runner_id)
        await api.services.streams.ensure_group(runner_id)
        entities[runner_id] = await create_entity(api.http, alice, runner_id)
    items = [{"entity": entities[r].url, "payload": r} for r in runners]
    resp = await api.http.post("/v1/messages", json={"messages": items}, headers=alice)
    assert resp.status_code == 200, resp.text
    wake_ids = [result["wake"]["id"] for result in resp.json()["results"]]
    for runner_id, wake_id in zip(runners, wake_ids, strict=True):
        wake = await read_wake(api.http, alice, runner_id)
        assert wake.data["wake_id"] == wake_id
        notification = await claim_ok(api.http, alice, runner_id, wake_id, wake.id)
        r = await done(api.http, notification, notification["tail_offset"])
        assert r.status_code == 200, r.text


async def test_limits_live_on_the_cluster(cluster_settings: Settings) -> None:
    """The send bucket and the SSE session caps work across slots (one key per script)."""
    limited = cluster_settings.with_(send_rate_per_s=1, send_burst=2, max_sse_per_runner=1)
    async with serve(limited) as server:
        alice = await server.headers(ALICE)
        runner_id = await register_runner(server.http, alice)
        entity = await create_entity(server.http, alice, runner_id)
        for n in range(2):
            await send(server.http, alice, entity, n)
        r = await server.http.post(f"{entity.path}/messages", json={"payload": 3}, headers=alice)
        assert_problem(r, 429, "RATE_LIMITED")
        async with server.http.stream(
            "GET", f"/v1/runners/{runner_id}/wakes", headers=alice
        ) as first:
            assert first.status_code == 200
            assert await server.services.limits.sse_sessions(runner_id) == 1
            r = await server.http.get(f"/v1/runners/{runner_id}/wakes", headers=alice)
            assert_problem(r, 429, "RATE_LIMITED")

        async def slot_given_back() -> bool:
            return await server.services.limits.sse_sessions(runner_id) == 0

        await wait_for(slot_given_back)


async def test_stranded_entry_is_reclaimed_and_delivered_again(
    api: Any, services: Services
) -> None:
    """A session read the wake and vanished: XAUTOCLAIM on the runner's node takes the entry,
    re-publishes the wake, and the next session claims it."""
    alice = await api.as_(ALICE)
    runner_id = await register_runner(api.http, alice)
    entity = await create_entity(api.http, alice, runner_id)
    sent = await send(api.http, alice, entity, "stranded")
    first = await read_wake(api.http, alice, runner_id, "gone")
    assert (await services.streams.info(runner_id)).pending == 1
    await asyncio.sleep(services.settings.stranded_after_ms / 1000 + 0.1)

    report = await services.recovery.repair_streams()

    assert (report.stranded_reclaimed, report.stranded_republished) == (1, 1), report
    again = await read_wake(api.http, alice, runner_id, "fresh")
    assert again.data["wake_id"] == sent["wake"]["id"]
    assert again.id != first.id
    notification = await claim_ok(api.http, alice, runner_id, again.data["wake_id"], again.id)
    assert (await done(api.http, notification, 1)).status_code == 200
    hygiene = await services.recovery.hygiene()
    assert not hygiene.errors, hygiene


async def test_lost_stream_is_rebuilt_from_postgres(
    api: Any, services: Services, redis_cluster: LocalCluster
) -> None:
    """The runner's primary lost its data (FLUSHALL there): repair re-creates the stream and
    the group on that node and re-publishes the outstanding wake."""
    alice = await api.as_(ALICE)
    runner_id = await register_runner(api.http, alice)
    await services.streams.ensure_group(runner_id)
    entity = await create_entity(api.http, alice, runner_id)
    sent = await send(api.http, alice, entity, "kept in Postgres")
    node = redis_cluster.node_of(services.streams.keys.runner_wakes(runner_id))
    with node.client() as client:
        client.flushall()
    assert not await services.streams.group_exists(runner_id)

    report = await services.recovery.repair_streams()

    assert report.streams_repaired == 1, report
    wake = await read_wake(api.http, alice, runner_id)
    assert wake.data["wake_id"] == sent["wake"]["id"]
    assert wake.data["reason"] == "redis_rebuild"
    notification = await claim_ok(api.http, alice, runner_id, wake.data["wake_id"], wake.id)
    assert (await done(api.http, notification, 1)).status_code == 200


async def test_primary_restarted_empty_loses_no_wake_and_claims_once(
    api: Any,
    worker: Worker,
    redis_cluster: LocalCluster,
    db: asyncpg.Connection,
    server_settings: Settings,
) -> None:
    """Kill the primary of one runner's stream and start it again empty (it keeps its slots).
    Sends during the outage are still accepted; the worker rebuilds the stream from Postgres;
    every wake is delivered and claimed exactly once."""
    alice = await api.as_(ALICE)
    runners = runners_on_every_node(redis_cluster, server_settings)
    victim_port, runner_id = next(iter(runners.items()))
    victim = next(node for node in redis_cluster.nodes if node.port == victim_port)
    await register_runner(api.http, alice, runner_id)
    await api.services.streams.ensure_group(runner_id)
    before = await create_entity(api.http, alice, runner_id)
    await send(api.http, alice, before, "before")

    victim.stop()
    assert not await api.services.streams.ping()  # every primary is asked, not one
    r = await api.http.get("/readyz")
    assert r.status_code == 503, r.text
    assert "'redis': 'down'" in r.json()["detail"], r.text
    during = await create_entity(api.http, alice, runner_id)
    await send(api.http, alice, during, "during")  # 202: Postgres has it, the XADD failed
    await send(api.http, alice, before, "before, again")
    await asyncio.to_thread(redis_cluster.restart_empty, victim)
    assert await wait_for(api.services.streams.ping)

    def seen(events: list[SseEvent]) -> set[str]:
        return {e.data["entity"] for e in events if e.event == "wake"}

    events = await read_sse(
        api.http,
        alice,
        runner_id,
        uid("s"),
        until=lambda evs: seen(evs) == {before.url, during.url},
        timeout=20,
    )
    wakes = [e for e in events if e.event == "wake"]
    by_entity: dict[str, SseEvent] = {}
    for w in wakes:  # the first per entity (a slow claim may see it again, reclaimed as stranded)
        by_entity.setdefault(w.data["entity"], w)
    # "before"'s entry died with the node: what arrived first was re-published from Postgres.
    assert by_entity[before.url].data["reason"] in ("redis_rebuild", "redelivery"), wakes
    for entity, payloads in ((before, ["before", "before, again"]), (during, ["during"])):
        wake = by_entity[entity.url]
        notification = await claim_ok(api.http, alice, runner_id, wake.data["wake_id"], wake.id)
        assert [m["payload"] for m in notification["messages"]] == payloads
        r = await claim(api.http, alice, runner_id, wake.data["wake_id"], wake.id)
        assert r.status_code != 200, r.text  # no second claim of the same wake
        assert (await done(api.http, notification, len(payloads))).status_code == 200
        body = await get_entity(api.http, alice, entity)
        assert body["status"] == "idle"
        assert body["dispatch"]["acked_offset"] == body["dispatch"]["tail_offset"]
    # One wake per entity (re-publishing made entries, not wakes), each claimed once.
    for table in ("wakes", "claims"):
        count = await db.fetchval(f"SELECT count(*) FROM {table} WHERE runner_id = $1", runner_id)
        assert count == 2, table


async def test_client_finds_the_cluster_again_after_every_node_was_down(
    services: Services, redis_cluster: LocalCluster, server_settings: Settings
) -> None:
    """Concurrent commands on all nodes while the whole cluster is down make redis-py 5 forget
    every start-up node; pullwake's client re-seeds them and reconnects once it is back."""
    runners = list(runners_on_every_node(redis_cluster, server_settings).values())
    for runner_id in runners:
        await services.streams.ensure_group(runner_id)
    for node in redis_cluster.nodes:
        node.stop()
    for _ in range(3):
        outcomes = await asyncio.gather(
            *(services.streams.info(r) for r in runners), return_exceptions=True
        )
        assert all(isinstance(o, RedisConnectionError) for o in outcomes), outcomes
    assert not await services.streams.ping()
    for node in redis_cluster.nodes:
        node.start()
    await asyncio.to_thread(redis_cluster.wait_ok)
    assert await wait_for(services.streams.ping)
    infos = await asyncio.gather(*(services.streams.info(r) for r in runners))
    assert [i.length for i in infos] == [0, 0, 0]  # the nodes came back empty


async def test_webhook_jobs_go_through_the_standalone_arq_redis(
    api: Any, worker: Worker, redis_cluster: LocalCluster, server_settings: Settings
) -> None:
    """A webhook wake is an arq job on the standalone Redis (arq has no cluster support): it is
    delivered, and the cluster holds no arq key."""
    target = ScriptedTarget()
    async with serve_in_background(target) as base_url:
        target.base_url = base_url
        alice = await api.as_(ALICE)
        path = f"/v1/entities/hook/{uid('e')}"
        policy = {"targets": [{"type": "webhook", "url": target.url}]}
        r = await api.http.put(path, json={"dispatch_policy": policy}, headers=alice)
        assert r.status_code == 201, r.text
        r = await api.http.post(f"{path}/messages", json={"payload": "hook"}, headers=alice)
        assert r.status_code == 202, r.text
        (hit,) = await target.wait_hits(1)
        assert hit.json()["messages"][0]["payload"] == "hook"
    for node in redis_cluster.nodes:
        assert not [k for k in keys_on(node, server_settings.redis_key_prefix) if ":arq:" in k]
    assert queue_name(server_settings).startswith(server_settings.redis_key_prefix)


async def test_pubsub_client_reaches_subscribers_on_any_node(
    services: Services, server_settings: Settings
) -> None:
    """A classic PUBLISH sent through the cluster client reaches a subscriber on whichever
    node :func:`pubsub_client` picked."""
    await services.redis.ping()  # the cluster client learns the nodes
    subscriber = pubsub_client(server_settings, services.redis)
    channel = f"{server_settings.redis_key_prefix}:test-channel"
    try:
        async with subscriber.pubsub() as pubsub:
            await pubsub.subscribe(channel)
            assert (await pubsub.get_message(timeout=2))["type"] == "subscribe"
            assert await publish(services.redis, channel, "hello") >= 0

            async def message() -> Any:
                return await pubsub.get_message(ignore_subscribe_messages=True, timeout=0.5)

            got = await wait_for(message)
            assert got["data"] == "hello"
    finally:
        await subscriber.aclose()


# --- configuration ---------------------------------------------------------------------------


async def test_cluster_mode_that_disagrees_with_the_server_is_a_config_error(
    redis_cluster: LocalCluster, settings: Settings
) -> None:
    """One clear line, before anything would fail with MOVED or "cluster support disabled"."""
    standalone = settings  # the shared standalone Redis
    standalone_url = standalone.redis_url
    with pytest.raises(ConfigError, match="is not a Redis Cluster node"):
        await check_redis_mode(standalone.with_(redis_cluster=True, arq_redis_url=standalone_url))
    with pytest.raises(ConfigError, match="set PULLWAKE_REDIS_CLUSTER=1"):
        await check_redis_mode(standalone.with_(redis_url=redis_cluster.url))
    with pytest.raises(ConfigError, match=r"PULLWAKE_ARQ_REDIS_URL .* arq needs a standalone"):
        check_redis_mode_sync(
            standalone.with_(
                redis_url=redis_cluster.url,
                redis_cluster=True,
                arq_redis_url=redis_cluster.nodes[1].url,
            ),
            arq=True,
        )
    agreeing = standalone.with_(
        redis_url=redis_cluster.nodes[2].url, redis_cluster=True, arq_redis_url=standalone_url
    )
    await check_redis_mode(agreeing, arq=True)
    check_redis_mode_sync(agreeing, arq=True)


@pytest.mark.parametrize("command", ["serve", "worker"])
def test_cli_says_it_in_one_line(
    command: str,
    redis_cluster: LocalCluster,
    settings: Settings,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    assert settings.database_url is not None
    assert settings.redis_url is not None
    standalone_url = settings.redis_url
    monkeypatch.setenv("PULLWAKE_DATABASE_URL", settings.database_url)
    monkeypatch.setenv("PULLWAKE_REDIS_URL", standalone_url)
    monkeypatch.setenv("PULLWAKE_REDIS_CLUSTER", "1")
    monkeypatch.setenv("PULLWAKE_ARQ_REDIS_URL", standalone_url)
    assert cli_main([command]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("pullwake: configuration error: PULLWAKE_REDIS_CLUSTER=1 but "), err
    assert len(err.splitlines()) == 1, err
    monkeypatch.delenv("PULLWAKE_ARQ_REDIS_URL")
    monkeypatch.setenv("PULLWAKE_REDIS_URL", redis_cluster.url)
    assert cli_main([command]) == 2
    err = capsys.readouterr().err.strip()
    assert "needs PULLWAKE_ARQ_REDIS_URL" in err, err
    assert len(err.splitlines()) == 1, err


async def test_inspect_names_the_slot_and_its_primary(
    api: Any, services: Services, redis_cluster: LocalCluster
) -> None:
    alice = await api.as_(ALICE)
    runner_id = await register_runner(api.http, alice)
    await services.streams.ensure_group(runner_id)
    key = services.streams.keys.runner_wakes(runner_id)
    page = await inspect_runner(services, runner_id)
    node = redis_cluster.node_of(key)
    assert f"on primary 127.0.0.1:{node.port}" in page, page
    assert "group pullwake: consumers=0 pending=0" in page, page
