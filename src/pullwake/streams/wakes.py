"""Runner wake streams: XADD, XREADGROUP, XACK and introspection."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

from redis.asyncio.cluster import RedisCluster
from redis.exceptions import RedisError, ResponseError

from pullwake.streams.client import RedisClient, is_cluster, publish, register_script
from pullwake.streams.keys import GROUP, Keys
from pullwake.wire import WakeEntry

__all__ = ["StreamInfo", "WakeStreams"]

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class StreamInfo:
    """What ``XINFO``/``XPENDING`` say about one runner stream."""

    length: int
    pending: int
    consumers: int
    last_delivered_id: str | None


# DELCONSUMER destroys a consumer's pending entries, so check "nothing pending" in the same
# atomic step: a wake delivered to it between our XINFO and the delete would become a ghost.
_DELETE_IF_IDLE = """
local consumers = redis.call('XINFO', 'CONSUMERS', KEYS[1], ARGV[1])
for _, c in ipairs(consumers) do
  local f = {}
  for i = 1, #c, 2 do f[c[i]] = c[i + 1] end
  if f['name'] == ARGV[2] then
    if tonumber(f['pending']) == 0 and tonumber(f['idle']) >= tonumber(ARGV[3]) then
      return redis.call('XGROUP', 'DELCONSUMER', KEYS[1], ARGV[1], ARGV[2]) + 1
    end
    return 0
  end
