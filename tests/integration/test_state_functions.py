"""Differential tests: the PL/pgSQL state machine (migration 0007) against pullwake.model.

The pure rule functions of ``pullwake.model`` (wake_allowed, signal_outcome, decide_done,
next_failed_attempts, status_after_claim_end) are the specification; here every combination of
a small state space is written straight into the tables, the SQL function is called directly
and its effect compared with what the rule table says. Each case runs in a transaction that is
rolled back, on one connection, so the cases are independent and cheap (``now()`` is fixed per
transaction: a lease set to ``now() - 1 s`` has passed, one at ``now() + 60 s`` holds).

Disagreements are collected per test and reported together, each naming its combination.
"""

from __future__ import annotations

import itertools
import json
import random
import secrets
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, fields
from datetime import UTC, datetime
from typing import Any

import asyncpg
import pytest

from pullwake.errors import EntityNotRunnable, InvalidOffset
from pullwake.model import (
    EntityStatus,
    Signal,
    decide_done,
    hash_token,
    new_claim_token,
    next_failed_attempts,
    signal_outcome,
    status_after_claim_end,
    wake_allowed,
)
from pullwake.store.steps import Step

from .helpers import ALICE, BOB, uid

MAX = 3
"""p_max_attempts for every call: small, so that the cases reach it."""
RUNNER = "r-diff"
TARGET = {"type": "runner", "runner_id": RUNNER}
POLICY = json.dumps({"targets": [TARGET]})
PAST = datetime(2000, 1, 1, tzinfo=UTC)
"""Every timestamp a case sets up (but leases): a call that touches a row shows."""
LEASE_MS = 60_000
STATUSES = list(EntityStatus)
OFFSETS = [(tail, acked) for tail in range(3) for acked in range(tail + 1)]
"""(tail_offset, acked_offset) pairs: nothing sent, all acked, pending work."""
HOLDS = ("none", "wake", "claim")
"""What the entity has: nothing, an outstanding wake, an active claim (never both: CHECK)."""


# --- plumbing ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
async def conn(database_url: str) -> AsyncIterator[asyncpg.Connection]:
    """One connection for the whole module; every case rolls its rows back."""
    connection = await asyncpg.connect(database_url)
    try:
        yield connection
    finally:
        await connection.close()


@asynccontextmanager
async def rolled_back(conn: asyncpg.Connection) -> AsyncIterator[None]:
    tr = conn.transaction()
    await tr.start()
    try:
        yield
    finally:
        await tr.rollback()


async def step(conn: asyncpg.Connection, sql: str, *args: Any) -> Step:
    row = await conn.fetchrow(sql, *args)
    assert row is not None, sql
    return Step(*row)


DONE = "SELECT * FROM pullwake_done($1, $2, $3, $4, false, NULL, $5, 100, 262144, $6)"
RELEASE = "SELECT * FROM pullwake_release($1, $2, $3, $4, $5)"
HEARTBEAT = "SELECT * FROM pullwake_heartbeat($1, $2, $3, $4, $5)"
EVENT = "SELECT * FROM pullwake_event($1, $2, $3::jsonb, $4, $5)"
SIGNAL = "SELECT * FROM pullwake_signal($1, $2, $3, $4)"
SEND = "SELECT * FROM pullwake_send($1, $2::jsonb, $3, $4, $5, $6, $7)"
SEND_BATCH = (
    "SELECT (step).* FROM pullwake_send_batch($1::text[], $2::jsonb[], $3::integer[], "
    "$4::text[], $5, $6, $7)"
)
WAKE_ENTITY = "SELECT * FROM pullwake_wake_entity($1, $2)"
EXPIRE = "SELECT * FROM pullwake_expire_leases($1, $2)"
CLAIM_VIEW = "SELECT * FROM pullwake_x_claim_view(NULL::pullwake_step, $1, $2, $3)"
CLAIM = "SELECT * FROM pullwake_claim($1, $2, NULL, NULL, $3, $4, 100, 262144, $5)"


class Mismatches:
    """Disagreements between SQL and model, collected over a loop of cases."""

    def __init__(self) -> None:
        self.items: list[str] = []
        self.cases = 0

    def expect(self, case: str, what: str, got: Any, want: Any) -> None:
        if got != want:
            self.items.append(f"[{case}] {what}: SQL gives {got!r}, model says {want!r}")

    def unchanged(self, case: str, before: dict[str, Any], after: dict[str, Any]) -> None:
        assert before, f"[{case}] no snapshot taken before the call"
        for key in before:
            if before[key] != after[key]:
                self.items.append(f"[{case}] {key} changed: {before[key]!r} -> {after[key]!r}")

    def assert_none(self) -> None:
        assert self.cases, "no case ran"
        shown = "\n".join(self.items[:60])
        more = f"\n... and {len(self.items) - 60} more" if len(self.items) > 60 else ""
        assert not self.items, (
            f"{len(self.items)} disagreement(s) in {self.cases} cases:\n{shown}{more}"
        )


# --- rows of one case ----------------------------------------------------------------------


@dataclass
class Case:
    """The rows one case set up."""

    url: str
    epoch: int
    wake_id: str | None = None
    claim_id: str | None = None
    token: str | None = None

    @property
    def wake_ids(self) -> set[str]:
        """The wakes set up (an outstanding one, the active claim's)."""
        return {w for w in (self.wake_id, self.claim_id) if w is not None}

    @property
    def token_hash(self) -> str:
        assert self.token is not None
        return hash_token(self.token)


async def add_entity(
    conn: asyncpg.Connection,
    *,
    status: EntityStatus | str = "idle",
    tail: int = 0,
    acked: int = 0,
    epoch: int = 3,
    failed_attempts: int = 0,
    parked: bool = False,
    sizes: list[int] | None = None,
) -> str:
    """An entity and its dispatch row (and inbox messages 1.. of ``sizes`` bytes)."""
    ident = uid("e")
    url = f"/difft/{ident}"
    await conn.execute(
        "INSERT INTO entities (url, type, id, status, dispatch_policy, target_runner_id, tags, "
        "created_by, created_at, updated_at) "
        "VALUES ($1, 'difft', $2, $3, $4::jsonb, $5, '{\"k\": \"v\"}', $6, $7, $7)",
        url,
        ident,
        str(status),
        POLICY,
        RUNNER,
        ALICE,
        PAST,
    )
    await conn.execute(
        "INSERT INTO dispatch_state (entity_url, tail_offset, acked_offset, epoch, "
        "failed_attempts, parked_reason, last_error, updated_at) "
        "VALUES ($1, $2, $3, $4, $5, $6, 'earlier error', $7)",
        url,
        tail,
        acked,
        epoch,
        failed_attempts,
        "parked by the test" if parked else None,
        PAST,
    )
    if sizes is not None:
        assert len(sizes) == tail
        await conn.executemany(
            'INSERT INTO inbox_messages (entity_url, "offset", payload, payload_bytes, sender, '
            "wake_status, created_at) VALUES ($1, $2, $3::jsonb, $4, $5, 'queued', $6)",
            [
                (url, n, json.dumps({"n": n}), size, f"user:s{n}", PAST)
                for n, size in enumerate(sizes, 1)
            ],
        )
    return url


