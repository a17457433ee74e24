"""Pure dispatch rules in pullwake.model: no I/O."""

from __future__ import annotations

import hashlib
import itertools
import re

import msgspec
import pytest

from pullwake import model
from pullwake.errors import EntityNotRunnable, InvalidOffset
from pullwake.http.claims import ClaimId
from pullwake.model import (
    ID_PATTERN,
    EntityStatus,
    Principal,
    Signal,
    decide_done,
    entity_url,
    hash_token,
    is_valid_id,
    new_claim_token,
    new_id,
    pending,
    signal_outcome,
    status_after_claim_end,
    wake_allowed,
)
from pullwake.wire import RunnerRegister

S = EntityStatus

# --- wake_allowed --------------------------------------------------------------------------


def _allowed(
    status: EntityStatus = S.IDLE,
    *,
    tail: int = 1,
    acked: int = 0,
    outstanding: bool = False,
    claim: bool = False,
    parked: bool = False,
) -> bool:
    return wake_allowed(
        status,
        tail_offset=tail,
        acked_offset=acked,
        outstanding_wake=outstanding,
        active_claim=claim,
        parked=parked,
    )


@pytest.mark.parametrize("status", [S.IDLE, S.RUNNING])
def test_wake_allowed_for_runnable_entity_with_pending_work(status: EntityStatus) -> None:
    assert _allowed(status, tail=3, acked=2)


def test_outstanding_wake_coalesces() -> None:
    assert not _allowed(outstanding=True)


def test_active_claim_coalesces() -> None:
    assert not _allowed(S.RUNNING, claim=True)


def test_outstanding_wake_and_active_claim_together_coalesce() -> None:
    assert not _allowed(S.RUNNING, outstanding=True, claim=True)


@pytest.mark.parametrize("status", [S.PAUSED, S.STOPPING, S.STOPPED, S.KILLED])
def test_no_wake_unless_idle_or_running(status: EntityStatus) -> None:
    assert not _allowed(status, tail=5, acked=0)


def test_parked_entity_gets_no_wake() -> None:
    assert not _allowed(parked=True, tail=9, acked=0)


@pytest.mark.parametrize(("tail", "acked"), [(0, 0), (4, 4), (3, 5)])
def test_no_pending_work_no_wake(tail: int, acked: int) -> None:
    assert not _allowed(tail=tail, acked=acked)


def test_wake_allowed_exhaustive() -> None:
    """Only one combination of the flags wakes: runnable, unparked, uncovered, pending."""
    for status, outstanding, claim, parked, has_pending in itertools.product(
        list(EntityStatus), [False, True], [False, True], [False, True], [False, True]
    ):
        expected = (
            status in (S.IDLE, S.RUNNING)
            and not outstanding
            and not claim
            and not parked
            and has_pending
        )
        got = _allowed(
            status,
            tail=2 if has_pending else 1,
            acked=1,
            outstanding=outstanding,
            claim=claim,
            parked=parked,
        )
        assert got is expected, (status, outstanding, claim, parked, has_pending)


def test_pending() -> None:
    assert pending(1, 0)
    assert not pending(0, 0)
    assert not pending(3, 3)


# --- decide_done ---------------------------------------------------------------------------


def test_done_with_progress_resets_failed_attempts() -> None:
    d = decide_done(current_acked=2, tail_offset=7, requested_acked=5, failed_attempts=3)
    assert d.acked_offset == 5
    assert d.progressed is True
    assert d.failed_attempts == 0


def test_done_up_to_the_tail_is_allowed() -> None:
    d = decide_done(current_acked=0, tail_offset=7, requested_acked=7, failed_attempts=0)
    assert (d.acked_offset, d.progressed, d.failed_attempts) == (7, True, 0)


def test_done_without_progress_counts_a_failed_attempt() -> None:
    d = decide_done(current_acked=4, tail_offset=7, requested_acked=4, failed_attempts=2)
    assert d.acked_offset == 4
    assert d.progressed is False
    assert d.failed_attempts == 3


def test_done_past_the_tail_is_invalid() -> None:
    with pytest.raises(InvalidOffset) as info:
        decide_done(current_acked=1, tail_offset=3, requested_acked=4, failed_attempts=0)
    err = info.value
    assert err.code == "INVALID_OFFSET"
    assert err.status == 409
    assert "past" in err.detail
    assert err.extra == {"acked_offset": 1, "tail_offset": 3}


def test_done_backwards_is_invalid() -> None:
    with pytest.raises(InvalidOffset) as info:
        decide_done(current_acked=5, tail_offset=9, requested_acked=4, failed_attempts=0)
    assert "behind" in info.value.detail
    assert info.value.extra == {"acked_offset": 5, "tail_offset": 9}


