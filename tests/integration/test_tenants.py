"""Tenants are isolated: runner ids, entity types, entity data, stream and runner caps, and
claim tokens whose lease passed. Each test breaks one rule on purpose and shows it holds."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator

import asyncpg
import httpx

from pullwake.config import Settings

from .helpers import (
    ALICE,
    BOB,
    CAROL,
    assert_problem,
    claim,
    claim_ok,
    create_entity,
    register_runner,
    runner_policy,
    send,
    uid,
    wait_for,
)
from .servers import serve

WEBHOOK = {"targets": [{"type": "webhook", "url": "https://hooks.example.com/pullwake"}]}


# --- runner ids ------------------------------------------------------------------------------


async def test_a_deleted_runner_id_stays_reserved_for_its_owner(api, db: asyncpg.Connection):
    http = api.http
    alice, bob = await api.as_(ALICE), await api.as_(BOB)
    runner = await register_runner(http, alice)
    entity = await create_entity(http, alice, runner)
    await send(http, alice, entity, "for alice's runner only")
    assert (await http.delete(f"/v1/runners/{runner}", headers=alice)).status_code == 204

    resp = await http.post("/v1/runners", json={"id": runner}, headers=bob)
    assert_problem(resp, 403, "FORBIDDEN")
    assert await db.fetchval("SELECT count(*) FROM runners") == 0

    # The owner takes the id back, and with it her waiting work.
    resp = await http.post("/v1/runners", json={"id": runner}, headers=alice)
    assert resp.status_code == 201, resp.text
    wake_id = await db.fetchval("SELECT outstanding_wake_id FROM dispatch_state")
    note = await claim_ok(http, alice, runner, wake_id)
    assert [m["payload"] for m in note["messages"]] == ["for alice's runner only"]


async def test_a_runner_id_that_changed_hands_gains_none_of_the_old_work(
    api, db: asyncpg.Connection
):
    """Data from before ids were reserved: the id was deleted and taken by another principal."""
    http = api.http
    alice, bob = await api.as_(ALICE), await api.as_(BOB)
    runner = await register_runner(http, alice)
    entity = await create_entity(http, alice, runner)
    wake_id = (await send(http, alice, entity, "secret"))["wake"]["id"]
    await db.execute("UPDATE runners SET owner_principal = $1", BOB)
    await db.execute("UPDATE runner_id_owners SET owner_principal = $1", BOB)

    resp = await claim(http, bob, runner, wake_id)
    assert resp.status_code == 204, resp.text
    assert await db.fetchval("SELECT count(*) FROM claims") == 0
    # Parked for its creator to see, not woken for the new owner again and again.
    dispatch = (await http.get(entity.path, headers=alice)).json()["dispatch"]
    assert dispatch["outstanding_wake_id"] is None
    assert "another principal" in dispatch["parked_reason"]
    assert (await send(http, alice, entity, "more"))["wake"]["status"] == "held"


# --- entity types ------------------------------------------------------------------------------


async def test_only_its_owner_changes_or_reads_an_entity_type(api, db: asyncpg.Connection):
    http = api.http
    alice, bob = await api.as_(ALICE), await api.as_(BOB)
    runner = await register_runner(http, alice)
    name = uid("otype")
    resp = await http.put(
        f"/v1/entity-types/{name}",
        json={"default_dispatch_policy": runner_policy(runner)},
        headers=alice,
    )
    assert resp.status_code == 201
    assert resp.json()["owner_principal"] == ALICE

    hijack = {"default_dispatch_policy": WEBHOOK}
    assert_problem(
        await http.put(f"/v1/entity-types/{name}", json=hijack, headers=bob), 403, "FORBIDDEN"
    )
    assert_problem(await http.get(f"/v1/entity-types/{name}", headers=bob), 403, "FORBIDDEN")
    stored = await db.fetchval("SELECT default_dispatch_policy FROM entity_types")
    assert json.loads(stored) == runner_policy(runner)

    # Alice's new entities follow her default; the owner may change it.
    await create_entity(http, alice, entity_type=name)
    resp = await http.put(f"/v1/entity-types/{name}", json=hijack, headers=alice)
    assert resp.status_code == 200, resp.text


async def test_another_principals_default_policy_never_applies(api, db: asyncpg.Connection):
    """Bob's entity of alice's type does not follow alice's default (she could redirect it)."""
    http = api.http
    alice, bob = await api.as_(ALICE), await api.as_(BOB)
    name = uid("otype")
    body = {"default_dispatch_policy": WEBHOOK}
    assert (await http.put(f"/v1/entity-types/{name}", json=body, headers=alice)).is_success

    resp = await http.put(f"/v1/entities/{name}/{uid('e')}", json={}, headers=bob)
    problem = assert_problem(resp, 400, "INVALID_REQUEST")
    assert "another principal" in problem["detail"]
    bobs = await create_entity(http, bob, await register_runner(http, bob), entity_type=name)
    assert await db.fetchval("SELECT created_by FROM entities WHERE url = $1", bobs.url) == BOB


