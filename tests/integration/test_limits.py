"""Every limit is a setting with a safe default, and each one is enforced: request body, message
and event payload, page size, label/tag sizes and counts, id formats, wake streams per runner and
the per-principal send rate (both kept in Redis, so they hold across API replicas)."""

from __future__ import annotations

import asyncio
import contextlib
import time
from urllib.parse import quote

import pytest
from redis.asyncio import Redis

from pullwake import limits as limits_module
from pullwake.config import Settings
from pullwake.errors import ConfigError
from pullwake.limits import Limits
from pullwake.model import Principal
from pullwake.streams import Keys

from .helpers import (
    ALICE,
    BOB,
    assert_problem,
    claim_ok,
    create_entity,
    register_runner,
    runner_policy,
    send,
    uid,
)
from .servers import Server, serve

# --- settings ----------------------------------------------------------------------------------


def test_limits_have_safe_defaults() -> None:
    s = Settings()
    assert s.max_body_bytes == 1_048_576
    assert s.max_payload_bytes == 262_144
    assert s.page_limit_max == 1_000
    assert s.max_sse_per_runner == 16
    assert (s.send_rate_per_s, s.send_burst) == (None, None)  # no send limit unless asked


def test_send_limit_is_opt_in_and_its_burst_defaults_to_two_seconds() -> None:
    assert Settings.from_env({}).send_rate_per_s is None
    assert Settings.from_env({"PULLWAKE_SEND_RATE_PER_S": ""}).send_rate_per_s is None
    s = Settings.from_env({"PULLWAKE_SEND_RATE_PER_S": "50"})
    assert (s.send_rate_per_s, s.send_burst, s.send_burst_effective) == (50, None, 100)
    s = Settings.from_env({"PULLWAKE_SEND_RATE_PER_S": "50", "PULLWAKE_SEND_BURST": "7"})
    assert s.send_burst_effective == 7
    with pytest.raises(ConfigError, match="PULLWAKE_SEND_BURST"):
        Settings.from_env({"PULLWAKE_SEND_BURST": "7"})  # a burst without a rate limits nothing


def test_limits_are_read_from_the_environment() -> None:
    s = Settings.from_env(
        {
            "PULLWAKE_MAX_BODY_BYTES": "4096",
            "PULLWAKE_MAX_PAYLOAD_BYTES": "1024",
            "PULLWAKE_PAGE_LIMIT_MAX": "50",
            "PULLWAKE_MAX_SSE_PER_RUNNER": "2",
            "PULLWAKE_SEND_RATE_PER_S": "5",
            "PULLWAKE_SEND_BURST": "10",
        }
    )
    assert (s.max_body_bytes, s.max_payload_bytes, s.page_limit_max) == (4096, 1024, 50)
    assert (s.max_sse_per_runner, s.send_rate_per_s, s.send_burst) == (2, 5, 10)


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("MAX_PAYLOAD_BYTES", "0"),
        ("MAX_SSE_PER_RUNNER", "0"),
        ("SEND_RATE_PER_S", "-1"),
        ("SEND_BURST", "0"),
        ("PAGE_LIMIT_MAX", "1001"),
    ],
)
def test_limits_refuse_unsafe_values(name: str, value: str) -> None:
    with pytest.raises(ConfigError, match=f"PULLWAKE_{name}"):
        Settings.from_env({f"PULLWAKE_{name}": value})


# --- sizes -------------------------------------------------------------------------------------


async def test_request_body_limit_applies_to_every_body(settings: Settings) -> None:
    async with serve(settings.with_(max_body_bytes=2048)) as server:
        alice = await server.headers(ALICE)
        runner = await register_runner(server.http, alice)
        entity = await create_entity(server.http, alice, runner)
        big = "x" * 3000
        for method, path, body in (
            ("POST", "/v1/runners", {"id": runner, "label": big}),
            ("POST", f"/v1/runners/{runner}/heartbeat", {"diagnostics": {"note": big}}),
            ("PUT", f"/v1/entities/t/{uid('e')}", {"tags": {"k": big}}),
            ("POST", f"{entity.path}/messages", {"payload": big}),
            ("POST", f"/v1/runners/{runner}/claim", {"wake_id": big}),
        ):
            resp = await server.http.request(method, path, json=body, headers=alice)
            assert_problem(resp, 413, "PAYLOAD_TOO_LARGE")


