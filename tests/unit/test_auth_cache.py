"""The auth cache on its own: in use only while active, TTL, LRU bound, fills that raced a drop,
and strict mode's wait for the listener (a fake one here; the real one is in
tests/integration/test_auth_cache.py)."""

from __future__ import annotations

from typing import Any

from pullwake.authcache import ALL, AuthCache
from pullwake.config import Settings

MS = 1_000_000


class Clock:
    def __init__(self) -> None:
        self.now = 1_000 * MS

    def __call__(self) -> int:
        return self.now


class FakeListener:
    """Answers ``caught_up`` as told, running ``on_round`` first (a notification arriving)."""

    def __init__(self, answer: bool = True, on_round: Any = None) -> None:
        self.answer = answer
        self.on_round = on_round
        self.asked: list[int] = []

    async def caught_up(self, since: int) -> bool:
        self.asked.append(since)
        if self.on_round is not None:
            self.on_round()
        return self.answer


def _cache(*, strict: bool = False, ttl_ms: int = 5_000, size: int = 100) -> AuthCache:
    cache = AuthCache(ttl_ms=ttl_ms, max_entries=size, strict=strict, clock=Clock())
    cache.activate()
    return cache


def test_settings_defaults_and_off_switch() -> None:
    cache = AuthCache.from_settings(Settings())
    assert (cache.ttl_ns, cache.max_entries, cache.strict) == (5_000 * MS, 10_000, True)
    assert cache.enabled
    assert not AuthCache.from_settings(Settings(auth_cache_ttl_ms=0)).enabled
    assert "listen_database_url='postgresql://u:***@db/x'" in repr(
        Settings(listen_database_url="postgresql://u:pw@db/x")
    )


async def test_nothing_is_kept_or_used_while_inactive() -> None:
    cache = AuthCache(ttl_ms=5_000, max_entries=10, strict=False, clock=Clock())
    assert not cache.put("t:a", 1, cache.generation)
    assert await cache.get("t:a") is None
    cache.activate()
    assert cache.put("t:a", 1, cache.generation)
    assert await cache.get("t:a") == 1
    cache.deactivate()
    assert len(cache) == 0
    assert await cache.get("t:a") is None
    cache.activate()  # back: from empty
    assert await cache.get("t:a") is None


async def test_entries_expire_after_the_ttl() -> None:
    cache = _cache(ttl_ms=5_000)
    clock: Clock = cache.clock  # type: ignore[assignment]
    cache.put("t:a", "alice", cache.generation)
    clock.now += 4_999 * MS
    assert await cache.get("t:a") == "alice"
    clock.now += 1 * MS
    assert await cache.get("t:a") is None
    assert len(cache) == 0


async def test_least_recently_used_entries_go_first() -> None:
    cache = _cache(size=3)
    for key in ("r:1", "r:2", "r:3"):
        cache.put(key, key, cache.generation)
    assert await cache.get("r:1") == "r:1"  # r:2 is now the least recently used
    cache.put("r:4", "r:4", cache.generation)
    assert len(cache) == 3
    assert await cache.get("r:2") is None
    assert [await cache.get(k) for k in ("r:1", "r:3", "r:4")] == ["r:1", "r:3", "r:4"]


async def test_a_fill_that_raced_a_drop_is_not_stored() -> None:
    cache = _cache()
    generation = cache.generation  # a miss reads this, then asks Postgres ...
    cache.drop("t:other")  # ... while a notification arrives (for any key)
    assert not cache.put("t:a", "stale?", generation)
    assert await cache.get("t:a") is None
    assert cache.put("t:a", "fresh", cache.generation)


async def test_drop_one_or_all() -> None:
    cache = _cache()
    for key in ("t:a", "t:b", "r:x"):
        cache.put(key, key, cache.generation)
    cache.drop("t:a")
    assert [await cache.get(k) for k in ("t:a", "t:b", "r:x")] == [None, "t:b", "r:x"]
    cache.drop(ALL)
    assert len(cache) == 0


async def test_strict_hit_waits_for_the_listener_and_rechecks() -> None:
    cache = _cache(strict=True)
    cache.put("t:a", "alice", cache.generation)
    # The round brings the notification that drops the entry: the hit becomes a miss.
    listener = FakeListener(on_round=lambda: cache.drop("t:a"))
    cache.listener = listener  # type: ignore[assignment]
    assert await cache.get("t:a", since=123) is None
    assert listener.asked == [123]

    cache.put("t:a", "alice", cache.generation)
    listener.on_round = None
    assert await cache.get("t:a", since=124) == "alice"
    listener.answer = False  # the listener could not confirm: no hit
    assert await cache.get("t:a", since=125) is None
    cache.listener = None
    assert await cache.get("t:a") is None


async def test_strict_miss_and_non_strict_hit_do_not_wait() -> None:
    strict = _cache(strict=True)
    strict.listener = listener = FakeListener()  # type: ignore[assignment]
    assert await strict.get("t:nope") is None
    assert listener.asked == []

    relaxed = _cache(strict=False)
    relaxed.listener = listener  # type: ignore[assignment]
    relaxed.put("t:a", "alice", relaxed.generation)
    assert await relaxed.get("t:a") == "alice"
    assert listener.asked == []