async def add_wake(
    conn: asyncpg.Connection,
    url: str,
    epoch: int,
    *,
    claim_status: str = "unclaimed",
    delivery_status: str = "queued",
) -> str:
    wake_id = f"wk_diff{secrets.token_hex(8)}"
    await conn.execute(
        "INSERT INTO wakes (id, entity_url, epoch, target, runner_id, reason, delivery_status, "
        "claim_status, created_at) VALUES ($1, $2, $3, $4::jsonb, $5, 'message', $6, $7, $8)",
        wake_id,
        url,
        epoch,
        json.dumps(TARGET),
        RUNNER,
        delivery_status,
        claim_status,
        PAST,
    )
    return wake_id


async def make_outstanding(conn: asyncpg.Connection, url: str, epoch: int) -> str:
    """An outstanding (queued, unclaimed) wake at ``epoch``, the dispatch row pointing at it."""
    wake_id = await add_wake(conn, url, epoch)
    await conn.execute(
        "UPDATE dispatch_state SET outstanding_wake_id = $2, outstanding_wake_created_at = $3, "
        "last_wake_id = $2 WHERE entity_url = $1",
        url,
        wake_id,
        PAST,
    )
    return wake_id


async def add_claim(
    conn: asyncpg.Connection,
    url: str,
    epoch: int,
    *,
    status: str = "active",
    lease_s: int = 60,
    end_reason: str | None = None,
    acked_offset: int | None = None,
    next_wake: bool | None = None,
) -> tuple[str, str]:
    """A claim (and its wake) at ``epoch``; an active one is the dispatch row's active claim.
    Returns (claim id, token)."""
    wake_status = {"active": "claimed", "released": "completed"}.get(status, "expired")
    claim_id = await add_wake(
        conn, url, epoch, claim_status=wake_status, delivery_status="delivered"
    )
    token = new_claim_token()
    ended = status != "active"
    await conn.execute(
        "INSERT INTO claims (id, epoch, entity_url, runner_id, token_hash, status, claimed_at, "
        "lease_expires_at, start_acked_offset, released_at, acked_offset, end_reason, next_wake) "
        "SELECT $1, $2, $3, $4, $5, $6, $7::timestamptz, now() + $8 * interval '1 second', "
        "d.acked_offset, CASE WHEN $9 THEN $7::timestamptz END, $10, $11, $12 "
        "FROM dispatch_state d WHERE d.entity_url = $3",
        claim_id,
        epoch,
        url,
        RUNNER,
        hash_token(token),
        status,
        PAST,
        lease_s,
        ended,
        acked_offset,
        end_reason,
        next_wake,
    )
    if not ended:
        await conn.execute(
            "UPDATE dispatch_state SET active_claim_id = $2, active_epoch = $3, "
            "active_runner_id = $4, active_token_hash = $5, active_claimed_at = $6, "
            "active_lease_expires_at = now() + $7 * interval '1 second', last_claimed_at = $6, "
            "last_wake_id = $2 WHERE entity_url = $1",
            url,
            claim_id,
            epoch,
            RUNNER,
            hash_token(token),
            PAST,
            lease_s,
        )
    return claim_id, token


MAKE = """
WITH e AS (
    INSERT INTO entities (url, type, id, status, dispatch_policy, target_runner_id, tags,
                          created_by, created_at, updated_at)
    VALUES ($1, 'difft', $2, $3, $4::jsonb, $5::text, '{"k": "v"}', $6, $7::timestamptz,
            $7::timestamptz)
    RETURNING url
), d AS (
    INSERT INTO dispatch_state (entity_url, tail_offset, acked_offset, epoch, failed_attempts,
                                parked_reason, last_error, updated_at, outstanding_wake_id,
                                outstanding_wake_created_at, last_wake_id, active_claim_id,
                                active_epoch, active_runner_id, active_token_hash,
                                active_claimed_at, active_lease_expires_at, last_claimed_at)
    SELECT url, $8::bigint, $9::bigint, $10::bigint, $11::integer, $12::text, 'earlier error',
           $7::timestamptz, $13::text, CASE WHEN $13::text IS NOT NULL THEN $7::timestamptz END,
           coalesce($13::text, $14::text), $14::text,
           CASE WHEN $14::text IS NOT NULL THEN $10::bigint END,
           CASE WHEN $14::text IS NOT NULL THEN $5::text END, $15::text,
           CASE WHEN $14::text IS NOT NULL THEN $7::timestamptz END,
           CASE WHEN $14::text IS NOT NULL THEN now() + $16::integer * interval '1 second' END,
           CASE WHEN $14::text IS NOT NULL THEN $7::timestamptz END
      FROM e
), w AS (
    INSERT INTO wakes (id, entity_url, epoch, target, runner_id, reason, delivery_status,
                       claim_status, created_at)
    SELECT coalesce($13::text, $14::text), url, $10::bigint, $4::jsonb -> 'targets' -> 0,
           $5::text, 'message', CASE WHEN $14::text IS NULL THEN 'queued' ELSE 'delivered' END,
           CASE WHEN $14::text IS NULL THEN 'unclaimed' ELSE 'claimed' END, $7::timestamptz
      FROM e WHERE coalesce($13::text, $14::text) IS NOT NULL
)
INSERT INTO claims (id, epoch, entity_url, runner_id, token_hash, claimed_at, lease_expires_at,
                    start_acked_offset)
SELECT $14::text, $10::bigint, url, $5::text, $15::text, $7::timestamptz,
       now() + $16::integer * interval '1 second', $9::bigint
  FROM e WHERE $14::text IS NOT NULL
"""


async def make(
    conn: asyncpg.Connection,
    *,
    status: EntityStatus | str = "idle",
    tail: int = 0,
    acked: int = 0,
    hold: str = "none",
    parked: bool = False,
    failed_attempts: int = 0,
    lease_s: int = 60,
    epoch: int = 3,
) -> Case:
    """An entity with ``hold`` at ``epoch``: nothing, an outstanding wake or an active claim
    (lease ``lease_s`` from now), in one statement (the cases are many)."""
    assert hold in HOLDS, hold
    ident = uid("e")
    case = Case(f"/difft/{ident}", epoch)
    if hold == "wake":
        case.wake_id = f"wk_diff{secrets.token_hex(8)}"
    elif hold == "claim":
        case.claim_id, case.token = f"wk_diff{secrets.token_hex(8)}", new_claim_token()
    await conn.execute(
        MAKE,
        case.url,
        ident,
        str(status),
        POLICY,
        RUNNER,
        ALICE,
        PAST,
        tail,
        acked,
        epoch,
        failed_attempts,
        "parked by the test" if parked else None,
        case.wake_id,
        case.claim_id,
        case.token_hash if case.token else None,
        lease_s,
    )
    return case


SNAPSHOT = """
SELECT (SELECT e FROM entities e WHERE e.url = $1) AS entity,
       (SELECT d FROM dispatch_state d WHERE d.entity_url = $1) AS dispatch,
       ARRAY(SELECT w FROM wakes w WHERE w.entity_url = $1 ORDER BY w.epoch) AS wakes,
       ARRAY(SELECT c FROM claims c WHERE c.entity_url = $1 ORDER BY c.epoch) AS claims,
       ARRAY(SELECT v FROM entity_events v WHERE v.entity_url = $1 ORDER BY v."offset")
           AS events,
       ARRAY(SELECT m FROM inbox_messages m WHERE m.entity_url = $1 ORDER BY m."offset")
           AS inbox
"""