end
return 0
"""


def _entry_fields(entry: WakeEntry) -> dict[str, str]:
    return {
        "v": "1",
        "wake_id": entry.wake_id,
        "entity": entry.entity,
        "epoch": str(entry.epoch),
        "reason": entry.reason,
        "created_at": entry.created_at,
    }


def _parse_entry(fields: dict[str, str]) -> WakeEntry | None:
    try:
        return WakeEntry(
            wake_id=fields["wake_id"],
            entity=fields["entity"],
            epoch=int(fields["epoch"]),
            reason=fields.get("reason", ""),
            created_at=fields.get("created_at", ""),
        )
    except (KeyError, ValueError):
        return None


class WakeStreams:
    """Adapter over one Redis client for the per-runner wake streams.

    Cluster-safe: every command and script names one runner's stream only, and the pipelines
    are non-transactional (``publish_many`` spans runners, hence slots: redis-py's cluster
    pipeline sends each node its share)."""

    def __init__(self, redis: RedisClient, keys: Keys, *, maxlen: int = 10_000) -> None:
        self.redis = redis
        self.keys = keys
        self.maxlen = maxlen
        self._delete_script: Any = None

    async def publish(self, runner_id: str, entry: WakeEntry) -> str:
        """XADD the wake (approximate MAXLEN trim) and announce it on the notify channel, in
        one round trip; return the entry id."""
        (result,) = await self.publish_many([(runner_id, entry)])
        if isinstance(result, Exception):
            raise result
        return result

    async def publish_many(self, entries: list[tuple[str, WakeEntry]]) -> list[str | Exception]:
        """XADD several wakes ``(runner_id, entry)`` in one pipeline (one round trip), then
        PUBLISH each runner id once on :meth:`~Keys.wake_notify` (what wakes the readers of
        the API processes); an entry id, or the error of that XADD, per wake.

        A lost notification delays a wake, never loses it: every reader also polls its
        sessions' streams (:mod:`pullwake.streams.reader`)."""
        async with self.redis.pipeline(transaction=False) as pipe:
            for runner_id, entry in entries:
                fields: dict[Any, Any] = _entry_fields(entry)
                pipe.xadd(
                    self.keys.runner_wakes(runner_id), fields, maxlen=self.maxlen, approximate=True
                )
            runners = list(dict.fromkeys(runner_id for runner_id, _ in entries))
            channel = self.keys.wake_notify()
            cluster = is_cluster(self.redis)
            if not cluster:
                for runner_id in runners:
                    pipe.execute_command("PUBLISH", channel, runner_id)
            results: list[Any] = await pipe.execute(raise_on_error=False)
        if cluster:
            # redis-py 5's cluster pipeline has no PUBLISH: one call each, on any node (a
            # classic PUBLISH reaches the subscribers of every node).
            results += await asyncio.gather(
                *(publish(self.redis, channel, runner_id) for runner_id in runners),
                return_exceptions=True,
            )
        failed = [r for r in results[len(entries) :] if isinstance(r, Exception)]
        if failed:
            log.warning("wake notification failed (the readers' poll delivers): %s", failed[0])
        return results[: len(entries)]

    async def ensure_group(self, runner_id: str, *, note: bool = True) -> None:
        """Create the stream and group if missing; from id 0 so nothing added earlier is skipped.

        ``note`` (a session connects, a reader found the group gone) also queues the runner for
        the worker's next stream check (``Keys.recovery_check``)."""
        try:
            await self.redis.xgroup_create(
                self.keys.runner_wakes(runner_id), GROUP, id="0", mkstream=True
            )
        except ResponseError as exc:
            if "BUSYGROUP" not in str(exc):
                raise
        if note:
            await self.redis.sadd(self.keys.recovery_check(), runner_id)  # type: ignore[misc]

    async def ensure_groups(self, runner_ids: list[str]) -> None:
        """:meth:`ensure_group` for several runners in one pipeline."""
        if not runner_ids:
            return
        async with self.redis.pipeline(transaction=False) as pipe:
            for runner_id in runner_ids:
                pipe.xgroup_create(self.keys.runner_wakes(runner_id), GROUP, id="0", mkstream=True)
            results: list[Any] = await pipe.execute(raise_on_error=False)
        for result in results:
            if isinstance(result, Exception) and "BUSYGROUP" not in str(result):
                raise result

    async def read(
        self,
        runner_id: str,
        consumer: str,
        *,
        own_pending: bool,
        count: int,
        block_ms: int | None,
        after: str = "0",
    ) -> list[tuple[str, WakeEntry]]:
        """XREADGROUP as ``consumer``: its own pending entries after ``after``, or new ones."""
        key = self.keys.runner_wakes(runner_id)
        start = after if own_pending else ">"
        try:
            reply = await self.redis.xreadgroup(
                GROUP,
                consumer,
                {key: start},
                count=count,
                block=None if own_pending else block_ms,
            )
        except ResponseError as exc:
            if "NOGROUP" not in str(exc):
                raise
            # The stream or group vanished (FLUSHALL, restart without persistence): recreate.
            log.warning("wake stream %s had no group; recreating", key)
            await self.ensure_group(runner_id)
            return []
        return await self._entries(runner_id, reply)

    async def read_new_many(
        self, reads: list[tuple[str, str, int]], *, _again: bool = False
    ) -> list[list[tuple[str, WakeEntry]] | Exception]:
        """For each ``(runner_id, consumer, count)``: XREADGROUP of up to ``count`` new entries
        as ``consumer``, without blocking; all in one pipeline of single-key commands. The
        entries, or the error of that read, per read; a missing group is recreated (its read
        gets nothing)."""
        if not reads:
            return []
        async with self.redis.pipeline(transaction=False) as pipe:
            for runner_id, consumer, count in reads:
                pipe.xreadgroup(
                    GROUP, consumer, {self.keys.runner_wakes(runner_id): ">"}, count=count
                )
            replies: list[Any] = await pipe.execute(raise_on_error=False)
        out: list[list[tuple[str, WakeEntry]] | Exception] = []
        lost: list[str] = []
        for (runner_id, _consumer, _count), reply in zip(reads, replies, strict=True):
            if isinstance(reply, ResponseError) and "NOGROUP" in str(reply):
                lost.append(runner_id)
                out.append([])
            elif isinstance(reply, Exception):
                out.append(reply)
            else:
                out.append(await self._entries(runner_id, reply))
        if lost:
            log.warning("%d wake streams had no group (Redis lost data?); recreating", len(lost))
            await self.ensure_groups(list(dict.fromkeys(lost)))
            if not _again:  # read once more: entries XADDed before the group was made count
                again = [i for i, r in enumerate(reads) if r[0] in lost]
                replies = await self.read_new_many([reads[i] for i in again], _again=True)
                for i, reply in zip(again, replies, strict=True):
                    out[i] = reply
        return out

    async def _entries(self, runner_id: str, reply: Any) -> list[tuple[str, WakeEntry]]:
        """The entries of an XREADGROUP reply; trimmed-away and malformed ones are acked."""
        out: list[tuple[str, WakeEntry]] = []
        for _stream, entries in reply or []:
            for entry_id, fields in entries:
                if not fields:  # pending entry whose data was trimmed away
                    await self.ack(runner_id, [entry_id])
                    continue
                parsed = _parse_entry(fields)
                if parsed is None:
                    log.warning(
                        "dropping malformed wake entry %s on %s",
                        entry_id,
                        self.keys.runner_wakes(runner_id),
                    )
                    await self.ack(runner_id, [entry_id])
                    continue
                out.append((entry_id, parsed))
        return out

    async def ack(self, runner_id: str, entry_ids: list[str]) -> int:
        """XACK entries in the runner's group."""
        if not entry_ids:
            return 0
        acked: int = await self.redis.xack(self.keys.runner_wakes(runner_id), GROUP, *entry_ids)
        return acked

    async def info(self, runner_id: str) -> StreamInfo:
        """Length, pending count and consumers of a runner stream (zeros when absent)."""
        key = self.keys.runner_wakes(runner_id)
        length = int(await self.redis.xlen(key))
        try:
            groups: list[dict[str, Any]] = await self.redis.xinfo_groups(key)
        except ResponseError:
            groups = []
        for group in groups:
            if group.get("name") == GROUP:
                return StreamInfo(
                    length=length,
                    pending=int(group.get("pending", 0)),
                    consumers=int(group.get("consumers", 0)),
                    last_delivered_id=group.get("last-delivered-id"),
                )
        return StreamInfo(length=length, pending=0, consumers=0, last_delivered_id=None)

    async def group_exists(self, runner_id: str) -> bool:
        """False when the stream or its ``pullwake`` group is missing (Redis lost data)."""
        try:
            groups: list[dict[str, Any]] = await self.redis.xinfo_groups(
                self.keys.runner_wakes(runner_id)
            )
        except ResponseError as exc:
            if "no such key" in str(exc).lower():
                return False
            raise
        return any(group.get("name") == GROUP for group in groups)

    async def last_delivered_id(self, runner_id: str) -> str | None:
        """The group's last-delivered id (None when the stream or group is missing)."""
        try:
            groups: list[dict[str, Any]] = await self.redis.xinfo_groups(
                self.keys.runner_wakes(runner_id)
            )
        except ResponseError:
            return None
        for group in groups:
            if group.get("name") == GROUP:
                return str(group.get("last-delivered-id") or "0-0")
        return None

    async def entries_exist(self, runner_id: str, entry_ids: list[str]) -> list[bool]:
        """For each entry id, whether the runner stream still holds it (one round trip)."""
        if not entry_ids:
            return []
        key = self.keys.runner_wakes(runner_id)
        async with self.redis.pipeline(transaction=False) as pipe:
            for entry_id in entry_ids:
                pipe.xrange(key, min=entry_id, max=entry_id, count=1)
            replies: list[Any] = await pipe.execute()
        return [bool(reply) for reply in replies]

    async def autoclaim(
        self, runner_id: str, consumer: str, min_idle_ms: int, *, count: int = 100
    ) -> AsyncIterator[tuple[str, str | None]]:
        """XAUTOCLAIM entries idle for ``min_idle_ms``, following the cursor to the end.

        Yields ``(entry_id, wake_id)``; ``wake_id`` is None for entries trimmed away.
        """
        key = self.keys.runner_wakes(runner_id)
        cursor = "0-0"
        while True:
            reply = await self.redis.xautoclaim(
                key, GROUP, consumer, min_idle_ms, start_id=cursor, count=count
            )
            cursor, entries = reply[0], reply[1]
            for entry_id, fields in entries:
                yield entry_id, (fields or {}).get("wake_id")
            if cursor in ("0-0", b"0-0"):
                return

    async def delete_idle_consumers(self, runner_id: str, idle_ms: int) -> int:
        """Delete consumers idle ≥ ``idle_ms`` whose pending list is empty (atomically checked,
        so an entry delivered meanwhile is never orphaned by DELCONSUMER)."""
        key = self.keys.runner_wakes(runner_id)
        try:
            consumers: list[dict[str, Any]] = await self.redis.xinfo_consumers(key, GROUP)
        except ResponseError:
            return 0
        deleted = 0
        for consumer in consumers:
            if int(consumer.get("pending", 0)) == 0 and int(consumer.get("idle", 0)) >= idle_ms:
                deleted += int(
                    await self._delete_if_idle(keys=[key], args=[GROUP, consumer["name"], idle_ms])
                )
        return deleted

    async def drop_consumer_if_empty(self, runner_id: str, consumer: str) -> bool:
        """Delete ``consumer`` if it exists with an empty pending list (checked atomically)."""
        key = self.keys.runner_wakes(runner_id)
        return bool(await self._delete_if_idle(keys=[key], args=[GROUP, consumer, 0]))

    async def trim_acked(self, runner_id: str, keep_after_ms: int) -> int:
        """XTRIM MINID below the oldest entry still needed: pending, undelivered, or younger
        than ``keep_after_ms`` (kept for inspection). Never drops a pending entry."""
        key = self.keys.runner_wakes(runner_id)
        try:
            groups: list[dict[str, Any]] = await self.redis.xinfo_groups(key)
        except ResponseError:
            return 0
        floor = keep_after_ms
        for group in groups:
            last = str(group.get("last-delivered-id") or "0-0")
            # Not ``+ 1``: an entry XADDed in the same millisecond after the last read is
            # undelivered, and MINID <ms>-0 keeps it.
            floor = min(floor, int(last.split("-")[0]))
            if int(group.get("pending", 0)):
                summary = await self.redis.xpending(key, group["name"])
                oldest = str(summary.get("min") or last)
                floor = min(floor, int(oldest.split("-")[0]))
        if floor <= 0:
            return 0
        trimmed: int = await self.redis.xtrim(key, minid=f"{floor}-0", approximate=False)
        return trimmed

    @property
    def _delete_if_idle(self) -> Any:
        if self._delete_script is None:
            self._delete_script = register_script(self.redis, _DELETE_IF_IDLE)
        return self._delete_script

    async def delete(self, runner_id: str) -> None:
        """Drop a runner's stream (after the runner was deleted)."""
        await self.redis.delete(self.keys.runner_wakes(runner_id))

    async def ping(self) -> bool:
        """True when Redis answers PING: on a cluster, every primary (a plain PING goes to one
        node, and a primary that is down makes its runners' streams unreachable)."""
        try:
            if isinstance(self.redis, RedisCluster):
                return bool(await self.redis.ping(target_nodes=RedisCluster.PRIMARIES))
            return bool(await self.redis.ping())
        except (RedisError, OSError):
            return False
