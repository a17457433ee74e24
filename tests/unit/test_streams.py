"""Redis key builder and the wake stream adapter (fakeredis; no real Redis)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import fakeredis
import pytest
from redis.exceptions import ResponseError

from pullwake.core.steps import NewWake
from pullwake.publish import wake_entry
from pullwake.streams import GROUP, Keys, StreamInfo, WakeStreams
from pullwake.streams.wakes import _entry_fields, _parse_entry
from pullwake.wire import WakeEntry, json_encoder

# --- keys ----------------------------------------------------------------------------------


def test_group_name() -> None:
    assert GROUP == "pullwake"


def test_runner_wakes_key_uses_a_hash_tag() -> None:
    assert Keys().runner_wakes("r1") == "pullwake:{runner:r1}:wakes"
    assert Keys("pwtest").runner_wakes("laptop.home-1") == "pwtest:{runner:laptop.home-1}:wakes"


def _hash_tag(key: str) -> str:
    """The part Redis Cluster hashes: between the first '{' and the next '}'."""
    start = key.index("{")
    return key[start + 1 : key.index("}", start + 1)]


@pytest.mark.parametrize("runner_id", ["r1", "A.b_c-d", "x" * 128])
def test_key_round_trip(runner_id: str) -> None:
    keys = Keys("pfx")
    key = keys.runner_wakes(runner_id)
    assert keys.runner_id_of(key) == runner_id
    assert _hash_tag(key) == f"runner:{runner_id}"


@pytest.mark.parametrize(
    "key",
    [
        "pfx:{runner:r1}:other",
        "other:{runner:r1}:wakes",
        "pfxx:{runner:r1}:wakes",
        "pfx:runner:r1:wakes",
        "pfx",
        "",
    ],
)
def test_runner_id_of_rejects_other_keys(key: str) -> None:
    assert Keys("pfx").runner_id_of(key) is None


def test_pattern_matches_built_keys() -> None:
    import fnmatch

    keys = Keys("pfx")
    pattern = keys.pattern()
    assert pattern == "pfx:{runner:*}:wakes"
    # Redis glob and fnmatch agree here (no [ ] ? in the ids)
    assert fnmatch.fnmatchcase(keys.runner_wakes("r-9"), pattern)
    assert not fnmatch.fnmatchcase(Keys("other").runner_wakes("r-9"), pattern)


# --- entry encoding ------------------------------------------------------------------------

ENTRY = WakeEntry(
    wake_id="wk_0192aabbccdd0011223344556677",
    entity="/task/t-1",
    epoch=7,
    reason="message",
    created_at="2026-01-02T03:04:05.123456Z",
)


def test_entry_fields_are_flat_strings() -> None:
    fields = _entry_fields(ENTRY)
    assert fields == {
        "v": "1",
        "wake_id": ENTRY.wake_id,
        "entity": "/task/t-1",
        "epoch": "7",
        "reason": "message",
        "created_at": "2026-01-02T03:04:05.123456Z",
    }
    assert all(isinstance(v, str) for v in fields.values())


def test_entry_round_trip() -> None:
    assert _parse_entry(_entry_fields(ENTRY)) == ENTRY


def test_parse_tolerates_missing_optional_fields() -> None:
    parsed = _parse_entry({"wake_id": "wk_1", "entity": "/a/b", "epoch": "3"})
    assert parsed == WakeEntry("wk_1", "/a/b", 3, "", "")


@pytest.mark.parametrize(
    "fields",
    [
        {},
        {"entity": "/a/b", "epoch": "1"},
        {"wake_id": "wk_1", "epoch": "1"},
        {"wake_id": "wk_1", "entity": "/a/b"},
        {"wake_id": "wk_1", "entity": "/a/b", "epoch": "one"},
    ],
)
def test_parse_rejects_malformed_entries(fields: dict[str, str]) -> None:
    assert _parse_entry(fields) is None


def test_sse_data_has_epoch_as_number() -> None:
    import json

    data = json.loads(json_encoder.encode(ENTRY))
    assert data == {
        "wake_id": ENTRY.wake_id,
        "entity": "/task/t-1",
        "epoch": 7,
        "reason": "message",
        "created_at": "2026-01-02T03:04:05.123456Z",
    }


def test_wake_entry_from_new_wake_uses_utc_z() -> None:
    from datetime import UTC, datetime

    wake = NewWake(
        "wk_1", "/a/b", 2, "follow_up", datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC), "r1", "runner"
    )
    entry = wake_entry(wake)
    assert entry == WakeEntry("wk_1", "/a/b", 2, "follow_up", "2026-01-02T03:04:05Z")


# --- WakeStreams on fakeredis ----------------------------------------------------------------


@pytest.fixture
async def fake() -> AsyncIterator[Any]:
    client = fakeredis.FakeAsyncRedis(decode_responses=True)
    yield client
    await client.aclose()


@pytest.fixture
def streams(fake: Any) -> WakeStreams:
    return WakeStreams(fake, Keys("pwunit"), maxlen=1_000)


KEY = "pwunit:{runner:r1}:wakes"


def _entry(n: int) -> WakeEntry:
    return WakeEntry(f"wk_{n}", f"/task/{n}", n, "message", "2026-01-01T00:00:00Z")


async def test_info_of_missing_stream_is_zero(streams: WakeStreams) -> None:
    assert await streams.info("r1") == StreamInfo(0, 0, 0, None)


async def test_ensure_group_creates_stream_and_is_idempotent(
    streams: WakeStreams, fake: Any
) -> None:
    await streams.ensure_group("r1")
    await streams.ensure_group("r1")
    assert await fake.exists(KEY) == 1
    groups = await fake.xinfo_groups(KEY)
    assert [g["name"] for g in groups] == [GROUP]
    info = await streams.info("r1")
    assert (info.length, info.pending, info.consumers) == (0, 0, 0)


async def test_ensure_group_reads_entries_added_before_it(streams: WakeStreams) -> None:
    """The group starts at id 0: a wake published before any runner connected is not lost."""
    entry_id = await streams.publish("r1", _entry(1))
    await streams.ensure_group("r1")
    got = await streams.read("r1", "s1", own_pending=False, count=10, block_ms=None)
    assert got == [(entry_id, _entry(1))]


async def test_publish_writes_flat_fields(streams: WakeStreams, fake: Any) -> None:
    entry_id = await streams.publish("r1", ENTRY)
    assert await fake.xrange(KEY) == [(entry_id, _entry_fields(ENTRY))]


async def test_read_ack_cycle(streams: WakeStreams, fake: Any) -> None:
    await streams.ensure_group("r1")
    ids = [await streams.publish("r1", _entry(n)) for n in (1, 2, 3)]

    # new entries, delivered to session s1 and now pending for it
    got = await streams.read("r1", "s1", own_pending=False, count=2, block_ms=None)
    assert got == [(ids[0], _entry(1)), (ids[1], _entry(2))]
    info = await streams.info("r1")
    assert (info.length, info.pending, info.consumers) == (3, 2, 1)
    assert info.last_delivered_id == ids[1]

    # a reconnect of the same session sees its own pending entries again
    again = await streams.read("r1", "s1", own_pending=True, count=10, block_ms=None)
    assert [entry_id for entry_id, _ in again] == ids[:2]
    # another session does not see them, but gets the next new entry
    assert await streams.read("r1", "s2", own_pending=True, count=10, block_ms=None) == []
    got2 = await streams.read("r1", "s2", own_pending=False, count=10, block_ms=None)
    assert got2 == [(ids[2], _entry(3))]

    assert await streams.ack("r1", [ids[0], ids[2]]) == 2
    assert await streams.ack("r1", [ids[0]]) == 0  # already acked
    assert await streams.ack("r1", []) == 0
    info = await streams.info("r1")
    assert (info.pending, info.consumers) == (1, 2)
    pending = await fake.xpending_range(KEY, GROUP, min="-", max="+", count=10)
    assert [(p["message_id"], p["consumer"]) for p in pending] == [(ids[1], "s1")]

    assert await streams.ack("r1", [ids[1]]) == 1
    assert (await streams.info("r1")).pending == 0
    assert await streams.read("r1", "s1", own_pending=True, count=10, block_ms=None) == []
    assert await streams.read("r1", "s1", own_pending=False, count=10, block_ms=None) == []


async def test_malformed_entry_is_dropped_and_acked(
    streams: WakeStreams, fake: Any, caplog: pytest.LogCaptureFixture
) -> None:
    await streams.ensure_group("r1")
    bad = await fake.xadd(KEY, {"v": "1", "junk": "x"})
    good = await streams.publish("r1", _entry(2))
    got = await streams.read("r1", "s1", own_pending=False, count=10, block_ms=None)
    assert got == [(good, _entry(2))]
    pending = await fake.xpending_range(KEY, GROUP, min="-", max="+", count=10)
    assert [p["message_id"] for p in pending] == [good]
    assert bad in caplog.text


async def test_trimmed_pending_entry_is_acked_not_forwarded(
    streams: WakeStreams, fake: Any
) -> None:
    await streams.ensure_group("r1")
    entry_id = await streams.publish("r1", _entry(1))
    await streams.read("r1", "s1", own_pending=False, count=10, block_ms=None)
    await fake.xdel(KEY, entry_id)  # as MAXLEN trimming would
    assert await streams.read("r1", "s1", own_pending=True, count=10, block_ms=None) == []
    assert (await streams.info("r1")).pending == 0


async def test_publish_trims_approximately(fake: Any) -> None:
    small = WakeStreams(fake, Keys("pwunit"), maxlen=10)
    for n in range(300):
        await small.publish("r1", _entry(n))
    length = await fake.xlen(KEY)
    assert length < 300


async def test_streams_are_per_runner_and_per_prefix(fake: Any) -> None:
    a = WakeStreams(fake, Keys("pa"))
    b = WakeStreams(fake, Keys("pb"))
    await a.publish("r1", _entry(1))
    await a.publish("r2", _entry(2))
    assert (await a.info("r1")).length == 1
    assert (await a.info("r2")).length == 1
    assert (await b.info("r1")).length == 0


async def test_delete_and_ping(streams: WakeStreams, fake: Any) -> None:
    await streams.publish("r1", _entry(1))
    await streams.delete("r1")
    assert await fake.exists(KEY) == 0
    assert await streams.ping() is True


class _NoGroupRedis:
    """Answers XREADGROUP like a real Redis whose stream vanished (FLUSHALL, restart)."""

    def __init__(self) -> None:
        self.created: list[tuple[str, str]] = []
        self.queued: list[tuple[str, str]] = []

    async def xreadgroup(self, *args: Any, **kwargs: Any) -> Any:
        raise ResponseError("NOGROUP No such key 'k' or consumer group 'pullwake' in XREADGROUP")

    async def xgroup_create(self, key: str, group: str, **kwargs: Any) -> None:
        assert kwargs == {"id": "0", "mkstream": True}
        self.created.append((key, group))

    async def sadd(self, key: str, member: str) -> int:
        self.queued.append((key, member))
        return 1


async def test_read_recreates_a_vanished_group() -> None:
    redis = _NoGroupRedis()
    streams = WakeStreams(redis, Keys("pwunit"))  # type: ignore[arg-type]
    assert await streams.read("r1", "s1", own_pending=False, count=10, block_ms=5) == []
    assert redis.created == [(KEY, GROUP)]
    assert redis.queued == [("pwunit:recovery:check", "r1")], "queued for the worker's check"


async def test_read_propagates_other_errors() -> None:
    class Broken(_NoGroupRedis):
        async def xreadgroup(self, *args: Any, **kwargs: Any) -> Any:
            raise ResponseError("WRONGTYPE Operation against a key holding the wrong kind")

    streams = WakeStreams(Broken(), Keys("pwunit"))  # type: ignore[arg-type]
    with pytest.raises(ResponseError, match="WRONGTYPE"):
        await streams.read("r1", "s1", own_pending=False, count=10, block_ms=5)


async def test_ping_false_when_redis_is_down() -> None:
    class Down:
        async def ping(self) -> bool:
            raise ConnectionError("refused")

    streams = WakeStreams(Down(), Keys())  # type: ignore[arg-type]
    assert await streams.ping() is False


@pytest.mark.parametrize(
    ("body", "done"),
    [
        (b'{"done": true}', True),
        (b'{"done": true, "detail": {"x": [1]}}', True),
        (b'{"done": false}', False),
        (b'{"done": 1}', False),
        (b"[]", False),
        (b"not json", False),
        (b"[" * 100_000, False),
        (b'{"a":' * 50_000, False),
    ],
)
def test_webhook_done_answer_is_parsed_defensively(body: bytes, done: bool) -> None:
    from pullwake.webhooks import _answers_done

    assert _answers_done(body) is done


# --- notifications and the reader's batched reads ----------------------------------------------


def test_wake_notify_channel_is_per_prefix() -> None:
    assert Keys().wake_notify() == "pullwake:wake-notify"
    assert Keys("pwtest").wake_notify() == "pwtest:wake-notify"


async def _listening(fake: Any, channel: str) -> Any:
    pubsub = fake.pubsub()
    await pubsub.subscribe(channel)
    assert (await pubsub.get_message(timeout=1))["type"] == "subscribe"
    return pubsub


async def _messages(pubsub: Any) -> list[str]:
    out = []
    while (message := await pubsub.get_message(timeout=0.05)) is not None:
        out.append(message["data"])
    return out


async def test_publish_announces_the_runner(streams: WakeStreams, fake: Any) -> None:
    pubsub = await _listening(fake, streams.keys.wake_notify())
    try:
        await streams.publish("r1", _entry(1))
        assert await _messages(pubsub) == ["r1"]
        results = await streams.publish_many(
            [("r1", _entry(2)), ("r2", _entry(3)), ("r1", _entry(4))]
        )
        assert all(isinstance(r, str) for r in results)
        assert len(results) == 3
        assert await _messages(pubsub) == ["r1", "r2"]  # once per runner
    finally:
        await pubsub.aclose()


async def test_read_new_many_reads_each_session_once_in_one_pipeline(
    streams: WakeStreams, fake: Any
) -> None:
    await streams.ensure_groups(["r1", "r2"])
    await streams.ensure_groups(["r1"])  # idempotent
    ids = [await streams.publish("r1", _entry(n)) for n in (1, 2, 3)]
    other = await streams.publish("r2", _entry(4))
    first, second, third = await streams.read_new_many(
        [("r1", "a", 2), ("r1", "b", 2), ("r2", "c", 10)]
    )
    assert [e for e, _ in first] == ids[:2]  # type: ignore[union-attr]
    assert [e for e, _ in second] == ids[2:]  # type: ignore[union-attr]
    assert [e for e, _ in third] == [other]  # type: ignore[union-attr]
    consumers = await fake.xinfo_consumers(KEY, GROUP)
    assert {c["name"]: c["pending"] for c in consumers} == {"a": 2, "b": 1}
    assert await streams.read_new_many([("r1", "a", 5)]) == [[]]
    assert await streams.read_new_many([]) == []


async def test_read_new_many_recreates_a_lost_group_and_reads_again(
    streams: WakeStreams, fake: Any
) -> None:
    entry_id = await fake.xadd(KEY, {"v": "1", "wake_id": "wk_1", "entity": "/t/x", "epoch": "1"})
    (entries,) = await streams.read_new_many([("r1", "a", 5)])  # no group: made from id 0
    assert [e for e, _ in entries] == [entry_id]  # type: ignore[union-attr]
    assert await streams.group_exists("r1")