async def snapshot(conn: asyncpg.Connection, url: str) -> dict[str, Any]:
    """Every row of the entity (one round trip): to compare before and after a call."""
    row = await conn.fetchrow(SNAPSHOT, url)
    assert row is not None
    assert row["entity"] is not None, url
    assert row["dispatch"] is not None, url
    return {
        "entity": dict(row["entity"]),
        "dispatch": dict(row["dispatch"]),
        "wakes": {w["id"]: dict(w) for w in row["wakes"]},
        "claims": {c["id"]: dict(c) for c in row["claims"]},
        "events": [dict(e) for e in row["events"]],
        "inbox": [dict(m) for m in row["inbox"]],
    }


ACTIVE_COLUMNS = (
    "active_claim_id",
    "active_epoch",
    "active_runner_id",
    "active_token_hash",
    "active_claimed_at",
    "active_lease_expires_at",
)


def check_new_wake(
    bad: Mismatches,
    case: str,
    st: Step,
    c: Case,
    after: dict[str, Any],
    reason: str,
) -> None:
    """The wake a call created: epoch + 1, the dispatch row points at it, its audit row is
    queued and unclaimed, its publication columns describe it."""
    bad.expect(case, "pub_url", st.pub_url, c.url)
    bad.expect(case, "pub_epoch", st.pub_epoch, c.epoch + 1)
    bad.expect(case, "pub_reason", st.pub_reason, reason)
    bad.expect(case, "pub_runner_id", st.pub_runner_id, RUNNER)
    bad.expect(case, "pub_target_type", st.pub_target_type, "runner")
    d = after["dispatch"]
    bad.expect(case, "dispatch.epoch", d["epoch"], c.epoch + 1)
    bad.expect(case, "dispatch.outstanding_wake_id", d["outstanding_wake_id"], st.pub_id)
    bad.expect(case, "dispatch.last_wake_id", d["last_wake_id"], st.pub_id)
    bad.expect(
        case,
        "dispatch.outstanding_wake_created_at",
        d["outstanding_wake_created_at"],
        st.pub_created_at,
    )
    wake = after["wakes"].get(st.pub_id)
    if wake is None:
        bad.expect(case, "new wake row exists", False, True)
        return
    bad.expect(case, "wake.epoch", wake["epoch"], c.epoch + 1)
    bad.expect(case, "wake.delivery_status", wake["delivery_status"], "queued")
    bad.expect(case, "wake.claim_status", wake["claim_status"], "unclaimed")
    bad.expect(case, "wake.reason", wake["reason"], reason)
    bad.expect(case, "wake.runner_id", wake["runner_id"], RUNNER)
    bad.expect(case, "wake.target", json.loads(wake["target"]), TARGET)
    bad.expect(case, "wake.created_at", wake["created_at"], st.pub_created_at)


def check_no_new_wake(bad: Mismatches, case: str, st: Step, c: Case, after: dict[str, Any]) -> None:
    bad.expect(case, "pub_id (no wake expected)", st.pub_id, None)
    bad.expect(case, "wake ids", set(after["wakes"]), c.wake_ids)
    bad.expect(case, "dispatch.epoch", after["dispatch"]["epoch"], c.epoch)


def parks(failed_attempts: int, parked_before: bool) -> bool:
    """The poison-work rule next to next_failed_attempts: parked at max_attempts (a park
    reason, once set, stays until resume)."""
    return parked_before or failed_attempts >= MAX


# --- 1. wake_allowed -------------------------------------------------------------------------


async def test_wake_and_claim_at_once_is_refused(conn: asyncpg.Connection) -> None:
    async with rolled_back(conn):
        c = await make(conn, status="running", tail=1, hold="claim")
        with pytest.raises(asyncpg.CheckViolationError):
            await make_outstanding(conn, c.url, c.epoch + 1)


@pytest.mark.parametrize("status", STATUSES, ids=str)
async def test_wake_entity_follows_wake_allowed(
    conn: asyncpg.Connection, status: EntityStatus
) -> None:
    bad = Mismatches()
    for parked, hold, (tail, acked) in itertools.product((False, True), HOLDS, OFFSETS):
        case = f"wake_entity status={status} parked={parked} hold={hold} tail={tail} acked={acked}"
        want = wake_allowed(
            status,
            tail_offset=tail,
            acked_offset=acked,
            outstanding_wake=hold == "wake",
            active_claim=hold == "claim",
            parked=parked,
        )
        async with rolled_back(conn):
            c = await make(conn, status=status, tail=tail, acked=acked, hold=hold, parked=parked)
            before = await snapshot(conn, c.url)
            st = await step(conn, WAKE_ENTITY, c.url, "runner_online")
            after = await snapshot(conn, c.url)
        bad.cases += 1
        bad.expect(case, "code", st.code, None)
        bad.expect(case, "wake created", st.pub_id is not None, want)
        if want and st.pub_id is not None:
            check_new_wake(bad, case, st, c, after, "runner_online")
            bad.expect(case, "entity", after["entity"], before["entity"])
            bad.expect(case, "claims", after["claims"], before["claims"])
            untouched = {
                k: v
                for k, v in after["dispatch"].items()
                if k
                not in (
                    "epoch",
                    "outstanding_wake_id",
                    "outstanding_wake_created_at",
                    "last_wake_id",
                    "updated_at",
                )
            }
            bad.expect(
                case,
                "other dispatch columns",
                untouched,
                {k: before["dispatch"][k] for k in untouched},
            )
        elif not want:
            bad.unchanged(case, before, after)
    bad.assert_none()