async def test_an_entity_type_from_before_owners_goes_to_its_next_writer(
    api, db: asyncpg.Connection
):
    http = api.http
    alice, bob = await api.as_(ALICE), await api.as_(BOB)
    name = uid("legacy")
    assert (await http.put(f"/v1/entity-types/{name}", json={}, headers=alice)).is_success
    await db.execute("UPDATE entity_types SET owner_principal = NULL")
    assert (await http.get(f"/v1/entity-types/{name}", headers=bob)).status_code == 200
    assert (await http.put(f"/v1/entity-types/{name}", json={}, headers=bob)).status_code == 200
    assert await db.fetchval("SELECT owner_principal FROM entity_types") == BOB
    resp = await http.put(f"/v1/entity-types/{name}", json={}, headers=alice)
    assert_problem(resp, 403, "FORBIDDEN")


# --- entity data -------------------------------------------------------------------------------


async def test_only_members_read_or_send(api, db: asyncpg.Connection):
    http = api.http
    alice, bob, carol = await api.as_(ALICE), await api.as_(BOB), await api.as_(CAROL)
    runner = await register_runner(http, alice)
    entity = await create_entity(http, alice, runner, members=[BOB])
    wake_id = (await send(http, bob, entity, "from bob"))["wake"]["id"]

    viewed = await http.get(entity.path, headers=bob)
    assert viewed.status_code == 200
    assert viewed.json()["members"] == [BOB]
    for method, path in (
        ("GET", entity.path),
        ("GET", f"{entity.path}/messages"),
        ("GET", f"{entity.path}/events"),
        ("GET", f"/v1/wakes/{wake_id}"),
        ("PUT", entity.path),
    ):
        resp = await http.request(method, path, headers=carol, json={"dispatch_policy": WEBHOOK})
        problem = assert_problem(resp, 403, "FORBIDDEN", f"{method} {path}")
        assert "not a member" in problem["detail"]
        assert "from bob" not in resp.text
    resp = await http.post(f"{entity.path}/messages", json={"payload": "x"}, headers=carol)
    assert_problem(resp, 403, "FORBIDDEN")
    # A member may read and send, but only the creator signals.
    resp = await http.post(f"{entity.path}/signal", json={"signal": "stop"}, headers=bob)
    assert_problem(resp, 403, "FORBIDDEN")
    rows = await db.fetch('SELECT "offset", sender FROM inbox_messages ORDER BY 1')
    assert [(r["offset"], r["sender"]) for r in rows] == [(1, BOB)]


async def test_star_grants_every_principal(api):
    http = api.http
    alice, carol = await api.as_(ALICE), await api.as_(CAROL)
    entity = await create_entity(http, alice, await register_runner(http, alice), members=["*"])
    await send(http, carol, entity, "anyone may")
    page = (await http.get(f"{entity.path}/messages", headers=carol)).json()
    assert [m["sender"] for m in page["messages"]] == [CAROL]


async def test_the_creator_changes_who_is_granted(api, db: asyncpg.Connection):
    http = api.http
    alice, bob = await api.as_(ALICE), await api.as_(BOB)
    entity = await create_entity(http, alice, await register_runner(http, alice))
    resp = await http.post(f"{entity.path}/messages", json={"payload": 1}, headers=bob)
    assert_problem(resp, 403, "FORBIDDEN")

    resp = await http.put(f"{entity.path}/members", json={"members": [BOB, BOB]}, headers=alice)
    assert resp.status_code == 200, resp.text
    assert resp.json()["members"] == [BOB]
    await send(http, bob, entity, "granted")
    # A member cannot widen (or narrow) the grant; the creator can revoke it.
    widen = {"members": ["*"]}
    assert_problem(
        await http.put(f"{entity.path}/members", json=widen, headers=bob), 403, "FORBIDDEN"
    )
    resp = await http.put(f"{entity.path}/members", json={"members": []}, headers=alice)
    assert resp.json()["members"] == []
    assert_problem(await http.get(entity.path, headers=bob), 403, "FORBIDDEN")
    assert await db.fetchval("SELECT members FROM entities") == []


async def test_members_must_be_principals(api):
    http = api.http
    alice = await api.as_(ALICE)
    runner = await register_runner(http, alice)
    for members in (["alice"], ["user:"], ["**"], "user:bob@example.com", [BOB] * 65):
        resp = await http.put(
            f"/v1/entities/t/{uid('e')}",
            json={"dispatch_policy": runner_policy(runner), "members": members},
            headers=alice,
        )
        problem = assert_problem(resp, 400, "INVALID_REQUEST", repr(members))
        assert "members" in problem["detail"]


# --- caps per principal --------------------------------------------------------------------------


