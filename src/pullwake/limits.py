"""Limits shared by every API replica, kept in Redis: a per-principal send rate and caps on
live wake-stream (SSE) sessions per runner and per principal.

Both use the Redis server's clock (``TIME`` inside the scripts), so replicas with skewed clocks
agree; on a Redis Cluster, the clock of the node holding the key (each script names one key,
and counting reads the time on that same node). Losing Redis data only resets the counters:
limits are protection, not truth.
"""

from __future__ import annotations

import logging
import math
import secrets
from dataclasses import dataclass
from typing import Any

from redis.exceptions import RedisError

from pullwake.config import Settings
from pullwake.errors import InvalidRequest, RateLimited
from pullwake.model import Principal
from pullwake.streams.client import RedisClient, is_cluster, register_script
from pullwake.streams.keys import Keys
from pullwake.wire import FieldError

__all__ = ["Limits", "SseSlot"]

log = logging.getLogger(__name__)

# Token bucket. KEYS[1]: hash {tokens, ts}. ARGV: rate per second, burst, cost.
# Returns 0 when the cost was taken, else the milliseconds until it could be.
_TAKE_TOKENS = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local rate = tonumber(ARGV[1])
local burst = tonumber(ARGV[2])
local cost = tonumber(ARGV[3])
local state = redis.call('HMGET', KEYS[1], 'tokens', 'ts')
local tokens = tonumber(state[1]) or burst
local ts = tonumber(state[2]) or now
tokens = math.min(burst, tokens + math.max(0, now - ts) * rate / 1000)
local wait_ms = 0
if tokens >= cost then
  tokens = tokens - cost
else
  wait_ms = math.ceil((cost - tokens) * 1000 / rate)
end
redis.call('HSET', KEYS[1], 'tokens', tostring(tokens), 'ts', tostring(now))
redis.call('PEXPIRE', KEYS[1], math.ceil(burst * 1000 / rate) + 1000)
return wait_ms
"""

# Session slots. KEYS[1]: sorted set member -> expiry (ms). ARGV: member, ttl ms, max (0: no
# check, a refresh). Returns 1 when the member holds a slot, 0 when the cap is reached.
_HOLD_SLOT = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local ttl = tonumber(ARGV[2])
local max = tonumber(ARGV[3])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
if max > 0 and redis.call('ZSCORE', KEYS[1], ARGV[1]) == false
    and redis.call('ZCARD', KEYS[1]) >= max then
  return 0
end
redis.call('ZADD', KEYS[1], now + ttl, ARGV[1])
redis.call('PEXPIRE', KEYS[1], ttl)
return 1
"""

# Live sessions in KEYS[1] (score: expiry, ms) on the clock of the node holding it.
_COUNT_LIVE = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
return redis.call('ZCOUNT', KEYS[1], now, '+inf')
"""
# Refresh several members of one slot set. KEYS[1]: sorted set. ARGV: ttl ms, members...
_REFRESH_SLOTS = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local ttl = tonumber(ARGV[1])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
for i = 2, #ARGV do
  redis.call('ZADD', KEYS[1], now + ttl, ARGV[i])
end
redis.call('PEXPIRE', KEYS[1], ttl)
return #ARGV - 1
"""
_REFRESH_CHUNK = 500
# The same for several slot sets at once (one Redis server, not a cluster: the keys live in
# different slots). KEYS: the sets. ARGV: ttl ms, then one member count per key, then the
# members, key by key.
_REFRESH_MANY = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local ttl = tonumber(ARGV[1])
local at = 2 + #KEYS
for k = 1, #KEYS do
  local n = tonumber(ARGV[1 + k])
  redis.call('ZREMRANGEBYSCORE', KEYS[k], '-inf', now)
  for i = at, at + n - 1 do
    redis.call('ZADD', KEYS[k], now + ttl, ARGV[i])
  end
  redis.call('PEXPIRE', KEYS[k], ttl)
  at = at + n
end
return at - 2 - #KEYS
"""
_REFRESH_MANY_MEMBERS = 2_000


def _retry_after_s(wait_ms: int) -> int:
    return max(1, math.ceil(wait_ms / 1000))


@dataclass(slots=True)
class SseSlot:
    """One live wake-stream session's place in its runner's and its principal's counts; refresh
    it, then close it."""

    limits: Limits
    keys: tuple[str, ...]
    member: str

    async def refresh(self) -> None:
        """Push the slot's expiry forward (called at least once per keep-alive interval)."""
        for key in self.keys:
            await self.limits.hold(key, self.member, cap=0)

    async def close(self) -> None:
        """Give the slot back at once (a crashed replica's slots expire instead)."""
        for key in self.keys:
            await self.limits.redis.zrem(key, self.member)