@pytest.mark.parametrize("status", STATUSES, ids=str)
async def test_send_wakes_coalesces_or_holds_as_wake_allowed(
    conn: asyncpg.Connection, status: EntityStatus
) -> None:
    """pullwake_send (and pullwake_send_batch, which calls it) decides the wake with the same
    rule, after the append (so there is always pending work) and after expiring a passed
    lease (hold "stale-claim": its attempt counted, its status settled as at a claim's end)."""
    bad = Mismatches()
    holds = (*HOLDS, "stale-claim")
    combos = itertools.product(("send", "batch"), (False, True), holds, OFFSETS, (0, MAX - 1))
    for via, parked, hold, (tail, acked), fails in combos:
        # the attempt counter only moves when a stale claim is expired; the batch is the
        # same function per item, so a share of the cases is enough for it
        if (fails and hold != "stale-claim") or (via == "batch" and (fails or parked)):
            continue
        case = (
            f"{via} status={status} parked={parked} hold={hold} tail={tail} acked={acked} "
            f"failed_attempts={fails}"
        )
        stale = hold == "stale-claim"
        status_now, fails_now, parked_now = status, fails, parked
        if stale:
            status_now = status_after_claim_end(status)
            fails_now = next_failed_attempts(fails, progressed=False, pending_after=tail > acked)
            parked_now = parks(fails_now, parked)
        terminal = status in (EntityStatus.STOPPED, EntityStatus.KILLED)
        want = not terminal and wake_allowed(
            status_now,
            tail_offset=tail + 1,
            acked_offset=acked,
            outstanding_wake=hold == "wake",
            active_claim=hold == "claim",
            parked=parked_now,
        )
        async with rolled_back(conn):
            c = await make(
                conn,
                status=status,
                tail=tail,
                acked=acked,
                hold="claim" if stale else hold,
                parked=parked,
                failed_attempts=fails,
                lease_s=-1 if stale else 60,
            )
            before = await snapshot(conn, c.url) if terminal else {}
            payload, size = '{"hello": 1}', 12
            if via == "send":
                st = await step(conn, SEND, c.url, payload, size, None, ALICE, True, MAX)
            else:
                rows = await conn.fetch(
                    SEND_BATCH, [c.url], [payload], [size], [None], ALICE, True, MAX
                )
                st = Step(*rows[0])
            after = await snapshot(conn, c.url)
        bad.cases += 1
        if terminal:
            bad.expect(case, "code", st.code, "ENTITY_NOT_RUNNABLE")
            bad.unchanged(case, before, after)
            continue
        bad.expect(case, "code", st.code, None)
        bad.expect(case, "msg_offset", st.msg_offset, tail + 1)
        bad.expect(case, "wake created", st.pub_id is not None, want)
        d = after["dispatch"]
        bad.expect(case, "tail_offset", d["tail_offset"], tail + 1)
        bad.expect(case, "entity.status", after["entity"]["status"], status_now)
        bad.expect(case, "failed_attempts", d["failed_attempts"], fails_now)
        bad.expect(case, "parked", d["parked_reason"] is not None, parked_now)
        if want:
            want_ref = (st.pub_id, "queued", None)
        elif hold == "claim":
            want_ref = (c.claim_id, "coalesced", "active-claim")
        elif hold == "wake":
            want_ref = (c.wake_id, "coalesced", "outstanding-wake")
        else:
            want_ref = (None, "held", "parked" if parked_now else str(status_now))
        bad.expect(case, "(wake_id, wake_status, wake_reason)", st_ref(st), want_ref)
        message = after["inbox"][-1] if after["inbox"] else {}
        bad.expect(
            case,
            "inbox row (offset, wake_id, wake_status)",
            (message.get("offset"), message.get("wake_id"), message.get("wake_status")),
            (tail + 1, want_ref[0], want_ref[1]),
        )
        if stale:
            claim = after["claims"][c.claim_id]
            bad.expect(case, "stale claim status", claim["status"], "expired")
            bad.expect(case, "dispatch.active_claim_id", d["active_claim_id"], None)
        if want and st.pub_id is not None:
            check_new_wake(bad, case, st, c, after, "message")
        elif not want:
            check_no_new_wake(bad, case, st, c, after)
    bad.assert_none()


def st_ref(st: Step) -> tuple[str | None, str | None, str | None]:
    return st.wake_id, st.wake_status, st.wake_reason


# --- 2. signal_outcome -----------------------------------------------------------------------

SIGNAL_OFFSETS = [(0, 0), (2, 0), (2, 1), (2, 2)]


@pytest.mark.parametrize("signal", list(Signal), ids=str)
@pytest.mark.parametrize("status", STATUSES, ids=str)
async def test_signal_follows_signal_outcome(
    conn: asyncpg.Connection, status: EntityStatus, signal: Signal
) -> None:
    bad = Mismatches()
    combos = itertools.product(HOLDS, (False, True), SIGNAL_OFFSETS, (0, MAX - 1))
    for hold, parked, (tail, acked), fails in combos:
        if fails and signal in (Signal.PAUSE, Signal.STOP):
            continue  # only kill (an ended claim counts) and resume (resets) touch the counter
        case = (
            f"signal {signal} status={status} hold={hold} parked={parked} tail={tail} "
            f"acked={acked} failed_attempts={fails}"
        )
        active, outstanding = hold == "claim", hold == "wake"
        try:
            outcome = signal_outcome(status, signal, active_claim=active)
        except EntityNotRunnable:
            outcome = None
        async with rolled_back(conn):
            c = await make(
                conn,
                status=status,
                tail=tail,
                acked=acked,
                hold=hold,
                parked=parked,
                failed_attempts=fails,
            )
            before = await snapshot(conn, c.url) if outcome is None else {}
            # the creator and the operator (NULL principal) are both allowed
            principal = ALICE if fails else None
            st = await step(conn, SIGNAL, c.url, principal, str(signal), MAX)
            after = await snapshot(conn, c.url)
        bad.cases += 1
        if outcome is None:
            bad.expect(case, "code", st.code, "ENTITY_NOT_RUNNABLE")
            bad.unchanged(case, before, after)
            continue
        bad.expect(case, "code", st.code, None)
        bad.expect(case, "entity.status", after["entity"]["status"], outcome.status)
        d = after["dispatch"]
        superseded = outstanding and outcome.supersede_outstanding
        fenced = active and outcome.fence_claim
        if outstanding:
            old = after["wakes"][c.wake_id]
            bad.expect(
                case,
                "outstanding wake (delivery_status, claim_status)",
                (old["delivery_status"], old["claim_status"]),
                ("superseded", "expired") if superseded else ("queued", "unclaimed"),
            )
            if superseded:
                bad.expect(
                    case, "superseded wake last_error", old["last_error"], f"entity {signal}"
                )
        if active:
            claim = after["claims"][c.claim_id]
            bad.expect(
                case,
                "claim (status, end_reason)",
                (claim["status"], claim["end_reason"]),
                ("failed", "signal:kill") if fenced else ("active", None),
            )
            bad.expect(
                case,
                "dispatch.active_claim_id",
                d["active_claim_id"],
                None if fenced else c.claim_id,
            )
            if not fenced:
                bad.expect(
                    case,
                    "active lease (as set up)",
                    d["active_lease_expires_at"],
                    after["claims"][c.claim_id]["lease_expires_at"],
                )
        if outcome.clear_park:
            want_fails = 0
        elif fenced:
            want_fails = next_failed_attempts(fails, progressed=False, pending_after=tail > acked)
        else:
            want_fails = fails
        want_parked = not outcome.clear_park and (parks(want_fails, parked) if fenced else parked)
        bad.expect(case, "failed_attempts", d["failed_attempts"], want_fails)
        bad.expect(case, "parked", d["parked_reason"] is not None, want_parked)
        bad.expect(case, "acked_offset", d["acked_offset"], acked)
        want = wake_allowed(
            outcome.status,
            tail_offset=tail,
            acked_offset=acked,
            outstanding_wake=outstanding and not superseded,
            active_claim=active and not fenced,
            parked=want_parked,
        )
        bad.expect(case, "wake created", st.pub_id is not None, want)
        if want and st.pub_id is not None:
            check_new_wake(bad, case, st, c, after, str(signal))
        elif not want:
            check_no_new_wake(bad, case, st, c, after)
            bad.expect(
                case,
                "dispatch.outstanding_wake_id",
                d["outstanding_wake_id"],
                c.wake_id if outstanding and not superseded else None,
            )
    bad.assert_none()


async def test_signal_by_another_principal_changes_nothing(conn: asyncpg.Connection) -> None:
    async with rolled_back(conn):
        c = await make(conn, status="running", tail=2, hold="claim")
        before = await snapshot(conn, c.url)
        st = await step(conn, SIGNAL, c.url, BOB, "kill", MAX)
        assert st.code == "FORBIDDEN", st
        assert await snapshot(conn, c.url) == before
        st = await step(conn, SIGNAL, "/difft/nobody", None, "kill", MAX)
        assert st.code == "NOT_FOUND", st