async def test_runners_per_principal_are_capped(settings: Settings, db: asyncpg.Connection):
    async with serve(settings.with_(max_runners_per_principal=2)) as server:
        alice, bob = await server.headers(ALICE), await server.headers(BOB)
        first = await register_runner(server.http, alice)
        await register_runner(server.http, alice)
        resp = await server.http.post("/v1/runners", json={"id": uid("r")}, headers=alice)
        problem = assert_problem(resp, 403, "FORBIDDEN")
        assert "PULLWAKE_MAX_RUNNERS_PER_PRINCIPAL" in problem["detail"]
        # Updating one of hers is not a new runner; the cap is per principal; deleting frees.
        resp = await server.http.post("/v1/runners", json={"id": first}, headers=alice)
        assert resp.status_code == 200
        await register_runner(server.http, bob)
        assert (await server.http.delete(f"/v1/runners/{first}", headers=alice)).is_success
        await register_runner(server.http, alice)
        assert await db.fetchval("SELECT count(*) FROM runners WHERE owner_principal = $1", ALICE)


async def test_runner_cap_holds_under_concurrent_registrations(
    settings: Settings, db: asyncpg.Connection
):
    async with serve(settings.with_(max_runners_per_principal=3)) as server:
        alice = await server.headers(ALICE)
        answers = await asyncio.gather(
            *(
                server.http.post("/v1/runners", json={"id": uid("r")}, headers=alice)
                for _ in range(12)
            )
        )
        assert sorted(r.status_code for r in answers) == [201] * 3 + [403] * 9
        assert await db.fetchval("SELECT count(*) FROM runners") == 3


@contextlib.asynccontextmanager
async def _stream(
    http: httpx.AsyncClient, runner: str, headers: dict[str, str]
) -> AsyncIterator[httpx.Response]:
    async with http.stream("GET", f"/v1/runners/{runner}/wakes", headers=headers) as resp:
        if resp.status_code != 200:
            await resp.aread()
            yield resp
            return
        lines = resp.aiter_lines()  # kept open: dropping the iterator closes the response
        await anext(lines)  # the session holds its slot once it says hello
        yield resp


async def test_wake_streams_per_principal_are_capped(settings: Settings):
    async with serve(settings.with_(max_sse_per_principal=2)) as server:
        alice, bob = await server.headers(ALICE), await server.headers(BOB)
        runners = [await register_runner(server.http, alice) for _ in range(3)]
        async with (
            _stream(server.http, runners[0], alice) as one,
            _stream(server.http, runners[1], alice) as two,
        ):
            assert (one.status_code, two.status_code) == (200, 200)
            async with _stream(server.http, runners[2], alice) as three:
                problem = assert_problem(three, 429, "RATE_LIMITED")
                assert "PULLWAKE_MAX_SSE_PER_PRINCIPAL" in problem["detail"]
                assert int(three.headers["Retry-After"]) >= 1
            async with _stream(server.http, await register_runner(server.http, bob), bob) as b:
                assert b.status_code == 200  # another principal has its own count

        # Closed streams give their slots back (as soon as the server sees the disconnect).
        async def released() -> bool:
            limits = server.services.limits
            return not any([await limits.sse_sessions(r) for r in runners[:2]])

        await wait_for(released)
        async with _stream(server.http, runners[2], alice) as three:
            assert three.status_code == 200


# --- claim tokens whose lease passed -----------------------------------------------------------


async def test_a_lapsed_claim_token_reads_and_writes_nothing(api, db: asyncpg.Connection):
    """The lease passed but no sweep ran yet: every use of the token is refused."""
    http = api.http
    alice = await api.as_(ALICE)
    runner = await register_runner(http, alice)
    entity = await create_entity(http, alice, runner)
    note = await claim_ok(http, alice, runner, (await send(http, alice, entity, "m"))["wake"]["id"])
    await db.execute("UPDATE claims SET lease_expires_at = now() - interval '1 second'")
    await db.execute(
        "UPDATE dispatch_state SET active_lease_expires_at = now() - interval '1 second'"
    )
    token = {"Authorization": f"Bearer {note['claim_token']}"}
    epoch = note["epoch"]
    for method, path, body in (
        ("GET", f"{entity.path}/messages", None),
        ("GET", f"{entity.path}/events", None),
        ("POST", f"{entity.path}/events", {"payload": 1, "epoch": epoch}),
        ("POST", f"/v1/claims/{note['claim_id']}/heartbeat", {"epoch": epoch}),
        ("POST", f"/v1/claims/{note['claim_id']}/done", {"epoch": epoch, "acked_offset": 1}),
    ):
        resp = await http.request(method, path, headers=token, json=body)
        # The first write expires the claim on the spot; later calls see it expired.
        assert_problem(resp, 409, "LEASE_EXPIRED", f"{method} {path}")
        assert '"m"' not in resp.text
    assert await db.fetchval("SELECT acked_offset FROM dispatch_state") == 0
    assert await db.fetchval("SELECT count(*) FROM entity_events") == 0