async def test_message_payload_limit(settings: Settings, db) -> None:
    limit = 1000
    async with serve(settings.with_(max_payload_bytes=limit)) as server:
        alice = await server.headers(ALICE)
        runner = await register_runner(server.http, alice)
        entity = await create_entity(server.http, alice, runner)
        at_limit = "a" * (limit - 2)  # JSON adds the two quotes
        over = at_limit + "a"

        resp = await server.http.post(
            f"{entity.path}/messages", json={"payload": over}, headers=alice
        )
        body = assert_problem(resp, 413, "PAYLOAD_TOO_LARGE")
        assert "PULLWAKE_MAX_PAYLOAD_BYTES" in body["detail"]
        resp = await server.http.put(
            f"/v1/entities/t/{uid('e')}",
            json={"dispatch_policy": runner_policy(runner), "initial_message": {"payload": over}},
            headers=alice,
        )
        assert_problem(resp, 413, "PAYLOAD_TOO_LARGE")
        assert await db.fetchval("SELECT count(*) FROM inbox_messages") == 0

        sent = await send(server.http, alice, entity, at_limit)
        note = await claim_ok(server.http, alice, runner, sent["wake"]["id"])
        token = {"Authorization": f"Bearer {note['claim_token']}"}
        resp = await server.http.post(
            f"{entity.path}/events", json={"payload": over, "epoch": note["epoch"]}, headers=token
        )
        assert_problem(resp, 413, "PAYLOAD_TOO_LARGE")
        resp = await server.http.post(
            f"{entity.path}/events",
            json={"payload": at_limit, "epoch": note["epoch"]},
            headers=token,
        )
        assert resp.status_code == 201, resp.text
        assert await db.fetchval("SELECT count(*) FROM entity_events") == 1


async def test_page_size_limit(settings: Settings) -> None:
    async with serve(settings.with_(page_limit_max=5)) as server:
        alice = await server.headers(ALICE)
        entity = await create_entity(server.http, alice, await register_runner(server.http, alice))
        for i in range(7):
            await send(server.http, alice, entity, i)
        for log in ("messages", "events"):
            resp = await server.http.get(f"{entity.path}/{log}?limit=6", headers=alice)
            assert "limit" in assert_problem(resp, 400, "INVALID_REQUEST")["detail"]
            resp = await server.http.get(f"{entity.path}/{log}?limit=1001", headers=alice)
            assert "limit" in assert_problem(resp, 400, "INVALID_REQUEST")["detail"]
        page = (await server.http.get(f"{entity.path}/messages?limit=5", headers=alice)).json()
        assert (len(page["messages"]), page["more"]) == (5, True)


KEY = "i" * 200


@pytest.mark.parametrize(
    ("what", "body", "ok"),
    [
        ("32 tags", {"tags": {f"k{i}": "v" for i in range(32)}}, True),
        ("33 tags", {"tags": {f"k{i}": "v" for i in range(33)}}, False),
        ("tag key of 64", {"tags": {"k" * 64: "v"}}, True),
        ("tag key of 65", {"tags": {"k" * 65: "v"}}, False),
        ("empty tag key", {"tags": {"": "v"}}, False),
        ("tag value of 256", {"tags": {"k": "v" * 256}}, True),
        ("tag value of 257", {"tags": {"k": "v" * 257}}, False),
        ("non-string tag value", {"tags": {"k": 1}}, False),
        (
            "idempotency key of 200",
            {"initial_message": {"payload": 1, "idempotency_key": "i" * 200}},
            True,
        ),
        (
            "idempotency key of 201",
            {"initial_message": {"payload": 1, "idempotency_key": "i" * 201}},
            False,
        ),
    ],
)
async def test_tag_sizes_and_counts(http, alice, world, what, body, ok) -> None:
    resp = await http.put(
        f"/v1/entities/t/{uid('e')}",
        json={"dispatch_policy": runner_policy(world.runner_id), **body},
        headers=alice,
    )
    if ok:
        assert resp.status_code == 201, (what, resp.text)
    else:
        assert_problem(resp, 400, "INVALID_REQUEST")