# --- 3. decide_done, next_failed_attempts, status_after_claim_end ---------------------------

DONE_OFFSETS = [(acked, tail) for acked in range(3) for tail in range(acked, 4)]
FAILS = (0, MAX - 1, MAX)


@pytest.mark.parametrize("status", STATUSES, ids=str)
async def test_done_follows_decide_done(conn: asyncpg.Connection, status: EntityStatus) -> None:
    bad = Mismatches()
    for (acked, tail), fails, parked in itertools.product(DONE_OFFSETS, FAILS, (False, True)):
        for requested in range(acked - 1, tail + 2):
            case = (
                f"done status={status} acked={acked} tail={tail} requested={requested} "
                f"failed_attempts={fails} parked={parked}"
            )
            try:
                decision = decide_done(
                    current_acked=acked,
                    tail_offset=tail,
                    requested_acked=requested,
                    failed_attempts=fails,
                )
            except InvalidOffset:
                decision = None
            if decision is None and (fails, parked) != (0, False):
                continue  # a refused done reads neither
            async with rolled_back(conn):
                c = await make(
                    conn,
                    status=status,
                    tail=tail,
                    acked=acked,
                    hold="claim",
                    parked=parked,
                    failed_attempts=fails,
                )
                before = await snapshot(conn, c.url) if decision is None else {}
                st = await step(
                    conn, DONE, c.claim_id, c.token_hash, c.epoch, requested, LEASE_MS, MAX
                )
                after = await snapshot(conn, c.url)
            bad.cases += 1
            if decision is None:
                bad.expect(case, "code", st.code, "INVALID_OFFSET")
                bad.expect(
                    case,
                    "(acked_offset, tail_offset)",
                    (st.acked_offset, st.tail_offset),
                    (acked, tail),
                )
                bad.unchanged(case, before, after)
                continue
            bad.expect(case, "code", st.code, None)
            d = after["dispatch"]
            want_status = status_after_claim_end(status)
            want_parked = parks(decision.failed_attempts, parked)
            bad.expect(case, "acked_offset", d["acked_offset"], decision.acked_offset)
            bad.expect(case, "failed_attempts", d["failed_attempts"], decision.failed_attempts)
            bad.expect(case, "parked", d["parked_reason"] is not None, want_parked)
            if parked:
                bad.expect(case, "parked_reason kept", d["parked_reason"], "parked by the test")
            bad.expect(case, "entity.status", after["entity"]["status"], want_status)
            check_claim_ended(bad, case, c, after, "released", "done", requested, "completed")
            want = wake_allowed(
                want_status,
                tail_offset=tail,
                acked_offset=decision.acked_offset,
                outstanding_wake=False,
                active_claim=False,
                parked=want_parked,
            )
            bad.expect(case, "next_wake", st.next_wake, want)
            bad.expect(case, "claim.next_wake", after["claims"][c.claim_id]["next_wake"], want)
            bad.expect(case, "wake created", st.pub_id is not None, want)
            if want and st.pub_id is not None:
                check_new_wake(bad, case, st, c, after, "follow_up")
            elif not want:
                check_no_new_wake(bad, case, st, c, after)
    bad.assert_none()


def check_claim_ended(
    bad: Mismatches,
    case: str,
    c: Case,
    after: dict[str, Any],
    claim_status: str,
    end_reason: str,
    acked_offset: int | None,
    wake_claim_status: str,
) -> None:
    claim = after["claims"][c.claim_id]
    bad.expect(
        case,
        "claim (status, end_reason, acked_offset)",
        (claim["status"], claim["end_reason"], claim["acked_offset"]),
        (claim_status, end_reason, acked_offset),
    )
    bad.expect(
        case,
        "claim wake claim_status",
        after["wakes"][c.claim_id]["claim_status"],
        wake_claim_status,
    )
    d = after["dispatch"]
    bad.expect(
        case, "active_* columns", [d[k] for k in ACTIVE_COLUMNS], [None] * len(ACTIVE_COLUMNS)
    )


@pytest.mark.parametrize("how", ["release", "sweep"])
@pytest.mark.parametrize("status", STATUSES, ids=str)
async def test_release_and_expiry_count_attempts(
    conn: asyncpg.Connection, status: EntityStatus, how: str
) -> None:
    """Release and lease expiry never progress: next_failed_attempts(progressed=False), parked
    at max_attempts, the status settled by status_after_claim_end, a new wake when allowed."""
    bad = Mismatches()
    reason = {"release": "released", "sweep": "lease_expired"}[how]
    for (tail, acked), fails, parked in itertools.product(OFFSETS, FAILS, (False, True)):
        case = (
            f"{how} status={status} tail={tail} acked={acked} failed_attempts={fails} "
            f"parked={parked}"
        )
        async with rolled_back(conn):
            c = await make(
                conn,
                status=status,
                tail=tail,
                acked=acked,
                hold="claim",
                parked=parked,
                failed_attempts=fails,
            )
            if how == "release":
                st = await step(conn, RELEASE, c.claim_id, c.token_hash, c.epoch, "boom", MAX)
            else:
                # the lease moves into the past (far: the sweep takes the oldest first)
                await conn.execute(
                    "UPDATE dispatch_state SET active_lease_expires_at = now() - interval "
                    "'100 years' WHERE entity_url = $1",
                    c.url,
                )
                rows = [Step(*r) for r in await conn.fetch(EXPIRE, 10_000, MAX)]
                mine = [r for r in rows if r.url == c.url]
                bad.expect(case, "sweep rows for the entity", len(mine), 1)
                st = mine[0] if mine else Step(*([None] * len(fields(Step))))
            after = await snapshot(conn, c.url)
        bad.cases += 1
        bad.expect(case, "code", st.code, None)
        want_fails = next_failed_attempts(fails, progressed=False, pending_after=tail > acked)
        want_parked = parks(want_fails, parked)
        want_status = status_after_claim_end(status)
        d = after["dispatch"]
        bad.expect(case, "failed_attempts", d["failed_attempts"], want_fails)
        bad.expect(case, "parked", d["parked_reason"] is not None, want_parked)
        bad.expect(case, "acked_offset", d["acked_offset"], acked)
        bad.expect(case, "entity.status", after["entity"]["status"], want_status)
        bad.expect(
            case,
            "(ended_claim_id, ended_reason)",
            (st.ended_claim_id, st.ended_reason),
            (c.claim_id, "release" if how == "release" else "lease_expired"),
        )
        if how == "release":
            check_claim_ended(bad, case, c, after, "released", "release", None, "expired")
            bad.expect(case, "claim.last_error", after["claims"][c.claim_id]["last_error"], "boom")
            bad.expect(case, "dispatch.last_error", d["last_error"], "boom")
        else:
            check_claim_ended(bad, case, c, after, "expired", "lease_expired", None, "expired")
            bad.expect(case, "dispatch.last_error", d["last_error"], "earlier error")
        want = wake_allowed(
            want_status,
            tail_offset=tail,
            acked_offset=acked,
            outstanding_wake=False,
            active_claim=False,
            parked=want_parked,
        )
        bad.expect(case, "claim.next_wake", after["claims"][c.claim_id]["next_wake"], want)
        if how == "release":
            bad.expect(case, "next_wake", st.next_wake, want)
        bad.expect(case, "wake created", st.pub_id is not None, want)
        if want and st.pub_id is not None:
            check_new_wake(bad, case, st, c, after, reason)
        elif not want:
            check_no_new_wake(bad, case, st, c, after)
    bad.assert_none()


