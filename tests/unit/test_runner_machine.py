"""The runner lifecycle table: every (state, event) pair, and the effects of transitions."""

from __future__ import annotations

import pytest

from pullwake.runner.machine import TABLE, Effect, Event, State, transition

S, E = State, Event

# Written out independently of the implementation: rows are states, columns follow COLUMNS.
COLUMNS = [
    E.START,
    E.STOP,
    E.CONNECTED,
    E.CONNECT_FAILED,
    E.REFUSED,
    E.WAKE,
    E.STREAM_RESET,
    E.STREAM_END,
    E.STREAM_ERROR,
    E.BACKOFF_ELAPSED,
    E.SHUTDOWN_DONE,
]
ci, st, rc, sp = S.CONNECTING, S.STREAMING, S.RECONNECTING, S.STOPPING
EXPECTED = {
    S.STOPPED: [ci] + [S.STOPPED] * 10,
    S.CONNECTING: [ci, sp, st, rc, sp, ci, rc, ci, ci, ci, ci],
    S.STREAMING: [st, sp, st, st, st, st, rc, rc, rc, st, st],
    S.RECONNECTING: [rc, sp, rc, rc, rc, rc, rc, rc, rc, ci, rc],
    S.STOPPING: [sp] * 10 + [S.STOPPED],
}
PAIRS = [(s, e, EXPECTED[s][i]) for s in State for i, e in enumerate(COLUMNS)]


def test_every_pair_is_in_the_table() -> None:
    assert set(COLUMNS) == set(Event)
    assert len(PAIRS) == 55
    for state in State:
        assert set(TABLE[state]) == set(Event), state


@pytest.mark.parametrize(("state", "event", "target"), PAIRS, ids=lambda v: str(v))
def test_transition(state: State, event: Event, target: State) -> None:
    step = transition(state, event)
    assert step.target is target
    assert step.changed == (state is not target)
    if not step.changed:
        # No entry or exit effects on a self-transition: at most the event's own effect.
        assert set(step.effects) <= {Effect.HANDLE_WAKE}


def test_leaving_connecting_aborts_the_connect_except_into_streaming() -> None:
    assert transition(S.CONNECTING, E.STREAM_RESET).effects == (
        Effect.ABORT_CONNECT,
        Effect.RECORD_ERROR,
        Effect.SCHEDULE_RECONNECT,
    )
    assert transition(S.CONNECTING, E.STOP).effects == (Effect.ABORT_CONNECT, Effect.SHUTDOWN)
    assert transition(S.CONNECTING, E.CONNECTED).effects == (Effect.MARK_CONNECTED,)
    assert transition(S.CONNECTING, E.REFUSED).effects == (
        Effect.ABORT_CONNECT,
        Effect.RECORD_ERROR,
        Effect.SHUTDOWN,
    )


def test_stream_reset_and_errors_close_the_stream_and_record() -> None:
    assert transition(S.STREAMING, E.STREAM_RESET).effects == (
        Effect.CLOSE_STREAM,
        Effect.RECORD_ERROR,
        Effect.SCHEDULE_RECONNECT,
    )
    assert transition(S.STREAMING, E.STREAM_ERROR).effects == (
        Effect.CLOSE_STREAM,
        Effect.RECORD_ERROR,
        Effect.SCHEDULE_RECONNECT,
    )
    # A clean end reconnects without counting as an error.
    assert transition(S.STREAMING, E.STREAM_END).effects == (
        Effect.CLOSE_STREAM,
        Effect.SCHEDULE_RECONNECT,
    )


def test_reconnecting_ignores_further_resets_and_reconnects_after_backoff() -> None:
    assert transition(S.RECONNECTING, E.STREAM_RESET).effects == ()
    assert transition(S.RECONNECTING, E.BACKOFF_ELAPSED).effects == (
        Effect.CANCEL_BACKOFF,
        Effect.OPEN_STREAM,
    )
    assert transition(S.RECONNECTING, E.STOP).effects == (Effect.CANCEL_BACKOFF, Effect.SHUTDOWN)


def test_wakes_are_handled_only_while_running() -> None:
    handled = {s for s in State if Effect.HANDLE_WAKE in transition(s, E.WAKE).effects}
    assert handled == {S.CONNECTING, S.STREAMING, S.RECONNECTING}


def test_start_and_stop_bracket_the_lifecycle() -> None:
    assert transition(S.STOPPED, E.START).effects == (Effect.OPEN_STREAM,)
    assert transition(S.STOPPING, E.SHUTDOWN_DONE).effects == (Effect.MARK_STOPPED,)
    assert transition(S.STOPPING, E.START).target is S.STOPPING
