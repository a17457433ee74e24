"""The runner's health snapshot (also its heartbeat diagnostics) and the marks behind it."""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass

import msgspec

from pullwake.runner.clock import iso
from pullwake.text import clean_text

__all__ = ["Counters", "Marks", "RunnerHealth", "sanitize", "snapshot"]

_TOKEN = re.compile(r"pw[kc]_[A-Za-z0-9_\-]+")


def sanitize(text: str, limit: int = 300) -> str:
    """Error text safe to send (diagnostics, release errors): tokens masked, length bounded,
    text Postgres cannot store (NUL, lone surrogates) replaced."""
    return clean_text(_TOKEN.sub(lambda m: m.group(0)[:4] + "***", text)[:limit])


@dataclass(slots=True)
class Counters:
    """Monotonic counters reported in health and heartbeat diagnostics."""

    events_received: int = 0
    wakes_deferred: int = 0
    claims_succeeded: int = 0
    claims_skipped: int = 0
    claims_failed: int = 0
    claims_lost: int = 0
    handler_errors: int = 0
    dones_sent: int = 0
    done_retries: int = 0
    releases_sent: int = 0
    entities_parked: int = 0  # claims this process ended that got their entity parked


@dataclass(slots=True)
class Marks:
    """When things last happened (wall-clock seconds), for health and diagnostics."""

    started_at: float | None = None
    connected_since: float | None = None
    reconnect_count: int = 0
    last_error: str | None = None
    last_error_at: float | None = None
    last_heartbeat_at: float | None = None
    last_heartbeat_ok: bool | None = None
    last_claim_at: float | None = None
    last_claim_result: str | None = None
    last_dispatch_at: float | None = None


class RunnerHealth(msgspec.Struct, frozen=True, kw_only=True):
    """A snapshot of the runner (also sent, as is, as heartbeat diagnostics)."""

    running: bool
    status: str
    session: str
    started_at: str | None
    stream_connected: bool
    stream_connected_since: str | None
    reconnect_count: int
    last_error: str | None
    last_error_at: str | None
    last_heartbeat_at: str | None
    last_heartbeat_ok: bool | None
    last_claim_at: str | None
    last_claim_result: str | None
    last_dispatch_at: str | None
    in_flight: int
    waiting_wakes: int
    concurrency: int
    events_received: int
    wakes_deferred: int
    claims_succeeded: int
    claims_skipped: int
    claims_failed: int
    claims_lost: int
    handler_errors: int
    dones_sent: int
    done_retries: int
    releases_sent: int
    entities_parked: int


def snapshot(
    marks: Marks,
    counters: Counters,
    *,
    status: str,
    running: bool,
    streaming: bool,
    session: str,
    in_flight: int,
    waiting_wakes: int,
    concurrency: int,
) -> RunnerHealth:
    """Build the health struct from the runner's marks and counters."""
    return RunnerHealth(
        running=running,
        status=status,
        session=session,
        started_at=iso(marks.started_at),
        stream_connected=streaming,
        stream_connected_since=iso(marks.connected_since),
        reconnect_count=marks.reconnect_count,
        last_error=marks.last_error,
        last_error_at=iso(marks.last_error_at),
        last_heartbeat_at=iso(marks.last_heartbeat_at),
        last_heartbeat_ok=marks.last_heartbeat_ok,
        last_claim_at=iso(marks.last_claim_at),
        last_claim_result=marks.last_claim_result,
        last_dispatch_at=iso(marks.last_dispatch_at),
        in_flight=in_flight,
        waiting_wakes=waiting_wakes,
        concurrency=concurrency,
        **asdict(counters),
    )