async def test_sweep_leaves_live_leases_alone(conn: asyncpg.Connection) -> None:
    async with rolled_back(conn):
        c = await make(conn, status="running", tail=2, hold="claim")
        before = await snapshot(conn, c.url)
        rows = [Step(*r) for r in await conn.fetch(EXPIRE, 10_000, MAX)]
        assert [r for r in rows if r.url == c.url] == []
        assert await snapshot(conn, c.url) == before


@pytest.mark.parametrize("end", ["release", "expiry", "done-without-progress"])
async def test_attempts_park_after_max_attempts_claims(conn: asyncpg.Connection, end: str) -> None:
    """Real cycles (wake, claim, end without progress) fold next_failed_attempts: the entity
    parks after exactly MAX of them, takes no wake while parked, and resume unparks it."""
    async with rolled_back(conn):
        url = await add_entity(conn, tail=2)
        fails = 0
        parked = False
        for n in range(1, MAX + 2):
            where = f"{end} cycle {n}"
            woke = await step(conn, WAKE_ENTITY, url, "test")
            assert (woke.pub_id is not None) is not parked, (where, woke)
            if parked:
                break
            token = new_claim_token()
            claimed = await step(conn, CLAIM, RUNNER, woke.pub_id, hash_token(token), LEASE_MS, MAX)
            assert claimed.code is None, (where, claimed)
            assert claimed.claim_id == woke.pub_id, (where, claimed)
            assert claimed.epoch == woke.pub_epoch, (where, claimed)
            if end == "release":
                ended = await step(
                    conn, RELEASE, claimed.claim_id, hash_token(token), claimed.epoch, None, MAX
                )
                assert ended.code is None, (where, ended)
            elif end == "expiry":
                await conn.execute(
                    "UPDATE dispatch_state SET active_lease_expires_at = now() - interval "
                    "'100 years' WHERE entity_url = $1",
                    url,
                )
                swept = [Step(*r) for r in await conn.fetch(EXPIRE, 10_000, MAX)]
                assert [s.ended_claim_id for s in swept if s.url == url] == [claimed.claim_id], (
                    where
                )
            else:
                ended = await step(
                    conn, DONE, claimed.claim_id, hash_token(token), claimed.epoch, 0, 1, MAX
                )
                assert ended.code is None, (where, ended)
            fails = next_failed_attempts(fails, progressed=False, pending_after=True)
            parked = parks(fails, False)
            d = await conn.fetchrow("SELECT * FROM dispatch_state WHERE entity_url = $1", url)
            assert d is not None
            assert d["failed_attempts"] == fails, (where, dict(d))
            assert (d["parked_reason"] is not None) is parked, (where, dict(d))
            # the handed-on / follow-up wake (if the rules allow one) is retired for the next
            # cycle's wake_entity to decide afresh
            await conn.execute("SELECT pullwake_x_supersede($1, 'test')", url)
        assert parked, f"{end}: not parked after {MAX} cycles"
        resumed = await step(conn, SIGNAL, url, None, "resume", MAX)
        assert resumed.code is None, resumed
        assert resumed.pub_id is not None, "resume of a parked entity with pending work wakes it"
        d = await conn.fetchrow("SELECT * FROM dispatch_state WHERE entity_url = $1", url)
        assert d is not None
        assert (d["failed_attempts"], d["parked_reason"]) == (0, None), dict(d)


# --- 4. fencing ------------------------------------------------------------------------------

OPS = ("heartbeat", "done", "release", "event")


async def call_op(
    conn: asyncpg.Connection,
    op: str,
    claim_id: str,
    token_hash: str,
    epoch: int,
    url: str,
) -> Step:
    if op == "heartbeat":
        return await step(conn, HEARTBEAT, claim_id, token_hash, epoch, LEASE_MS, MAX)
    if op == "done":
        return await step(conn, DONE, claim_id, token_hash, epoch, 1, LEASE_MS, MAX)
    if op == "release":
        return await step(conn, RELEASE, claim_id, token_hash, epoch, "err", MAX)
    assert op == "event"
    return await step(conn, EVENT, token_hash, url, '{"e": 1}', epoch, MAX)


REFUSALS = [
    # (kind, lease passed, expected code per op (event differs: it finds its claim by token))
    ("wrong-token", False, {"event": "FENCED"}, "FORBIDDEN"),
    ("wrong-token", True, {"event": "FENCED"}, "FORBIDDEN"),
    ("other-entity-token", False, {}, "FORBIDDEN"),
    ("wrong-epoch", False, {}, "FENCED"),
    ("wrong-epoch", True, {}, "FENCED"),
    ("older-epoch", False, {}, "FENCED"),
    ("unknown-claim", False, {"event": None}, "NOT_FOUND"),
    ("released", False, {}, "FENCED"),
    ("released-by-done-other-ack", False, {}, "FENCED"),
    ("failed", False, {}, "FENCED"),
    ("expired", False, {}, "LEASE_EXPIRED"),
]


@pytest.mark.parametrize("op", OPS)
async def test_refused_holder_calls_change_nothing(conn: asyncpg.Connection, op: str) -> None:
    bad = Mismatches()
    for kind, lease_passed, special, default in REFUSALS:
        want = special.get(op, default)
        if want is None:
            continue
        case = f"{op} {kind} lease_passed={lease_passed}"
        async with rolled_back(conn):
            url = await add_entity(conn, status="running", tail=2, acked=0, epoch=5)
            epoch = 5
            if kind in ("released", "released-by-done-other-ack", "failed", "expired"):
                # an ended claim at epoch 5; the entity was handed on (outstanding wake at 6)
                end_reason = {
                    "released": "release",
                    "released-by-done-other-ack": "done",
                    "failed": "signal:kill",
                    "expired": "lease_expired",
                }[kind]
                status = kind.split("-")[0]
                await conn.execute("UPDATE entities SET status = 'idle' WHERE url = $1", url)
                claim_id, token = await add_claim(
                    conn,
                    url,
                    epoch,
                    status=status,
                    end_reason=end_reason,
                    acked_offset=0 if end_reason == "done" else None,
                    next_wake=True,
                )
                await conn.execute("UPDATE dispatch_state SET epoch = 6 WHERE entity_url = $1", url)
                await make_outstanding(conn, url, 6)
            else:
                claim_id, token = await add_claim(
                    conn, url, epoch, lease_s=-1 if lease_passed else 60
                )
            token_hash = hash_token(token)
            other_url = await add_entity(conn, status="running", tail=1, epoch=1)
            _, other_token = await add_claim(conn, other_url, 1)
            if kind == "wrong-token":
                token_hash = hash_token(new_claim_token())
            elif kind == "other-entity-token":
                token_hash = hash_token(other_token)
            elif kind == "wrong-epoch":
                epoch += 1
            elif kind == "older-epoch":
                epoch -= 1
            elif kind == "unknown-claim":
                claim_id = "wk_nosuchclaim"
            before = await snapshot(conn, url)
            other_before = await snapshot(conn, other_url)
            st = await call_op(conn, op, claim_id, token_hash, epoch, url)
            after = await snapshot(conn, url)
            other_after = await snapshot(conn, other_url)
        bad.cases += 1
        bad.expect(case, "code", st.code, want)
        bad.expect(case, "pub_id", st.pub_id, None)
        bad.unchanged(case, before, after)
        bad.unchanged(f"{case} (other entity)", other_before, other_after)
    bad.assert_none()


