"""The runner client: pull wakes over SSE, claim them, run a handler, ack with done."""

from pullwake.runner.execute import exec_handler
from pullwake.runner.health import RunnerHealth
from pullwake.runner.machine import State
from pullwake.runner.runner import Runner
from pullwake.runner.transport import ApiError, Refused
from pullwake.runner.wake import ClaimLost, Handler, Release, Wake

__all__ = [
    "ApiError",
    "ClaimLost",
    "Handler",
    "Refused",
    "Release",
    "Runner",
    "RunnerHealth",
    "State",
    "Wake",
    "exec_handler",
]