class Limits:
    """Per-principal send rate (token bucket) and SSE sessions per runner and per principal,
    across replicas."""

    def __init__(self, redis: RedisClient, keys: Keys, settings: Settings) -> None:
        self.redis = redis
        self.keys = keys
        self.settings = settings
        self._take: Any = register_script(redis, _TAKE_TOKENS)
        self._hold: Any = register_script(redis, _HOLD_SLOT)
        self._count: Any = register_script(redis, _COUNT_LIVE)
        self._refresh: Any = register_script(redis, _REFRESH_SLOTS)
        self._refresh_many: Any = register_script(redis, _REFRESH_MANY)

    @property
    def sse_ttl_ms(self) -> int:
        """How long a session's slot outlives its last refresh (the wake reader refreshes every
        session's slot about once per keep-alive interval, in batches)."""
        return 3 * max(self.settings.sse_keepalive_ms, self.settings.sse_block_ms)

    async def check_send(self, principal: Principal, messages: int = 1) -> None:
        """Take ``messages`` from the principal's bucket or raise 429 ``RATE_LIMITED``; no
        limit (and no Redis round trip) unless ``PULLWAKE_SEND_RATE_PER_S`` is set."""
        rate, burst = self.settings.send_rate_per_s, self.settings.send_burst_effective
        if rate is None:
            return
        if messages > burst:  # the bucket never holds that many: waiting would not help
            raise InvalidRequest(
                f"{messages} messages at once exceed the send burst of {burst} "
                "(PULLWAKE_SEND_BURST): send smaller batches",
                errors=[
                    FieldError(message="more than the send burst", key="messages", source="body")
                ],
            )
        key = self.keys.principal_send_rate(principal.key)
        try:
            wait_ms = int(await self._take(keys=[key], args=[rate, burst, messages]))
        except (RedisError, OSError) as exc:
            # Fail open: Postgres takes the message and recovery delivers its wake once Redis
            # is back; refusing sends would turn a delivery hiccup into lost input.
            log.warning("send-rate check skipped, Redis unavailable: %s", exc)
            return
        if wait_ms > 0:
            retry_after_s = _retry_after_s(wait_ms)  # the Retry-After header says the same
            raise RateLimited(
                f"{principal.key} sends more than {rate} messages/s (burst {burst}); "
                f"retry in {retry_after_s} s",
                retry_after_s=retry_after_s,
            )

    async def hold(self, key: str, member: str, *, cap: int) -> bool:
        """Add or refresh ``member`` in a slot set, refused when ``cap`` (0: none) is reached."""
        return bool(await self._hold(keys=[key], args=[member, self.sse_ttl_ms, cap]))

    async def refresh_slots(self, slots: list[SseSlot]) -> None:
        """:meth:`SseSlot.refresh` for many sessions. On one Redis server: a script call per
        couple of thousand members, each naming every slot set it touches (a runner's own set
        and its principal's: refreshing a set per call cost a round of Python packing and
        parsing per runner, most of an idle fleet's CPU). On a cluster: a call per slot set
        (each a single key), since the sets live in different slots."""
        members: dict[str, list[str]] = {}
        for slot in slots:
            for key in slot.keys:
                members.setdefault(key, []).append(slot.member)
        if not members:
            return
        if is_cluster(self.redis):
            # A cluster pipeline sends EVALSHA without loading the script on the node first.
            for key, group in members.items():
                for start in range(0, len(group), _REFRESH_CHUNK):
                    chunk = group[start : start + _REFRESH_CHUNK]
                    await self._refresh(keys=[key], args=[self.sse_ttl_ms, *chunk])
            return
        keys: list[str] = []
        counts: list[int] = []
        names: list[str] = []
        for key, group in members.items():
            for start in range(0, len(group), _REFRESH_MANY_MEMBERS):
                chunk = group[start : start + _REFRESH_MANY_MEMBERS]
                if names and len(names) + len(chunk) > _REFRESH_MANY_MEMBERS:
                    await self._refresh_many(keys=keys, args=[self.sse_ttl_ms, *counts, *names])
                    keys, counts, names = [], [], []
                keys.append(key)
                counts.append(len(chunk))
                names += chunk
        await self._refresh_many(keys=keys, args=[self.sse_ttl_ms, *counts, *names])

    async def open_sse(self, runner_id: str, session: str, principal: Principal) -> SseSlot:
        """A slot for a new wake-stream session, or 429 ``RATE_LIMITED`` when the runner or the
        principal has its most open streams."""
        s = self.settings
        # One member per connection (not per session name): a reconnect that overlaps its
        # half-dead predecessor must not free the new connection's slot when the old one ends.
        member = f"{runner_id}:{session}:{secrets.token_hex(4)}"
        principal_key = self.keys.principal_sse_sessions(principal.key)
        if not await self.hold(principal_key, member, cap=s.max_sse_per_principal):
            raise RateLimited(
                f"{principal.key} already has {s.max_sse_per_principal} open wake streams "
                "(PULLWAKE_MAX_SSE_PER_PRINCIPAL)",
                retry_after_s=_retry_after_s(s.sse_keepalive_ms),
            )
        # Two calls rather than one script over both keys: they live in different cluster slots.
        runner_key = self.keys.runner_sse_sessions(runner_id)
        if not await self.hold(runner_key, member, cap=s.max_sse_per_runner):
            await self.redis.zrem(principal_key, member)
            raise RateLimited(
                f"runner {runner_id!r} already has {s.max_sse_per_runner} open wake streams "
                "(PULLWAKE_MAX_SSE_PER_RUNNER)",
                retry_after_s=_retry_after_s(s.sse_keepalive_ms),
            )
        return SseSlot(self, (runner_key, principal_key), member)

    async def sse_sessions(self, runner_id: str) -> int:
        """How many live sessions hold a slot (expired ones are not counted)."""
        key = self.keys.runner_sse_sessions(runner_id)
        # TIME inside the script: a cluster client would ask some other node's clock.
        return int(await self._count(keys=[key]))