@pytest.mark.parametrize("op", OPS)
async def test_passed_lease_expires_now_and_hands_on(conn: asyncpg.Connection, op: str) -> None:
    """The live holder's call after its lease passed: EXPIRED_NOW, the claim expired (an
    attempt counted), a new wake (epoch + 1, reason lease_expired) and nothing else done."""
    bad = Mismatches()
    for status, fails in itertools.product(("running", "paused", "stopping"), (0, MAX - 1)):
        case = f"{op} lease passed status={status} failed_attempts={fails}"
        async with rolled_back(conn):
            c = await make(
                conn,
                status=status,
                tail=2,
                hold="claim",
                failed_attempts=fails,
                epoch=5,
                lease_s=-1,
            )
            before = await snapshot(conn, c.url)
            st = await call_op(conn, op, c.claim_id or "", c.token_hash, c.epoch, c.url)
            after = await snapshot(conn, c.url)
        bad.cases += 1
        bad.expect(case, "code", st.code, "EXPIRED_NOW")
        want_status = status_after_claim_end(EntityStatus(status))
        want_fails = next_failed_attempts(fails, progressed=False, pending_after=True)
        want_parked = parks(want_fails, False)
        d = after["dispatch"]
        check_claim_ended(bad, case, c, after, "expired", "lease_expired", None, "expired")
        bad.expect(case, "entity.status", after["entity"]["status"], want_status)
        bad.expect(case, "failed_attempts", d["failed_attempts"], want_fails)
        bad.expect(case, "parked", d["parked_reason"] is not None, want_parked)
        bad.expect(case, "acked_offset", d["acked_offset"], 0)
        bad.expect(case, "events", after["events"], before["events"])
        bad.expect(
            case,
            "claim lease",
            after["claims"][c.claim_id]["lease_expires_at"],
            before["claims"][c.claim_id]["lease_expires_at"],
        )
        want = wake_allowed(
            want_status,
            tail_offset=2,
            acked_offset=0,
            outstanding_wake=False,
            active_claim=False,
            parked=want_parked,
        )
        bad.expect(case, "wake created", st.pub_id is not None, want)
        if want and st.pub_id is not None:
            check_new_wake(bad, case, st, c, after, "lease_expired")
        elif not want:
            check_no_new_wake(bad, case, st, c, after)
    bad.assert_none()


async def test_live_holder_calls_succeed(conn: asyncpg.Connection) -> None:
    """The control for the refusals: the same calls with the right token, epoch and a live
    lease do their work."""
    for op in OPS:
        async with rolled_back(conn):
            c = await make(conn, status="running", tail=2, hold="claim", epoch=5)
            assert c.claim_id is not None
            before = await snapshot(conn, c.url)
            st = await call_op(conn, op, c.claim_id, c.token_hash, c.epoch, c.url)
            after = await snapshot(conn, c.url)
            assert st.code is None, (op, st)
            if op == "heartbeat":
                assert after["dispatch"]["active_lease_expires_at"] == st.lease_expires_at
                assert st.status == "running"
            elif op == "event":
                assert st.msg_offset == 1, st
                assert [e["claim_id"] for e in after["events"]] == [c.claim_id]
            else:
                assert after["claims"][c.claim_id]["status"] == "released", (op, after)
            assert before != after, op


async def test_retried_done_answers_again_and_changes_nothing(conn: asyncpg.Connection) -> None:
    async with rolled_back(conn):
        c = await make(conn, status="running", tail=2, hold="claim", epoch=5)
        first = await step(conn, DONE, c.claim_id, c.token_hash, c.epoch, 1, LEASE_MS, MAX)
        assert first.code is None, first
        assert first.next_wake is True, first
        before = await snapshot(conn, c.url)
        again = await step(conn, DONE, c.claim_id, c.token_hash, c.epoch, 1, LEASE_MS, MAX)
        assert (again.code, again.next_wake, again.pub_id) == (None, True, None), again
        assert await snapshot(conn, c.url) == before
        other = await step(conn, DONE, c.claim_id, c.token_hash, c.epoch, 2, LEASE_MS, MAX)
        assert other.code == "FENCED", other
        assert await snapshot(conn, c.url) == before


# --- 5. the claim view's message budget ------------------------------------------------------


def budget(sizes: list[int], acked: int, max_msgs: int, max_bytes: int) -> list[int]:
    """The offsets a claim carries: the first pending message always, then the next ones only
    while the running byte total fits max_bytes; at most max_msgs."""
    taken: list[int] = []
    used = 0
    for offset, size in enumerate(sizes, 1):
        if offset <= acked or len(taken) == max_msgs:
            continue
        if taken and used + size > max_bytes:
            break
        used += size
        taken.append(offset)
    return taken


def view_cases() -> list[tuple[list[int], int, int, int]]:
    rng = random.Random(7)
    fixed = [
        [],
        [10],
        [10, 10, 10],
        [100, 1, 1],
        [1, 100, 1],
        [5, 5, 5, 5, 5],
        [0, 0, 0],
        [30, 0, 0, 1],
    ]
    sizes_list = fixed + [[rng.randint(0, 40) for _ in range(rng.randint(1, 7))] for _ in range(8)]
    cases = []
    for sizes in sizes_list:
        for acked in sorted({0, min(1, len(sizes)), len(sizes)}):
            for max_msgs, max_bytes in itertools.product((1, 2, 3, 100), (0, 5, 10, 15, 30, 10**6)):
                cases.append((sizes, acked, max_msgs, max_bytes))
    return cases


async def test_claim_view_message_budget(conn: asyncpg.Connection) -> None:
    bad = Mismatches()
    async with rolled_back(conn):
        # the rows of each size list, set up once: the view only reads
        urls: dict[tuple[tuple[int, ...], int], str] = {}
        for sizes, acked, _, _ in view_cases():
            key = (tuple(sizes), acked)
            if key not in urls:
                urls[key] = await add_entity(
                    conn, status="running", tail=len(sizes), acked=acked, sizes=sizes
                )
                await add_claim(conn, urls[key], 3)
        for sizes, acked, max_msgs, max_bytes in view_cases():
            case = f"sizes={sizes} acked={acked} max_msgs={max_msgs} max_bytes={max_bytes}"
            url = urls[(tuple(sizes), acked)]
            st = await step(conn, CLAIM_VIEW, url, max_msgs, max_bytes)
            bad.cases += 1
            want = budget(sizes, acked, max_msgs, max_bytes)
            bad.expect(case, "msg_offsets", st.msg_offsets, want)
            bad.expect(
                case,
                "msg_payloads",
                [json.loads(p) for p in st.msg_payloads or []],
                [{"n": n} for n in want],
            )
            bad.expect(case, "msg_senders", st.msg_senders, [f"user:s{n}" for n in want])
            bad.expect(case, "msg_created_at", st.msg_created_at, [PAST] * len(want))
            last = want[-1] if want else acked
            bad.expect(case, "more_messages", st.more_messages, last < len(sizes))
            bad.expect(
                case,
                "(acked_offset, tail_offset)",
                (st.acked_offset, st.tail_offset),
                (acked, len(sizes)),
            )
            bad.expect(
                case,
                "(url, type, status, created_by)",
                (st.url, st.type, st.status, st.created_by),
                (url, "difft", "running", ALICE),
            )
            bad.expect(
                case,
                "tags",
                json.loads(st.tags) if isinstance(st.tags, str) else st.tags,
                {"k": "v"},
            )
            bad.expect(case, "epoch", st.epoch, 3)
            bad.expect(case, "claim_id set", st.claim_id is not None, True)
    bad.assert_none()