@pytest.mark.parametrize(
    ("what", "body", "ok"),
    [
        ("label of 200", {"label": "l" * 200}, True),
        ("label of 201", {"label": "l" * 201}, False),
        ("64 diagnostics", {"diagnostics": {f"d{i}": i for i in range(64)}}, True),
        ("65 diagnostics", {"diagnostics": {f"d{i}": i for i in range(65)}}, False),
        ("lease of 1 s", {"lease_ms": 1_000}, True),
        ("lease under 1 s", {"lease_ms": 999}, False),
        ("lease over a day", {"lease_ms": 86_400_001}, False),
    ],
)
async def test_runner_label_and_diagnostics_limits(http, alice, world, what, body, ok) -> None:
    path = "/v1/runners" if "label" in body else f"/v1/runners/{world.runner_id}/heartbeat"
    if "label" in body:
        body = {"id": world.runner_id, **body}
    resp = await http.post(path, json=body, headers=alice)
    if ok:
        assert resp.status_code == 200, (what, resp.text)
    else:
        assert_problem(resp, 400, "INVALID_REQUEST")


IDS = [
    ("a", True),
    ("A.b_c-9", True),
    ("x" * 128, True),
    ("x" * 129, False),
    ("-lead", False),
    (".lead", False),
    ("_lead", False),
    ("has space", False),
    ("brace{tag}", False),
    ("colon:x", False),
    ("slash/x", False),
    ("dots..", True),
    ("trailing\n", False),
    ("ünïcode", False),
    ("emoji\U0001f600", False),
]


@pytest.mark.parametrize(("raw", "ok"), IDS)
async def test_id_formats(http, alice, world, raw, ok) -> None:
    """Runner, entity type and entity ids share one format, in bodies and in paths. Ids also
    name Redis keys, so a brace (a Redis Cluster hash tag) or a colon can never get in."""
    resp = await http.post("/v1/runners", json={"id": raw}, headers=alice)
    assert resp.status_code == (201 if ok else 400), (raw, resp.text)
    in_path = quote(raw, safe="")
    # an encoded slash is decoded before routing: the path then names no route at all
    refused = 404 if "/" in raw else 400
    policy = {"dispatch_policy": runner_policy(world.runner_id)}
    for method, path, body, accepted in (
        ("GET", f"/v1/runners/{in_path}", None, 200),
        ("PUT", f"/v1/entities/{in_path}/e", policy, 201),
        ("PUT", f"/v1/entities/t/{in_path}", policy, 201),
        ("PUT", f"/v1/entity-types/{in_path}", {}, 201),
    ):
        resp = await http.request(method, path, json=body, headers=alice)
        assert resp.status_code == (accepted if ok else refused), (raw, path, resp.text)


@pytest.mark.parametrize(
    "claim_id",
    ["wk_", "wk_0123", "wk_" + "0" * 41, "WK_0123456789ab", "wk_0123456789ag", "0123456789abcd"],
)
async def test_claim_and_wake_id_formats(http, alice, claim_id) -> None:
    for method, path, body, name in (
        ("POST", f"/v1/claims/{claim_id}/done", {"epoch": 1, "acked_offset": 0}, "claim_id"),
        ("POST", f"/v1/claims/{claim_id}/heartbeat", {"epoch": 1}, "claim_id"),
        ("GET", f"/v1/wakes/{claim_id}", None, "wake_id"),
    ):
        headers = alice if method == "GET" else {"Authorization": "Bearer pwc_x"}
        resp = await http.request(method, path, json=body, headers=headers)
        assert name in assert_problem(resp, 400, "INVALID_REQUEST")["detail"]


# --- wake streams per runner -------------------------------------------------------------------


async def _open_stream(stack: contextlib.AsyncExitStack, server: Server, headers, runner: str):
    resp = await stack.enter_async_context(
        server.http.stream("GET", f"/v1/runners/{runner}/wakes", headers=headers)
    )
    return resp