def test_done_offsets_exhaustive_small_range() -> None:
    """Valid iff current <= requested <= tail; acked never regresses nor passes the tail."""
    for current, tail, requested in itertools.product(range(4), range(4), range(5)):
        if current > tail:
            continue
        if current <= requested <= tail:
            d = decide_done(
                current_acked=current,
                tail_offset=tail,
                requested_acked=requested,
                failed_attempts=1,
            )
            assert current <= d.acked_offset <= tail
            assert d.progressed is (requested > current)
            # one more failed attempt only when work is left and nothing was acked
            assert d.failed_attempts == (2 if requested == current < tail else 0)
        else:
            with pytest.raises(InvalidOffset):
                decide_done(
                    current_acked=current,
                    tail_offset=tail,
                    requested_acked=requested,
                    failed_attempts=1,
                )


# --- status_after_claim_end ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("before", "after"),
    [
        (S.RUNNING, S.IDLE),
        (S.STOPPING, S.STOPPED),
        (S.IDLE, S.IDLE),
        (S.PAUSED, S.PAUSED),
        (S.STOPPED, S.STOPPED),
        (S.KILLED, S.KILLED),
    ],
)
def test_status_after_claim_end(before: EntityStatus, after: EntityStatus) -> None:
    assert status_after_claim_end(before) is after


# --- signal_outcome ------------------------------------------------------------------------

NON_TERMINAL = [S.IDLE, S.RUNNING, S.PAUSED, S.STOPPING]

# (status, signal, active_claim) -> (status, supersede_outstanding, fence_claim, clear_park)
SIGNAL_TABLE: dict[tuple[EntityStatus, Signal, bool], tuple[EntityStatus, bool, bool, bool]] = {}
for _status in NON_TERMINAL:
    for _claim in (False, True):
        # a pause does not undo a stop in progress either
        paused = S.STOPPING if _status is S.STOPPING else S.PAUSED
        SIGNAL_TABLE[(_status, Signal.PAUSE, _claim)] = (paused, True, False, False)
        SIGNAL_TABLE[(_status, Signal.STOP, _claim)] = (
            S.STOPPING if _claim else S.STOPPED,
            True,
            False,
            False,
        )
        SIGNAL_TABLE[(_status, Signal.KILL, _claim)] = (S.KILLED, True, True, False)
        # a resume does not undo a stop in progress
        resumed = S.STOPPING if _status is S.STOPPING else (S.RUNNING if _claim else S.IDLE)
        SIGNAL_TABLE[(_status, Signal.RESUME, _claim)] = (resumed, False, False, True)
for _status in (S.STOPPED, S.KILLED):
    for _claim in (False, True):
        SIGNAL_TABLE[(_status, Signal.KILL, _claim)] = (S.KILLED, True, True, False)


@pytest.mark.parametrize(
    ("status", "signal", "active_claim", "expected"),
    [(*key, value) for key, value in SIGNAL_TABLE.items()],
    ids=[f"{k[0].value}-{k[1].value}-{'claim' if k[2] else 'noclaim'}" for k in SIGNAL_TABLE],
)
def test_signal_outcome_table(
    status: EntityStatus,
    signal: Signal,
    active_claim: bool,
    expected: tuple[EntityStatus, bool, bool, bool],
) -> None:
    out = signal_outcome(status, signal, active_claim=active_claim)
    assert (out.status, out.supersede_outstanding, out.fence_claim, out.clear_park) == expected


@pytest.mark.parametrize("status", [S.STOPPED, S.KILLED])
@pytest.mark.parametrize("signal", [Signal.PAUSE, Signal.RESUME, Signal.STOP])
@pytest.mark.parametrize("active_claim", [False, True])
def test_terminal_entities_only_accept_kill(
    status: EntityStatus, signal: Signal, active_claim: bool
) -> None:
    with pytest.raises(EntityNotRunnable) as info:
        signal_outcome(status, signal, active_claim=active_claim)
    assert info.value.code == "ENTITY_NOT_RUNNABLE"
    assert info.value.status == 409
    assert status.value in info.value.detail


def test_signal_table_covers_every_combination() -> None:
    combos = set(itertools.product(list(EntityStatus), list(Signal), [False, True]))
    raising = {
        (st, sig, c) for st, sig, c in combos if st in model.TERMINAL and sig is not Signal.KILL
    }
    assert set(SIGNAL_TABLE) | raising == combos


def test_stop_with_active_claim_ends_stopped_when_claim_ends() -> None:
    out = signal_outcome(S.RUNNING, Signal.STOP, active_claim=True)
    assert status_after_claim_end(out.status) is S.STOPPED


def test_pause_does_not_cancel_a_stop_in_progress() -> None:
    out = signal_outcome(S.STOPPING, Signal.PAUSE, active_claim=True)
    assert status_after_claim_end(out.status) is S.STOPPED