def test_budget_reference_examples() -> None:
    """The reference itself, on hand-checked examples."""
    assert budget([100, 1, 1], 0, 10, 5) == [1]
    assert budget([1, 2, 3], 0, 10, 3) == [1, 2]
    assert budget([1, 2, 3], 0, 2, 10**6) == [1, 2]
    assert budget([1, 2, 3], 1, 10, 5) == [2, 3]
    assert budget([1, 2, 3], 3, 10, 5) == []
    assert budget([5, 0, 0], 0, 10, 5) == [1, 2, 3]
    assert budget([10, 9, 1], 0, 10, 10) == [1]


# --- 7. pullwake_send_many: the same as one pullwake_send after another ------------------------

SEND_MANY = (
    "SELECT item, (step).* FROM pullwake_send_many($1::text[], $2::jsonb[], $3::integer[], "
    "$4::text[], $5::text[], $6::boolean[], $7)"
)
_MANY_SETUPS = [
    dict(),
    dict(hold="wake", tail=1),
    dict(hold="claim", tail=2, acked=1),
    dict(hold="claim", tail=1, lease_s=-1),  # a passed lease, expired by the first send
    dict(hold="claim", tail=1, lease_s=-1, failed_attempts=MAX - 1),  # ... and parked by it
    dict(status="stopping", hold="claim", tail=1, lease_s=-1),  # stopped by the first send
    dict(status="paused"),
    dict(status="killed"),
    dict(parked=True, tail=1),
]


def _normal(value: Any, ids: dict[str, str]) -> Any:
    """Rows of two runs made comparable: generated ids numbered by first appearance, times
    dropped (each run is its own transaction)."""
    if isinstance(value, dict):
        return {_normal(k, ids): _normal(v, ids) for k, v in value.items() if not _is_time(k, v)}
    if isinstance(value, list | tuple):
        return [_normal(v, ids) for v in value]
    if isinstance(value, str) and value.startswith("wk_") and "diff" not in value:
        return ids.setdefault(value, f"<new wake {len(ids)}>")
    return value


def _is_time(key: str, value: Any) -> bool:
    return isinstance(value, datetime) or key.endswith("_at") or key in ("waited_s",)


async def _world(conn: asyncpg.Connection, rng: random.Random) -> list[str]:
    urls = []
    for setup in rng.sample(_MANY_SETUPS, k=rng.randint(1, 4)):
        c = await make(conn, **setup)  # type: ignore[arg-type]
        members = rng.choice([[], [BOB], ["*"]])
        await conn.execute("UPDATE entities SET members = $2 WHERE url = $1", c.url, members)
        urls.append(c.url)
    return urls


def _items(rng: random.Random, urls: list[str]) -> list[tuple[str, str, str | None, str, bool]]:
    keys = [None, None, None, "k1", "k2"]
    return [
        (
            rng.choice([*urls, "/difft/missing"] if rng.random() < 0.1 else urls),
            json.dumps({"v": rng.randint(0, 2)}),
            rng.choice(keys),
            rng.choice([ALICE, ALICE, BOB, "user:carol@example.com"]),
            rng.random() < 0.8,
        )
        for _ in range(rng.randint(1, 12))
    ]


async def _run_items(
    conn: asyncpg.Connection, urls: list[str], items: list[Any], many: bool
) -> tuple[list[Any], list[Any]]:
    if many:
        rows = await conn.fetch(
            SEND_MANY,
            [i[0] for i in items],
            [i[1] for i in items],
            [len(i[1]) for i in items],
            [i[2] for i in items],
            [i[3] for i in items],
            [i[4] for i in items],
            MAX,
        )
        assert [r[0] for r in sorted(rows, key=lambda r: r[0])] == list(range(len(items)))
        steps = [Step(*tuple(r)[1:]) for r in sorted(rows, key=lambda r: r[0])]
    else:
        steps = [
            await step(conn, SEND, url, payload, len(payload), key, sender, check, MAX)
            for url, payload, key, sender, check in items
        ]
    answers = [{f.name: getattr(s, f.name) for f in fields(Step)} for s in steps]
    return answers, [await snapshot(conn, url) for url in urls]


async def test_send_many_answers_as_sends_one_after_another(conn: asyncpg.Connection) -> None:
    """Random calls over entities in every relevant state (a passed lease, a stopping entity
    the first send stops, parked, terminal, members, repeated idempotency keys with the same
    and another payload, unknown entities, senders who are not members): the combined call
    answers every item and leaves every row as sending the items one by one does."""
    rng = random.Random(20261201)
    bad = Mismatches()
    for n in range(150):
        async with rolled_back(conn):
            urls = await _world(conn, rng)
            items = _items(rng, urls)
            case = f"case {n}: {len(items)} items over {len(urls)} entities"
            async with rolled_back(conn):
                one_by_one = await _run_items(conn, urls, items, many=False)
            async with rolled_back(conn):
                combined = await _run_items(conn, urls, items, many=True)
        bad.cases += 1
        ids_a: dict[str, str] = {}
        ids_b: dict[str, str] = {}
        for k, (want, got) in enumerate(zip(one_by_one[0], combined[0], strict=True)):
            bad.expect(
                f"{case}, item {k} {items[k]}", "answer", _normal(got, ids_b), _normal(want, ids_a)
            )
        for url, want, got in zip(urls, one_by_one[1], combined[1], strict=True):
            bad.expect(f"{case}, {url}", "rows", _normal(got, ids_b), _normal(want, ids_a))
    bad.assert_none()


async def test_send_many_of_one_entity_is_one_update_and_one_insert(
    conn: asyncpg.Connection,
) -> None:
    """The point of the call: 200 sends to an entity with an outstanding wake append 200
    messages with one tail update, answered coalesced, offsets in order."""
    async with rolled_back(conn):
        c = await make(conn, hold="wake", tail=1)
        n = 200
        rows = await conn.fetch(
            SEND_MANY,
            [c.url] * n,
            ['{"x": 1}'] * n,
            [8] * n,
            [None] * n,
            [ALICE] * n,
            [True] * n,
            MAX,
        )
        steps = [Step(*tuple(r)[1:]) for r in sorted(rows, key=lambda r: r[0])]
        assert [s.msg_offset for s in steps] == list(range(2, n + 2))
        assert {(s.code, s.wake_id, s.wake_status) for s in steps} == {
            (None, c.wake_id, "coalesced")
        }
        after = await snapshot(conn, c.url)
        assert after["dispatch"]["tail_offset"] == n + 1
        assert [m["offset"] for m in after["inbox"]] == list(range(2, n + 2))
