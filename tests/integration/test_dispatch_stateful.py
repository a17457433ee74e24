"""Hypothesis stateful test of the dispatch state machine (the lifecycle invariants).

Random interleavings of send, batch send, claim (current, duplicate and stale wakes), claim
heartbeat, done, release and event writes (by the live holder, by stale holders, with wrong
epochs and with other claims' tokens), lease expiry (the lease is moved into the past, then
either the recovery sweep or the next call expires it) and signals run against the real
services on Postgres and Redis. After every step the invariants are checked in Postgres:

- at most one active claim and at most one outstanding wake per entity, never both at once,
  and ``dispatch_state`` agrees with the ``claims`` and ``wakes`` rows;
- acked offsets never regress and never pass the tail; tails and epochs never regress;
- an outstanding wake exists only while work is pending;
- idle entities hold no claim, running entities hold one;
- a stale holder (ended, expired or superseded claim, wrong epoch, someone else's token) is
  refused and changes nothing; the live holder is always accepted.

Bounded for CI: 60 derandomized examples of up to 30 steps (``PULLWAKE_STATEFUL_EXAMPLES``).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import asyncpg
import msgspec
import pytest
from hypothesis import HealthCheck, event, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    Bundle,
    RuleBasedStateMachine,
    initialize,
    invariant,
    multiple,
    precondition,
    rule,
    run_state_machine_as_test,
)

from pullwake.config import Settings
from pullwake.core.claims import NoWork
from pullwake.errors import (
    AlreadyClaimed,
    EntityNotRunnable,
    Fenced,
    Forbidden,
    InvalidOffset,
    LeaseExpired,
    NotFound,
    PullwakeError,
)
from pullwake.model import Principal, Signal, entity_url, hash_token
from pullwake.services import Services, open_services
from pullwake.wire import BatchItem, ClaimDone, EntityCreate, RunnerRegister, WakeNotification

from .helpers import ALICE, runner_policy, uid
from .threaded import LoopThread

EXAMPLES = int(os.environ.get("PULLWAKE_STATEFUL_EXAMPLES", "60"))
ENTITIES = 3
STALE = (Fenced, LeaseExpired, Forbidden, NotFound)


@dataclass
class Ctx:
    """Services on a private loop, a runner, and a direct connection for the invariants."""

    loop: LoopThread
    services: Services
    conn: asyncpg.Connection
    runner_id: str

    def run(self, coro: Any) -> Any:
        return self.loop.run(coro)


@pytest.fixture
def ctx(settings: Settings) -> Iterator[Ctx]:
    loop = LoopThread()
    stack: list[Any] = []

    async def start() -> Ctx:
        opened = open_services(settings)
        services = await opened.__aenter__()
        stack.append(opened)
        conn = await asyncpg.connect(settings.database_url)
        runner_id = uid("sm")
        await services.runners.register(Principal.parse(ALICE), RunnerRegister(id=runner_id))
        return Ctx(loop, services, conn, runner_id)

    context = loop.run(start())
    try:
        yield context
    finally:

        async def stop() -> None:
            await context.conn.close()
            await stack[0].__aexit__(None, None, None)

        loop.run(stop())
        loop.close()


@dataclass
class Held:
    """A claim as its holder knows it (it may have gone stale since)."""

    claim_id: str
    epoch: int
    token: str
    url: str


@dataclass
class Seen:
    """Per-entity high-water marks, to prove nothing moves backwards."""

    tail: int = 0
    acked: int = 0
    epoch: int = 0
    sends: int = 0
    keys: dict[str, int] = field(default_factory=dict)


class DispatchMachine(RuleBasedStateMachine):
    """The model: entity urls, every claim ever handed out, and the high-water marks."""

    claims = Bundle("claims")
    wakes = Bundle("wakes")

    def __init__(self, ctx: Ctx) -> None:
        super().__init__()
        self.ctx = ctx
        self.alice = Principal.parse(ALICE)
        self.urls: list[str] = []
        self.seen: dict[str, Seen] = {}

    # --- helpers ---------------------------------------------------------------------------

    def run(self, coro: Any) -> Any:
        return self.ctx.run(coro)

    def state(self, url: str) -> Any:
        return self.run(
            self.ctx.conn.fetchrow(
                """SELECT e.status, d.*, now() AS now FROM dispatch_state d
                   JOIN entities e ON e.url = d.entity_url WHERE d.entity_url = $1""",
                url,
            )
        )

    def live(self, held: Held) -> bool:
        """True when ``held`` is the entity's active claim, with its current token (a retried
        chaining done re-issues it), and its lease has not passed."""
        row = self.state(held.url)
        return (
            row["active_claim_id"] == held.claim_id
            and row["active_epoch"] == held.epoch
            and row["active_token_hash"] == hash_token(held.token)
            and row["active_lease_expires_at"] > row["now"]
        )

    def attempt(self, coro: Any) -> tuple[Any, PullwakeError | None]:
        """Run a use case; a refusal is returned (and must be a 4xx), anything else raises."""
        error: PullwakeError | None = None
        try:
            result = self.run(coro)
        except PullwakeError as exc:
            result, error = None, exc
        if error is not None:
            event(f"refused: {error.code}")
            assert error.status < 500, (error.code, error.detail)
        return result, error

    def check_stale_refused(self, held: Held, error: PullwakeError | None, before: Any) -> None:
        assert isinstance(error, STALE), (held, error)
        after = self.state(held.url)
        columns = ["acked_offset", "tail_offset"]
        if before["active_claim_id"] != held.claim_id:
            # Unless the refused call found this claim's lease passed and expired it (handing
            # the work on in a new wake), the claim and the epoch stay as they were too.
            columns += ["epoch", "active_claim_id", "outstanding_wake_id"]
        for column in columns:
            assert after[column] == before[column], (column, before[column], after[column])

    # --- setup -----------------------------------------------------------------------------

    @initialize()
    def create_entities(self) -> None:
        body = msgspec.convert({"dispatch_policy": runner_policy(self.ctx.runner_id)}, EntityCreate)
        type_name = uid("smt")
        for _ in range(ENTITIES):
            entity_id = uid("sme")
            self.run(
                self.ctx.services.dispatcher.create_entity(self.alice, type_name, entity_id, body)
            )
            url = entity_url(type_name, entity_id)
            self.urls.append(url)
            self.seen[url] = Seen()

    # --- senders ---------------------------------------------------------------------------

    @rule(target=wakes, index=st.integers(0, ENTITIES - 1), key=st.sampled_from([None, "k1", "k2"]))
    def send(self, index: int, key: str | None) -> Any:
        url = self.urls[index]
        seen = self.seen[url]
        status = self.state(url)["status"]
        result, error = self.attempt(
            # A retry under a key carries the payload it was first sent with.
            self.ctx.services.dispatcher.send(self.alice, url, {"k": key} if key else {"n": 0}, key)
        )
        if status in ("stopped", "killed") and (key is None or key not in seen.keys):
            assert isinstance(error, EntityNotRunnable), error
            return multiple()
        assert error is None, error
        if key is not None and key in seen.keys:
            assert result.duplicate
            assert result.offset == seen.keys[key]
        else:
            seen.sends += 1
            assert result.offset == seen.sends
            if key is not None:
                seen.keys[key] = result.offset
        return multiple(result.wake.id) if result.wake.id else multiple()

    @rule(
        target=wakes,
        picks=st.lists(
            st.tuples(st.integers(0, ENTITIES - 1), st.sampled_from([None, "k1", "k3"])),
            min_size=1,
            max_size=6,
        ),
    )
    def send_batch(self, picks: list[tuple[int, str | None]]) -> Any:
        """Several entities (and one entity several times) in one batch: each item does what a
        single send does, in the batch's order."""
        statuses = {url: self.state(url)["status"] for url in self.urls}
        items = [BatchItem(self.urls[i], {"k": key} if key else {"n": 0}, key) for i, key in picks]
        results, error = self.attempt(self.ctx.services.batch.send(self.alice, items))
        assert error is None, error
        new_wakes = []
        for (index, key), result in zip(picks, results, strict=True):
            url = self.urls[index]
            seen = self.seen[url]
            if statuses[url] in ("stopped", "killed") and (key is None or key not in seen.keys):
                assert result.problem is not None, result
                assert result.problem.code == "ENTITY_NOT_RUNNABLE", result
                continue
            assert result.problem is None, result
            if key is not None and key in seen.keys:
                assert result.duplicate
                assert result.offset == seen.keys[key]
                continue
            seen.sends += 1
            assert result.offset == seen.sends, (result, seen)
            if key is not None:
                seen.keys[key] = result.offset
            assert result.wake is not None
            if result.wake.status == "queued" and result.wake.id:
                new_wakes.append(result.wake.id)
        return multiple(*new_wakes)

    # --- the runner ------------------------------------------------------------------------

    @rule(target=claims, index=st.integers(0, ENTITIES - 1))
    def claim_outstanding(self, index: int) -> Any:
        before = self.state(self.urls[index])
        wake_id = before["outstanding_wake_id"]
        if wake_id is None:
            return multiple()
        outcome, error = self.attempt(
            self.ctx.services.claims.claim(self.ctx.runner_id, wake_id, None)
        )
        assert error is None, error
        if before["status"] == "paused":
            assert isinstance(outcome, ClaimDone), outcome
            return multiple()
        assert isinstance(outcome, WakeNotification), outcome
        assert outcome.epoch == before["epoch"]
        assert outcome.acked_offset == before["acked_offset"]
        return Held(outcome.claim_id, outcome.epoch, outcome.claim_token, outcome.entity.url)

    @rule(target=claims, wake_id=wakes)
    def claim_again(self, wake_id: str) -> Any:
        """A duplicate or late delivery of a wake seen earlier."""
        url = self.run(self.ctx.conn.fetchval("SELECT entity_url FROM wakes WHERE id=$1", wake_id))
        before = self.state(url)
        outcome, error = self.attempt(
            self.ctx.services.claims.claim(self.ctx.runner_id, wake_id, None)
        )
        if before["outstanding_wake_id"] != wake_id:
            # Not outstanding: never a second claim, whatever else is going on.
            assert not isinstance(outcome, WakeNotification), outcome
            assert error is None or isinstance(error, AlreadyClaimed), error
            if (
                before["active_claim_id"] is not None
                and before["active_lease_expires_at"] > before["now"]
            ):
                assert isinstance(error, AlreadyClaimed), (error, outcome)
            return multiple()
        assert error is None, error
        if isinstance(outcome, WakeNotification):
            return Held(outcome.claim_id, outcome.epoch, outcome.claim_token, outcome.entity.url)
        assert isinstance(outcome, ClaimDone | NoWork), outcome
        return multiple()

    # --- the holder, or a stale one --------------------------------------------------------

    @rule(held=claims, skew=st.sampled_from([0, 0, 0, -1, 1]))
    def heartbeat(self, held: Held, skew: int) -> None:
        live, before = self.live(held), self.state(held.url)
        _result, error = self.attempt(
            self.ctx.services.callbacks.heartbeat(held.claim_id, held.token, held.epoch + skew)
        )
        if live and skew == 0:
            assert error is None, error
        else:
            self.check_stale_refused(held, error, before)

    @rule(
        target=claims,
        held=claims,
        where=st.sampled_from(["tail", "acked", "middle", "past", "behind"]),
        chain=st.booleans(),
    )
    def done(self, held: Held, where: str, chain: bool) -> Any:
        live, before = self.live(held), self.state(held.url)
        tail, acked = before["tail_offset"], before["acked_offset"]
        offset = {
            "tail": tail,
            "acked": acked,
            "middle": (tail + acked) // 2,
            "past": tail + 1,
            "behind": max(acked - 1, 0),
        }[where]
        result, error = self.attempt(
            self.ctx.services.callbacks.done(
                held.claim_id, held.token, held.epoch, offset, claim_next=chain
            )
        )
        if not live:
            replay = self.run(
                self.ctx.conn.fetchrow(
                    "SELECT end_reason, acked_offset FROM claims WHERE id = $1", held.claim_id
                )
            )
            if error is None:  # a retried done answers what the first one did, changing nothing
                assert (replay["end_reason"], replay["acked_offset"]) == ("done", offset)
                after = self.state(held.url)
                assert after["acked_offset"] == acked
                assert after["tail_offset"] == tail
                return self._chained(result, held, chain)
            self.check_stale_refused(held, error, before)
        elif acked <= offset <= tail:
            assert error is None, error
            assert result.ok
            assert self.state(held.url)["acked_offset"] == offset
            return self._chained(result, held, chain)
        else:
            assert isinstance(error, InvalidOffset), error
        return multiple()

    def _chained(self, result: Any, held: Held, chain: bool) -> Any:
        """The follow-up claim a chaining done handed over (it must hold the entity)."""
        note = result.next_claim
        if note is None:
            return multiple()
        assert chain, "a claim was chained without claim_next"
        assert note.epoch > held.epoch
        assert self.live(Held(note.claim_id, note.epoch, note.claim_token, note.entity.url))
        return Held(note.claim_id, note.epoch, note.claim_token, note.entity.url)

    @rule(held=claims)
    def release(self, held: Held) -> None:
        live, before = self.live(held), self.state(held.url)
        _result, error = self.attempt(
            self.ctx.services.callbacks.release(held.claim_id, held.token, held.epoch, "gave up")
        )
        if live:
            assert error is None, error
            assert self.state(held.url)["acked_offset"] == before["acked_offset"]
        else:
            self.check_stale_refused(held, error, before)

    @rule(held=claims, other=claims)
    def write_event(self, held: Held, other: Held) -> None:
        """The holder writes with its own token; a thief with another claim's token."""
        live, before = self.live(held), self.state(held.url)
        token = held.token if held.claim_id == other.claim_id else other.token
        _result, error = self.attempt(
            self.ctx.services.callbacks.append_event(token, held.url, {"e": 1}, held.epoch)
        )
        if live and token == held.token:
            assert error is None, error
        else:
            self.check_stale_refused(held, error, before)

    # --- time and operators ----------------------------------------------------------------

    @rule(index=st.integers(0, ENTITIES - 1), sweep=st.booleans())
    def lease_passes(self, index: int, sweep: bool) -> None:
        """The holder went silent: its lease is in the past; maybe the recovery sweep runs."""
        url = self.urls[index]
        self.run(
            self.ctx.conn.execute(
                """UPDATE dispatch_state SET active_lease_expires_at = now() - interval '1 s'
                   WHERE entity_url = $1 AND active_claim_id IS NOT NULL""",
                url,
            )
        )
        self.run(
            self.ctx.conn.execute(
                """UPDATE claims SET lease_expires_at = now() - interval '1 s'
                   WHERE entity_url = $1 AND status = 'active'""",
                url,
            )
        )
        if sweep:
            self.run(self.ctx.services.recovery.expire_claims())
            assert self.state(url)["active_claim_id"] is None

    @rule(index=st.integers(0, ENTITIES - 1), signal=st.sampled_from([Signal.PAUSE, Signal.RESUME]))
    def pause_or_resume(self, index: int, signal: Signal) -> None:
        self.signal(self.urls[index], signal)

    @precondition(lambda self: self.state(self.urls[-1])["status"] not in ("stopped", "killed"))
    @rule(signal=st.sampled_from([Signal.STOP, Signal.KILL]))
    def stop_or_kill(self, signal: Signal) -> None:
        """Only the last entity may end, so the others keep flowing."""
        self.signal(self.urls[-1], signal)

    def signal(self, url: str, signal: Signal) -> None:
        status = self.state(url)["status"]
        _, error = self.attempt(self.ctx.services.dispatcher.signal(self.alice, url, signal))
        if status in ("stopped", "killed") and signal is not Signal.KILL:
            assert isinstance(error, EntityNotRunnable), error
        else:
            assert error is None, error

    @rule(target=claims, index=st.integers(0, ENTITIES - 1))
    def work_through(self, index: int) -> Any:
        """The happy path in one step: claim the outstanding wake, heartbeat, ack everything."""
        wake_id = self.state(self.urls[index])["outstanding_wake_id"]
        if wake_id is None:
            return multiple()
        claims, callbacks = self.ctx.services.claims, self.ctx.services.callbacks
        note, error = self.attempt(claims.claim(self.ctx.runner_id, wake_id, None))
        assert error is None, error
        if not isinstance(note, WakeNotification):
            return multiple()
        _, error = self.attempt(callbacks.heartbeat(note.claim_id, note.claim_token, note.epoch))
        assert error is None, error
        _, error = self.attempt(
            callbacks.done(note.claim_id, note.claim_token, note.epoch, note.tail_offset)
        )
        assert error is None, error
        return Held(note.claim_id, note.epoch, note.claim_token, note.entity.url)

    # --- invariants ------------------------------------------------------------------------

    @invariant()
    def dispatch_invariants(self) -> None:
        for url in self.urls:
            self.check_entity(url)

    def check_entity(self, url: str) -> None:
        row = self.state(url)
        conn = self.ctx.conn
        active = self.run(
            conn.fetch("SELECT id, epoch FROM claims WHERE entity_url=$1 AND status='active'", url)
        )
        outstanding = self.run(
            conn.fetch(
                """SELECT id FROM wakes WHERE entity_url=$1 AND claim_status='unclaimed'
                   AND delivery_status IN ('queued', 'delivered')""",
                url,
            )
        )
        assert len(active) <= 1, active
        assert len(outstanding) <= 1, outstanding
        assert not (active and outstanding), (active, outstanding)
        assert [r["id"] for r in active] == (
            [row["active_claim_id"]] if row["active_claim_id"] else []
        )
        assert [r["id"] for r in outstanding] == (
            [row["outstanding_wake_id"]] if row["outstanding_wake_id"] else []
        )
        if active:
            assert active[0]["epoch"] == row["active_epoch"] == row["epoch"]
        assert 0 <= row["acked_offset"] <= row["tail_offset"]
        if row["outstanding_wake_id"] is not None:
            assert row["tail_offset"] > row["acked_offset"], "a wake without pending work"
        if row["status"] == "idle":
            assert row["active_claim_id"] is None
        if row["status"] == "running":
            assert row["active_claim_id"] is not None
        seen = self.seen[url]
        assert row["tail_offset"] == seen.sends
        assert row["acked_offset"] >= seen.acked, "acked offset regressed"
        assert row["tail_offset"] >= seen.tail
        assert row["epoch"] >= seen.epoch
        seen.acked, seen.tail, seen.epoch = row["acked_offset"], row["tail_offset"], row["epoch"]


def test_dispatch_state_machine_invariants(ctx: Ctx) -> None:
    run_state_machine_as_test(
        lambda: DispatchMachine(ctx),
        settings=settings(
            max_examples=EXAMPLES,
            stateful_step_count=30,
            deadline=None,
            database=None,
            derandomize=True,
            suppress_health_check=list(HealthCheck),
        ),
    )
