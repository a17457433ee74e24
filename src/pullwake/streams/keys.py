"""The one place Redis key names are built."""

from __future__ import annotations

from dataclasses import dataclass
from urllib.parse import quote

__all__ = ["GROUP", "Keys"]

GROUP = "pullwake"
"""Consumer group every runner stream is read through."""


@dataclass(frozen=True, slots=True)
class Keys:
    """Redis key builder; ``prefix`` isolates deployments (and test runs) sharing one Redis."""

    prefix: str = "pullwake"

    def runner_wakes(self, runner_id: str) -> str:
        """``pullwake:{runner:<id>}:wakes``: the hash tag keeps a runner's keys in one slot."""
        return f"{self.prefix}:{{runner:{runner_id}}}:wakes"

    def runner_sse_sessions(self, runner_id: str) -> str:
        """``pullwake:{runner:<id>}:sse``: live wake-stream sessions (sorted set, score: expiry)."""
        return f"{self.prefix}:{{runner:{runner_id}}}:sse"

    def wake_notify(self) -> str:
        """``pullwake:wake-notify``: the pub/sub channel every XADD of a wake is announced on
        (the message is the runner id); each API process's wake reader subscribes to it."""
        return f"{self.prefix}:wake-notify"

    def principal_send_rate(self, principal: str) -> str:
        """``pullwake:{principal:<kind:id>}:send-rate``: the principal's send token bucket."""
        return f"{self.prefix}:{{principal:{_tag(principal)}}}:send-rate"

    def principal_sse_sessions(self, principal: str) -> str:
        """``pullwake:{principal:<kind:id>}:sse``: the principal's live wake-stream sessions."""
        return f"{self.prefix}:{{principal:{_tag(principal)}}}:sse"

    def recovery_check(self) -> str:
        """``pullwake:recovery:check``: runners whose stream the worker should check soon (a
        set: a session connected, or a reader found the group gone)."""
        return f"{self.prefix}:recovery:check"

    def recovery_marker(self) -> str:
        """``pullwake:recovery:marker``: the Redis ``run_id`` under which the worker last
        checked every stream; missing or different once Redis lost or may have lost data."""
        return f"{self.prefix}:recovery:marker"

    def runner_id_of(self, key: str) -> str | None:
        """Inverse of :meth:`runner_wakes` (None for other keys)."""
        head = f"{self.prefix}:{{runner:"
        if key.startswith(head) and key.endswith("}:wakes"):
            return key[len(head) : -len("}:wakes")]
        return None

    def pattern(self) -> str:
        """SCAN pattern matching every runner wake stream."""
        return f"{self.prefix}:{{runner:*}}:wakes"


def _tag(principal: str) -> str:
    # Principal ids may hold '{' or '}', which would move the hash tag: escape them.
    return quote(principal, safe=":@.+-_")