async def test_wake_streams_per_runner_are_capped(settings: Settings, redis: Redis) -> None:
    async with serve(settings.with_(max_sse_per_runner=2)) as server:
        alice = await server.headers(ALICE)
        runner, spare = (
            await register_runner(server.http, alice),
            await register_runner(server.http, alice),
        )
        async with contextlib.AsyncExitStack() as stack:
            first = await _open_stream(stack, server, alice, runner)
            second = await _open_stream(stack, server, alice, runner)
            assert (first.status_code, second.status_code) == (200, 200)
            resp = await server.http.get(f"/v1/runners/{runner}/wakes", headers=alice)
            body = assert_problem(resp, 429, "RATE_LIMITED")
            assert "PULLWAKE_MAX_SSE_PER_RUNNER" in body["detail"]
            assert int(resp.headers["Retry-After"]) >= 1
            # another runner of the same owner has its own count
            async with server.http.stream(
                "GET", f"/v1/runners/{spare}/wakes", headers=alice
            ) as other:
                assert other.status_code == 200
            assert await server.services.limits.sse_sessions(runner) == 2
            await first.aclose()

            async def reopened() -> bool:
                async with server.http.stream(
                    "GET", f"/v1/runners/{runner}/wakes", headers=alice
                ) as again:
                    return again.status_code == 200

            deadline = time.monotonic() + 5
            while not await reopened():
                assert time.monotonic() < deadline, "a closed stream never gave its slot back"
                await asyncio.sleep(0.05)
        await _wait_for_sessions(server, runner, 0)


async def _wait_for_sessions(server: Server, runner: str, count: int) -> None:
    deadline = time.monotonic() + 5
    while await server.services.limits.sse_sessions(runner) != count:
        assert time.monotonic() < deadline
        await asyncio.sleep(0.05)


async def test_open_stream_keeps_its_slot_alive(settings: Settings) -> None:
    """The slot's TTL is three keep-alive intervals; an open stream refreshes it."""
    async with serve(settings.with_(sse_keepalive_ms=200, sse_block_ms=50)) as server:
        alice = await server.headers(ALICE)
        runner = await register_runner(server.http, alice)
        async with server.http.stream("GET", f"/v1/runners/{runner}/wakes", headers=alice) as r:
            assert r.status_code == 200
            lines = r.aiter_lines()
            started = time.monotonic()
            while time.monotonic() - started < 1.5:  # over twice the 600 ms TTL
                await asyncio.wait_for(anext(lines), timeout=2)
            assert await server.services.limits.sse_sessions(runner) == 1


@pytest.mark.parametrize("members_per_call", [2_000, 3])
async def test_refreshing_many_slots_at_once(
    settings: Settings, redis: Redis, monkeypatch: pytest.MonkeyPatch, members_per_call: int
) -> None:
    """One refresh of many sessions' slots (what the wake reader does every tick): every slot
    of every set gets a fresh expiry, expired members go, other members are left alone, also
    when the members are split over several script calls (3 per call: sets straddle calls)."""
    monkeypatch.setattr(limits_module, "_REFRESH_MANY_MEMBERS", members_per_call)
    fast = settings.with_(sse_keepalive_ms=100, sse_block_ms=50)  # slots live 300 ms
    limits = Limits(redis, Keys(settings.redis_key_prefix), fast)
    alice = Principal.parse(ALICE)
    runners = [uid("r") for _ in range(4)]
    slots = [await limits.open_sse(runners[n % 4], f"s{n}", alice) for n in range(10)]
    stale = await limits.open_sse(uid("r"), "stale", alice)
    principal_key = stale.keys[-1]
    assert all(slot.keys[-1] == principal_key for slot in slots)
    await asyncio.sleep(0.2)
    await limits.refresh_slots(slots)  # not ``stale``
    stale_expiry = await redis.zscore(principal_key, stale.member)
    for slot in slots:
        for key in slot.keys:  # its runner's set and its principal's: pushed 200 ms forward
            assert await redis.zscore(key, slot.member) >= stale_expiry + 150
    await asyncio.sleep(0.35)  # past stale's expiry and its runner set's
    assert not await redis.exists(stale.keys[0])
    await limits.refresh_slots(slots[:1])  # past the others' expiry too: only this one is left
    assert await redis.zrange(principal_key, 0, -1) == [slots[0].member]
    for runner in runners[1:]:
        assert await limits.sse_sessions(runner) == 0


