"""Postgres round trips per operation, counted on the server's own connections.

Every statement the server sends is one round trip once asyncpg's statement cache is warm (the
sequence runs once to warm it, then again to count). ``CEILINGS`` is what each operation costs
today: an operation that grows fails here, and one that shrinks should lower its ceiling.

The API token and the runner's owner and admin status come from the auth cache (no statement).
In strict mode a cache hit waits for a round on the cache's own listener connection instead
(``SELECT pg_backend_pid()``, shared by concurrent requests): those are counted apart, in
``LISTENER_ROUNDS``, at most one per HTTP request however many cached checks it makes.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import asyncpg

from pullwake.services import Services
from pullwake.store import q

from .helpers import ALICE, bearer, claim_ok, create_entity, register_runner, send

# Per HTTP request, on the pool's connections. Delivery records are written in batches off the
# request path: they are counted apart (test_deliveries_are_recorded_in_batches). The API token
# and the runner's owner and admin status come from the auth cache: before it, every API-token
# request cost one more statement (the token lookup), and a claim one more again (the runner).
CEILINGS = {
    "send, queued": 1,
    "send, coalesced": 1,
    "send, traced (traceparent)": 1,
    "claim": 1,
    "claim heartbeat": 1,
    "event append": 1,
    "inbox page (claim token)": 3,
    "done, follow-up wake": 1,
    "done": 1,
    "release": 1,
    "signal": 2,
    "lease expiry sweep (one claim)": 1,
    "done, chained (claim_next)": 1,
}
# Strict auth cache rounds on the listener connection (one request at a time: nothing shared).
LISTENER_ROUNDS = {
    "send, queued": 1,
    "send, coalesced": 1,
    "send, traced (traceparent)": 1,
    "claim": 1,
    "signal": 1,
}


DELIVERY_RECORD = q("wakes_mark_delivered")


@dataclass(eq=False)  # hashable: asyncpg keeps its query loggers in a set
class Counter:
    """Counts the statements the store sends while ``measure`` runs one operation."""

    statements: list[str] = field(default_factory=list)
    counts: dict[str, int] = field(default_factory=dict)
    services: Services | None = None
    rounds: dict[str, int] = field(default_factory=dict)
    listener: Any = None

    def __call__(self, record: Any) -> None:
        if DELIVERY_RECORD in record.query and self.services is not None:
            return  # the delivery log's batch, written off the request path (counted below)
        self.statements.append(record.query)

    async def measure(self, name: str, operation: Callable[[], Awaitable[Any]]) -> Any:
        if self.services is not None:
            # Deliveries are recorded in batches off the request path (counted on their own
            # below): the previous operation's batch is written before this one is counted.
            await self.services.publisher.flush()
        self.statements.clear()
        rounds = self._rounds()
        result = await operation()
        for _ in range(3):  # asyncpg calls its query loggers soon after each statement
            await asyncio.sleep(0)
        self.counts[name] = len(self.statements)
        self.rounds[name] = self._rounds() - rounds
        return result

    def _rounds(self) -> int:
        return 0 if self.listener is None else int(self.listener.rounds)


async def _sequence(api: Any, services: Services, db: asyncpg.Connection, count: Counter) -> None:
    http = api.http
    alice = await api.as_(ALICE)
    runner = await register_runner(http, alice)
    entity = await create_entity(http, alice, runner)
    await services.streams.ensure_group(runner)

    sent = await count.measure("send, queued", lambda: send(http, alice, entity, 1))
    await count.measure("send, coalesced", lambda: send(http, alice, entity, 2))
    note = await count.measure("claim", lambda: claim_ok(http, alice, runner, sent["wake"]["id"]))
    token = bearer(note["claim_token"])
    claim_url = f"/v1/claims/{note['claim_id']}"
    epoch = note["epoch"]
    await count.measure(
        "claim heartbeat",
        lambda: http.post(f"{claim_url}/heartbeat", json={"epoch": epoch}, headers=token),
    )
    await count.measure(
        "event append",
        lambda: http.post(
            f"{entity.path}/events", json={"payload": 1, "epoch": epoch}, headers=token
        ),
    )
    await count.measure(
        "inbox page (claim token)", lambda: http.get(f"{entity.path}/messages", headers=token)
    )
    resp = await count.measure(
        "done, follow-up wake",
        lambda: http.post(
            f"{claim_url}/done", json={"epoch": epoch, "acked_offset": 1}, headers=token
        ),
    )
    assert resp.json() == {"ok": True, "next_wake": True}, resp.text

    follow_up = await db.fetchval(
        "SELECT outstanding_wake_id FROM dispatch_state WHERE entity_url = $1", entity.url
    )
    note = await claim_ok(http, alice, runner, follow_up)
    token, claim_url = bearer(note["claim_token"]), f"/v1/claims/{note['claim_id']}"
    body = {"epoch": note["epoch"], "acked_offset": 2}
    resp = await count.measure(
        "done", lambda: http.post(f"{claim_url}/done", json=body, headers=token)
    )
    assert resp.json() == {"ok": True, "next_wake": False}, resp.text

    wake_id = (await send(http, alice, entity, 3))["wake"]["id"]
    note = await claim_ok(http, alice, runner, wake_id)
    token, claim_url = bearer(note["claim_token"]), f"/v1/claims/{note['claim_id']}"
    body = {"epoch": note["epoch"]}
    await count.measure(
        "release", lambda: http.post(f"{claim_url}/release", json=body, headers=token)
    )
    await count.measure(
        "signal",
        lambda: http.post(f"{entity.path}/signal", json={"signal": "pause"}, headers=alice),
    )
    await http.post(f"{entity.path}/signal", json={"signal": "resume"}, headers=alice)

    wake_id = await db.fetchval(
        "SELECT outstanding_wake_id FROM dispatch_state WHERE entity_url = $1", entity.url
    )
    await claim_ok(http, alice, runner, wake_id)
    await db.execute(
        "UPDATE dispatch_state SET active_lease_expires_at = now() - interval '1 s' "
        "WHERE entity_url = $1",
        entity.url,
    )
    report = await count.measure(
        "lease expiry sweep (one claim)", lambda: services.recovery.expire_claims()
    )
    assert report.expired_claims == 1

    wake_id = await db.fetchval(
        "SELECT outstanding_wake_id FROM dispatch_state WHERE entity_url = $1", entity.url
    )
    note = await claim_ok(http, alice, runner, wake_id)
    traced = {**alice, "traceparent": "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"}
    await count.measure("send, traced (traceparent)", lambda: send(http, traced, entity, 4))
    token, claim_url = bearer(note["claim_token"]), f"/v1/claims/{note['claim_id']}"
    body = {"epoch": note["epoch"], "acked_offset": note["tail_offset"], "claim_next": True}
    resp = await count.measure(
        "done, chained (claim_next)",
        lambda: http.post(f"{claim_url}/done", json=body, headers=token),
    )
    assert resp.json()["next_claim"]["epoch"] == note["epoch"] + 1, resp.text


async def test_round_trips_per_operation_do_not_grow(api, db: asyncpg.Connection) -> None:
    services: Services = api.services
    listener = services.auth_cache.listener
    assert listener is not None
    count = Counter(services=services, listener=listener)
    await _sequence(
        api, services, db, Counter(services=services)
    )  # warms every connection's statement cache
    services.store.observer = count
    try:
        await _sequence(api, services, db, count)
    finally:
        services.store.observer = None
    report = "\n".join(
        f"  {name}: {n} (ceiling {CEILINGS[name]}), listener rounds {count.rounds[name]}"
        for name, n in count.counts.items()
    )
    print(f"Postgres round trips per operation:\n{report}")
    assert count.counts.keys() == CEILINGS.keys()
    grown = {name: n for name, n in count.counts.items() if n > CEILINGS[name]}
    assert not grown, f"round trips grew:\n{report}"
    rounds = {name: n for name, n in count.rounds.items() if n}
    assert rounds == LISTENER_ROUNDS, f"listener rounds changed:\n{report}"


async def test_deliveries_are_recorded_in_batches(api, db: asyncpg.Connection) -> None:
    """Publishing a wake costs the request no Postgres round trip: the delivery (entry id,
    ``delivered``) is written by one UPDATE per batch of wakes published meanwhile."""
    services: Services = api.services
    http, alice = api.http, await api.as_(ALICE)
    runner = await register_runner(http, alice)
    entities = [await create_entity(http, alice, runner) for _ in range(20)]
    await services.streams.ensure_group(runner)
    await services.publisher.flush()
    count = Counter()
    services.store.observer = count
    try:
        await asyncio.gather(*(send(http, alice, entity, 1) for entity in entities))
        await services.publisher.flush()
    finally:
        services.store.observer = None
    writes = [s for s in count.statements if s == DELIVERY_RECORD]
    sends = [s for s in count.statements if "pullwake_send" in s]
    assert 1 <= len(sends) <= 20  # concurrent sends may share calls (the next test)
    assert 1 <= len(writes) < 20, count.statements
    delivered = await db.fetchval(
        "SELECT count(*) FROM wakes WHERE delivery_status = 'delivered'"
        " AND stream_entry_id IS NOT NULL"
    )
    assert delivered == 20


async def test_concurrent_sends_share_postgres_calls(api, db: asyncpg.Connection) -> None:
    """Sends that arrive while two are in flight wait and go to Postgres together (one call,
    one commit): 40 concurrent sends, 32 of them to one entity, take a handful of calls, and
    each is answered as if sent alone (distinct offsets, every stored message accounted)."""
    services: Services = api.services
    http, alice = api.http, await api.as_(ALICE)
    runner = await register_runner(http, alice)
    hot = await create_entity(http, alice, runner)
    others = [await create_entity(http, alice, runner) for _ in range(8)]
    await services.streams.ensure_group(runner)
    await send(http, alice, hot, 0)  # the hot entity's wake is outstanding from here on
    await services.publisher.flush()
    count = Counter()
    services.store.observer = count
    try:
        answers = await asyncio.gather(
            *(send(http, alice, hot, n) for n in range(1, 33)),
            *(send(http, alice, entity, 1) for entity in others),
        )
        for _ in range(3):
            await asyncio.sleep(0)
    finally:
        services.store.observer = None
    calls = [s for s in count.statements if "pullwake_send" in s]
    assert 1 <= len(calls) <= 40 // 4, calls
    assert sorted(a["offset"] for a in answers[:32]) == list(range(2, 34))
    assert {a["wake"]["status"] for a in answers[:32]} == {"coalesced"}
    assert {a["wake"]["status"] for a in answers[32:]} == {"queued"}
    stored = await db.fetch(
        'SELECT payload FROM inbox_messages WHERE entity_url = $1 ORDER BY "offset"', hot.url
    )
    assert len(stored) == 33
