"""The runner lifecycle as a pure state machine: every (state, event) pair is in one table."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from enum import StrEnum
from typing import Final

__all__ = ["RUNNING", "TABLE", "Effect", "Event", "State", "Transition", "transition"]


class State(StrEnum):
    """Public lifecycle status of a runner."""

    STOPPED = "stopped"
    CONNECTING = "connecting"
    STREAMING = "streaming"
    RECONNECTING = "reconnecting"
    STOPPING = "stopping"


class Event(StrEnum):
    """What can happen to a runner; lifecycle events from stale connections are dropped earlier."""

    START = "start"
    STOP = "stop"
    CONNECTED = "connected"
    CONNECT_FAILED = "connect_failed"
    REFUSED = "refused"  # the server refused the runner for good (bad token, bad id): stop
    WAKE = "wake"
    STREAM_RESET = "stream_reset"  # heartbeats keep failing: drop the stream, even a hung connect
    STREAM_END = "stream_end"  # the server closed the stream cleanly
    STREAM_ERROR = "stream_error"
    BACKOFF_ELAPSED = "backoff_elapsed"
    SHUTDOWN_DONE = "shutdown_done"


class Effect(StrEnum):
    """Side effects the driver performs, in order, after a transition."""

    ABORT_CONNECT = "abort_connect"  # exit connecting: cancel the in-flight connect
    CLOSE_STREAM = "close_stream"  # exit streaming
    CANCEL_BACKOFF = "cancel_backoff"  # exit reconnecting
    OPEN_STREAM = "open_stream"  # enter connecting: register once, open the wake stream
    MARK_CONNECTED = "mark_connected"  # enter streaming: backoff back to its initial delay
    SCHEDULE_RECONNECT = "schedule_reconnect"  # enter reconnecting: count, sleep the backoff
    SHUTDOWN = "shutdown"  # enter stopping: drain, then SHUTDOWN_DONE
    MARK_STOPPED = "mark_stopped"  # enter stopped: wake up stop() callers
    RECORD_ERROR = "record_error"  # the event's error caused this transition
    HANDLE_WAKE = "handle_wake"  # claim (or defer) the wake


RUNNING: Final = frozenset({State.CONNECTING, State.STREAMING, State.RECONNECTING})
"""States in which the runner takes wakes and sends heartbeats."""

_EXIT: Final[Mapping[State, tuple[Effect, ...]]] = {
    State.STOPPED: (),
    State.CONNECTING: (Effect.ABORT_CONNECT,),
    State.STREAMING: (Effect.CLOSE_STREAM,),
    State.RECONNECTING: (Effect.CANCEL_BACKOFF,),
    State.STOPPING: (),
}
_ENTRY: Final[Mapping[State, tuple[Effect, ...]]] = {
    State.STOPPED: (Effect.MARK_STOPPED,),
    State.CONNECTING: (Effect.OPEN_STREAM,),
    State.STREAMING: (Effect.MARK_CONNECTED,),
    State.RECONNECTING: (Effect.SCHEDULE_RECONNECT,),
    State.STOPPING: (Effect.SHUTDOWN,),
}

S, E = State, Event
_ERR: Final = (Effect.RECORD_ERROR,)
_WAKE: Final = (Effect.HANDLE_WAKE,)

TABLE: Final[Mapping[State, Mapping[Event, tuple[State, tuple[Effect, ...]]]]] = {
    S.STOPPED: {
        E.START: (S.CONNECTING, ()),
        E.STOP: (S.STOPPED, ()),
        E.CONNECTED: (S.STOPPED, ()),
        E.CONNECT_FAILED: (S.STOPPED, ()),
        E.REFUSED: (S.STOPPED, ()),
        E.WAKE: (S.STOPPED, ()),
        E.STREAM_RESET: (S.STOPPED, ()),
        E.STREAM_END: (S.STOPPED, ()),
        E.STREAM_ERROR: (S.STOPPED, ()),
        E.BACKOFF_ELAPSED: (S.STOPPED, ()),
        E.SHUTDOWN_DONE: (S.STOPPED, ()),
    },
    S.CONNECTING: {
        E.START: (S.CONNECTING, ()),
        E.STOP: (S.STOPPING, ()),
        E.CONNECTED: (S.STREAMING, ()),
        E.CONNECT_FAILED: (S.RECONNECTING, _ERR),
        E.REFUSED: (S.STOPPING, _ERR),
        E.WAKE: (S.CONNECTING, _WAKE),
        E.STREAM_RESET: (S.RECONNECTING, _ERR),
        E.STREAM_END: (S.CONNECTING, ()),
        E.STREAM_ERROR: (S.CONNECTING, ()),
        E.BACKOFF_ELAPSED: (S.CONNECTING, ()),
        E.SHUTDOWN_DONE: (S.CONNECTING, ()),
    },
    S.STREAMING: {
        E.START: (S.STREAMING, ()),
        E.STOP: (S.STOPPING, ()),
        E.CONNECTED: (S.STREAMING, ()),
        E.CONNECT_FAILED: (S.STREAMING, ()),
        E.REFUSED: (S.STREAMING, ()),
        E.WAKE: (S.STREAMING, _WAKE),
        E.STREAM_RESET: (S.RECONNECTING, _ERR),
        E.STREAM_END: (S.RECONNECTING, ()),
        E.STREAM_ERROR: (S.RECONNECTING, _ERR),
        E.BACKOFF_ELAPSED: (S.STREAMING, ()),
        E.SHUTDOWN_DONE: (S.STREAMING, ()),
    },
    S.RECONNECTING: {
        E.START: (S.RECONNECTING, ()),
        E.STOP: (S.STOPPING, ()),
        E.CONNECTED: (S.RECONNECTING, ()),
        E.CONNECT_FAILED: (S.RECONNECTING, ()),
        E.REFUSED: (S.RECONNECTING, ()),
        E.WAKE: (S.RECONNECTING, _WAKE),
        E.STREAM_RESET: (S.RECONNECTING, ()),  # already resetting: later resets are ignored
        E.STREAM_END: (S.RECONNECTING, ()),
        E.STREAM_ERROR: (S.RECONNECTING, ()),
        E.BACKOFF_ELAPSED: (S.CONNECTING, ()),
        E.SHUTDOWN_DONE: (S.RECONNECTING, ()),
    },
    S.STOPPING: {
        E.START: (S.STOPPING, ()),  # a start during a stop is ignored
        E.STOP: (S.STOPPING, ()),  # concurrent stops share one shutdown
        E.CONNECTED: (S.STOPPING, ()),
        E.CONNECT_FAILED: (S.STOPPING, ()),
        E.REFUSED: (S.STOPPING, ()),
        E.WAKE: (S.STOPPING, ()),  # stop gates late wakes
        E.STREAM_RESET: (S.STOPPING, ()),
        E.STREAM_END: (S.STOPPING, ()),
        E.STREAM_ERROR: (S.STOPPING, ()),
        E.BACKOFF_ELAPSED: (S.STOPPING, ()),
        E.SHUTDOWN_DONE: (S.STOPPED, ()),
    },
}


@dataclass(frozen=True, slots=True)
class Transition:
    """The next state and the effects to run, in order."""

    source: State
    event: Event
    target: State
    effects: tuple[Effect, ...]

    @property
    def changed(self) -> bool:
        """True when the state changes."""
        return self.source is not self.target


def transition(state: State, event: Event) -> Transition:
    """Look up ``(state, event)``: exit effects, event effects, then entry effects."""
    target, event_effects = TABLE[state][event]
    if target is state:
        return Transition(state, event, target, event_effects)
    # connecting -> streaming: the connection that just opened carries on as the stream.
    exit_effects = () if (state, target) == (S.CONNECTING, S.STREAMING) else _EXIT[state]
    return Transition(state, event, target, exit_effects + event_effects + _ENTRY[target])