async def test_slots_of_a_crashed_replica_expire(settings: Settings, redis: Redis) -> None:
    async with serve(settings.with_(max_sse_per_runner=1)) as server:
        alice = await server.headers(ALICE)
        runner = await register_runner(server.http, alice)
        # A replica whose slots live 300 ms took the only slot and died without closing it.
        fast = settings.with_(sse_keepalive_ms=100, sse_block_ms=50)
        crashed = Limits(redis, Keys(settings.redis_key_prefix), fast)
        await crashed.open_sse(runner, "ghost", Principal.parse(ALICE))
        resp = await server.http.get(f"/v1/runners/{runner}/wakes", headers=alice)
        assert_problem(resp, 429, "RATE_LIMITED")
        await asyncio.sleep(0.5)
        async with server.http.stream("GET", f"/v1/runners/{runner}/wakes", headers=alice) as r:
            assert r.status_code == 200


# --- send rate ---------------------------------------------------------------------------------


async def test_default_settings_take_500_quick_sends(settings: Settings, redis: Redis) -> None:
    async with serve(settings) as server:
        alice = await server.headers(ALICE)
        entity = await create_entity(server.http, alice, await register_runner(server.http, alice))
        statuses: list[int] = []
        for start in range(0, 500, 50):
            sends = [
                server.http.post(f"{entity.path}/messages", json={"payload": i}, headers=alice)
                for i in range(start, start + 50)
            ]
            statuses += [resp.status_code for resp in await asyncio.gather(*sends)]
        assert statuses == [202] * 500
    # no limit, no bucket: the check made no Redis round trip
    key = Keys(settings.redis_key_prefix).principal_send_rate(ALICE)
    assert await redis.exists(key) == 0


async def test_retry_after_and_detail_agree(settings: Settings) -> None:
    async with serve(settings.with_(send_rate_per_s=1, send_burst=1)) as server:
        alice = await server.headers(ALICE)
        entity = await create_entity(server.http, alice, await register_runner(server.http, alice))
        await send(server.http, alice, entity, 0)
        for i in range(3):
            resp = await server.http.post(
                f"{entity.path}/messages", json={"payload": i}, headers=alice
            )
            body = assert_problem(resp, 429, "RATE_LIMITED")
            retry_after_s = int(resp.headers["Retry-After"])
            assert retry_after_s == 1
            assert body["detail"].endswith(f"retry in {retry_after_s} s"), body
            assert body["extra"] == {"retry_after_s": retry_after_s}, body


async def test_send_rate_per_principal(settings: Settings, db) -> None:
    async with serve(settings.with_(send_rate_per_s=2, send_burst=3)) as server:
        alice, bob = await server.headers(ALICE), await server.headers(BOB)
        runner = await register_runner(server.http, alice)
        entity = await create_entity(server.http, alice, runner, members=[BOB])
        for i in range(3):
            await send(server.http, alice, entity, i)
        resp = await server.http.post(f"{entity.path}/messages", json={"payload": 3}, headers=alice)
        body = assert_problem(resp, 429, "RATE_LIMITED")
        retry_after = int(resp.headers["Retry-After"])
        assert retry_after >= 1
        assert ALICE in body["detail"]
        resp = await server.http.put(
            f"/v1/entities/t/{uid('e')}",
            json={"dispatch_policy": None, "initial_message": {"payload": 1}},
            headers=alice,
        )
        assert_problem(resp, 429, "RATE_LIMITED")
        assert await db.fetchval("SELECT count(*) FROM inbox_messages") == 3
        await send(server.http, bob, entity, "bob is not alice")  # buckets are per principal
        await asyncio.sleep(retry_after)
        await send(server.http, alice, entity, "after Retry-After")


async def test_send_rate_is_shared_by_replicas(settings: Settings) -> None:
    limited = settings.with_(send_rate_per_s=1, send_burst=4)
    async with serve(limited) as one, serve(limited) as two:
        alice = await one.headers(ALICE)
        entity = await create_entity(one.http, alice, await register_runner(one.http, alice))
        statuses = []
        for i in range(6):
            replica = (one, two)[i % 2]
            resp = await replica.http.post(
                f"{entity.path}/messages", json={"payload": i}, headers=alice
            )
            statuses.append(resp.status_code)
        assert statuses[:4] == [202, 202, 202, 202]
        assert 429 in statuses[4:], statuses