# --- principals and ids --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("key", "kind", "ident"),
    [
        ("user:alice@example.com", "user", "alice@example.com"),
        ("service:billing", "service", "billing"),
        ("system:dev-local", "system", "dev-local"),
        ("user:a:b", "user", "a:b"),
        ("user:" + "x" * 256, "user", "x" * 256),
    ],
)
def test_principal_parse_good(key: str, kind: str, ident: str) -> None:
    p = Principal.parse(key)
    assert (p.kind, p.id) == (kind, ident)
    assert p.key == key
    assert str(p) == key


@pytest.mark.parametrize(
    "key",
    [
        "",
        "alice",
        "user:",
        ":alice",
        "admin:alice",
        "USER:alice",
        "user:has space",
        "user:tab\there",
        "user:a/b",
        " user:alice",
        "user:" + "x" * 257,
        "user:nul\x00here",
        "user:bell\x07",
        "user:del\x7f",
        "user:surrogate\udc80",
    ],
)
def test_principal_parse_bad(key: str) -> None:
    with pytest.raises(ValueError, match="principal must look like"):
        Principal.parse(key)


@pytest.mark.parametrize("key", ["user:alice\n", "user:alice\r\n", "\nuser:alice"])
def test_principal_parse_rejects_newlines(key: str) -> None:
    """Regression: '$' with re.match used to accept a trailing newline."""
    with pytest.raises(ValueError, match="principal must look like"):
        Principal.parse(key)


def test_principal_is_frozen_and_hashable() -> None:
    p = Principal.parse("user:a@b")
    assert p == Principal("user", "a@b")
    assert {p, Principal("user", "a@b")} == {p}
    with pytest.raises(AttributeError):
        p.kind = "service"  # type: ignore[misc]


@pytest.mark.parametrize("value", ["a", "A", "0", "a.b_c-d", "Z9", "x" * 128, "1.0"])
def test_valid_ids(value: str) -> None:
    assert is_valid_id(value)
    assert re.match(ID_PATTERN, value)


@pytest.mark.parametrize(
    "value", ["", "-a", ".a", "_a", "a b", "a/b", "a:b", "é", "a{b}", "x" * 129, "a\tb"]
)
def test_invalid_ids(value: str) -> None:
    assert not is_valid_id(value)


@pytest.mark.parametrize("value", ["abc\n", "abc\r\n", "\nabc"])
def test_id_with_newline_is_invalid(value: str) -> None:
    """Regression: '$' also matches before a trailing newline."""
    assert not is_valid_id(value)
    assert not re.match(ID_PATTERN, value)
    with pytest.raises(msgspec.ValidationError):
        msgspec.convert({"id": value}, RunnerRegister)


def test_entity_url() -> None:
    assert entity_url("task", "t-1") == "/task/t-1"


# --- tokens and ids ------------------------------------------------------------------------


def test_hash_token_is_hex_sha256() -> None:
    token = "pwk_example"
    digest = hash_token(token)
    assert digest == hashlib.sha256(token.encode()).hexdigest()
    assert re.fullmatch(r"[0-9a-f]{64}", digest)
    assert hash_token(token) == digest
    assert hash_token(token + "x") != digest
    assert token not in digest


def test_new_id_shape_and_claim_id_route_pattern() -> None:
    wake_id = new_id("wk")
    assert re.fullmatch(r"wk_[0-9a-f]{12}[0-9a-f]{16}", wake_id)
    # wake ids double as claim ids in /v1/claims/{claim_id}: the route pattern must accept them
    (param,) = ClaimId.__metadata__
    assert re.fullmatch(param.pattern, wake_id)
    assert len(wake_id) <= param.max_length


def test_new_id_is_unique() -> None:
    ids = {new_id("tok") for _ in range(5_000)}
    assert len(ids) == 5_000


def test_new_id_sorts_by_creation_time(monkeypatch: pytest.MonkeyPatch) -> None:
    clock = iter([1_700_000_000.0, 1_700_000_000.25, 1_700_000_001.5, 1_700_000_100.0])
    monkeypatch.setattr(model.time, "time", lambda: next(clock))
    ids = [new_id("wk") for _ in range(4)]
    assert ids == sorted(ids)
    assert len(set(ids)) == 4
    assert ids[0].startswith(f"wk_{1_700_000_000_000:012x}")


def test_new_id_time_part_is_current_millis() -> None:
    import time

    before = int(time.time() * 1000)
    wake_id = new_id("wk")
    after = int(time.time() * 1000)
    assert before <= int(wake_id[3:15], 16) <= after


def test_new_claim_token_prefix_and_entropy() -> None:
    tokens = [new_claim_token() for _ in range(1_000)]
    assert len(set(tokens)) == len(tokens)
    for token in tokens:
        assert token.startswith("pwc_")
        body = token[len("pwc_") :]
        # 32 random bytes, url-safe base64 without padding: 43 characters
        assert len(body) == 43
        assert re.fullmatch(r"[A-Za-z0-9_-]{43}", body)
