"""What the worker's recovery asks Redis about many runner streams at once: one pipelined round
trip per batch of runners instead of a few per runner, the runners queued for a check, and the
marker that tells a Redis that lost (or may have lost) its data."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from redis.exceptions import ResponseError

from pullwake.streams.keys import GROUP
from pullwake.streams.wakes import WakeStreams

__all__ = ["GroupState", "StreamProbe", "StreamState"]

_PIPELINE_COMMANDS = 1_000  # per round trip; a larger batch takes several


@dataclass(frozen=True, slots=True)
class GroupState:
    """The ``pullwake`` group of one stream (``XINFO GROUPS``)."""

    pending: int
    consumers: int
    last_delivered_id: str


@dataclass(frozen=True, slots=True)
class StreamState:
    """One runner stream as the probe found it."""

    exists: bool
    group: GroupState | None
    """None when the stream or its group is missing."""
    present: dict[str, bool] = field(default_factory=dict)
    """For each entry id asked about: whether the stream still holds it."""
    first_entry_id: str | None = None
    """The oldest entry (when asked for)."""
    error: Exception | None = None
    """A reply that was neither (the key holds something else): the rest is unknown."""


class StreamProbe:
    """Batched ``XINFO GROUPS`` / ``XRANGE`` over runner streams, and the recovery keys."""

    def __init__(self, streams: WakeStreams) -> None:
        self.redis = streams.redis
        self.keys = streams.keys

    async def states(
        self, entries: Mapping[str, Iterable[str]], *, first_entry: bool = False
    ) -> dict[str, StreamState]:
        """For each runner of ``entries``: its group, whether each of its entry ids is still in
        the stream and (``first_entry``) its oldest entry; one round trip per
        ``_PIPELINE_COMMANDS`` commands."""
        plan: list[tuple[str, list[str]]] = [(r, list(ids)) for r, ids in entries.items()]
        found: dict[str, StreamState] = {}
        start = 0
        while start < len(plan):
            end, commands = start, 0
            while end < len(plan) and (end == start or commands < _PIPELINE_COMMANDS):
                commands += 1 + len(plan[end][1]) + first_entry
                end += 1
            found.update(await self._states(plan[start:end], first_entry))
            start = end
        return found

    async def _states(
        self, plan: list[tuple[str, list[str]]], first_entry: bool
    ) -> dict[str, StreamState]:
        async with self.redis.pipeline(transaction=False) as pipe:
            for runner_id, ids in plan:
                key = self.keys.runner_wakes(runner_id)
                pipe.xinfo_groups(key)
                for entry_id in ids:
                    pipe.xrange(key, min=entry_id, max=entry_id, count=1)
                if first_entry:
                    pipe.xrange(key, count=1)
            replies: list[Any] = await pipe.execute(raise_on_error=False)
        found: dict[str, StreamState] = {}
        at = 0
        for runner_id, ids in plan:
            groups, entries = replies[at], replies[at + 1 : at + 1 + len(ids)]
            at += 1 + len(ids)
            first: Any = None
            if first_entry:
                first, at = replies[at], at + 1
            found[runner_id] = _state(groups, ids, entries, first)
        return found

    async def create_groups(self, runner_ids: list[str]) -> list[Exception | None]:
        """Create the stream and ``pullwake`` group of each runner where missing (from id 0,
        as ``WakeStreams.ensure_group``), in one round trip; the error of each, if any."""
        if not runner_ids:
            return []
        async with self.redis.pipeline(transaction=False) as pipe:
            for runner_id in runner_ids:
                pipe.xgroup_create(self.keys.runner_wakes(runner_id), GROUP, id="0", mkstream=True)
            replies: list[Any] = await pipe.execute(raise_on_error=False)
        return [
            reply if isinstance(reply, Exception) and "BUSYGROUP" not in str(reply) else None
            for reply in replies
        ]

    # --- runners to check soon, and the marker --------------------------------------------

    async def pop_marked(self, count: int) -> list[str]:
        """Take up to ``count`` runners queued for a check (each is taken by one worker)."""
        taken: Any = await self.redis.spop(self.keys.recovery_check(), count)  # type: ignore[misc]
        return [_text(r) for r in taken or []]

    async def epoch(self) -> tuple[str, str | None]:
        """The Redis server's ``run_id`` now, and the one the marker recorded (None: missing,
        because the keyspace was emptied, or no worker ever finished a check)."""
        info: dict[str, Any] = await self.redis.info("server")
        marker = await self.redis.get(self.keys.recovery_marker())
        return str(info.get("run_id", "")), None if marker is None else _text(marker)

    async def set_epoch(self, value: str) -> None:
        """Record the marker: the ``run_id`` under which every stream was checked (or one being
        checked)."""
        await self.redis.set(self.keys.recovery_marker(), value)


def _state(groups: Any, ids: list[str], entries: list[Any], first: Any) -> StreamState:
    if isinstance(groups, ResponseError) and "no such key" in str(groups).lower():
        return StreamState(exists=False, group=None, present=dict.fromkeys(ids, False))
    for reply in (groups, *entries, first):
        if isinstance(reply, Exception):
            return StreamState(exists=True, group=None, error=reply)
    group = None
    for info in groups:
        if _text(info.get("name")) == GROUP:
            group = GroupState(
                pending=int(info.get("pending", 0)),
                consumers=int(info.get("consumers", 0)),
                last_delivered_id=_text(info.get("last-delivered-id") or "0-0"),
            )
    present = {entry_id: bool(reply) for entry_id, reply in zip(ids, entries, strict=True)}
    first_id = _text(first[0][0]) if first else None
    return StreamState(exists=True, group=group, present=present, first_entry_id=first_id)


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)
