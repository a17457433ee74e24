"""``pullwake inspect``: human ages, ``--json``, and ``inspect stuck`` over seeded real state
(a wake nobody claims, a claim past its lease, poison work parked, a runner gone quiet), each
line's ``redis-cli`` command run against Redis to show that it finds the raw data."""

from __future__ import annotations

import asyncio
import json
import os
import shlex
import sys
from datetime import timedelta
from typing import Any

import pytest
from redis.asyncio import Redis

from pullwake.config import Settings
from pullwake.inspect import (
    human_age,
    inspect_entity,
    inspect_runner,
    inspect_stuck,
    parse_duration,
)

from .helpers import (
    ALICE,
    claim_ok,
    create_entity,
    read_wake,
    register_runner,
    release,
    send,
)

MAX_ATTEMPTS = 2


@pytest.fixture
def server_settings(settings: Settings) -> Settings:
    return settings.with_(max_attempts=MAX_ATTEMPTS)


@pytest.mark.parametrize(
    ("seconds", "text"),
    [
        (0.4, "0.4 s"),
        (3, "3 s"),
        (42.9, "42 s"),
        (125, "2 min 5 s"),
        (720, "12 min"),
        (3840, "1 h 4 min"),
        (7200, "2 h"),
        (2 * 86_400 + 3 * 3600 + 59, "2 d 3 h"),
        (-3, "-3 s"),
        (None, "-"),
    ],
)
def test_human_ages(seconds: float | None, text: str) -> None:
    assert human_age(seconds) == text


def test_durations() -> None:
    assert parse_duration("90") == timedelta(seconds=90)
    assert parse_duration("500ms") == timedelta(milliseconds=500)
    assert parse_duration("5m") == parse_duration("5min") == timedelta(minutes=5)
    assert parse_duration("2h") == timedelta(hours=2)
    with pytest.raises(ValueError, match="not a duration"):
        parse_duration("soon")


async def run_redis_cli(redis: Redis, command: str) -> Any:
    """What the printed ``redis-cli -u "$PULLWAKE_REDIS_URL" ...`` line would show."""
    argv = shlex.split(command)
    assert argv[:3] == ["redis-cli", "-u", "$PULLWAKE_REDIS_URL"], argv
    conn = await redis.connection_pool.get_connection()  # the raw reply, as redis-cli has it
    try:
        await conn.send_command(*argv[3:])
        return await conn.read_response()
    finally:
        await redis.connection_pool.release(conn)


async def test_stuck_lists_each_section_with_a_redis_cli_command_that_finds_it(
    api: Any, db: Any, redis: Redis
) -> None:
    http, services = api.http, api.services
    alice = await api.as_(ALICE)
    # A runner that went quiet with a wake waiting, unclaimed for 2 minutes.
    quiet = await register_runner(http, alice, "quiet-box")
    assert (await http.post(f"/v1/runners/{quiet}/heartbeat", json={}, headers=alice)).is_success
    waiting = await create_entity(http, alice, quiet)
    await send(http, alice, waiting, "nobody takes this")
    await read_wake(http, alice, quiet)  # read, never claimed
    await db.execute(
        "UPDATE wakes SET created_at = now() - interval '2 minutes' WHERE entity_url = $1",
        waiting.url,
    )
    await db.execute(
        "UPDATE runner_liveness SET lease_expires_at = now() - interval '10 minutes', "
        "last_seen_at = now() - interval '12 minutes' WHERE runner_id = $1",
        quiet,
    )
    # A busy runner: one claim whose lease passed, one entity parked by poison work.
    busy = await register_runner(http, alice, "busy-box")
    held = await create_entity(http, alice, busy)
    await send(http, alice, held, "slow")
    wake = await read_wake(http, alice, busy, "s1")
    note = await claim_ok(http, alice, busy, wake.data["wake_id"], wake.id)
    await db.execute(
        "UPDATE claims SET lease_expires_at = now() - interval '3 seconds' WHERE id = $1",
        note["claim_id"],
    )
    poison = await create_entity(http, alice, busy)
    await send(http, alice, poison, "crashes the handler")
    for _ in range(MAX_ATTEMPTS):
        wake = await read_wake(http, alice, busy, "s2")
        failing = await claim_ok(http, alice, busy, wake.data["wake_id"], wake.id)
        assert (await release(http, failing, error="boom")).status_code == 200

    report = await inspect_stuck(
        services, older_than=timedelta(minutes=1), lease_margin=timedelta(seconds=5)
    )

    (stuck_wake,) = report.wakes
    assert stuck_wake["entity_url"] == waiting.url
    assert stuck_wake["runner_id"] == quiet
    assert 115 < stuck_wake["age_s"] < 180
    raw = await run_redis_cli(redis, stuck_wake["redis_cli"])  # XRANGE of its entry
    ((_entry_id, fields),) = raw
    assert fields[fields.index("wake_id") + 1] == stuck_wake["id"]

    (claim,) = report.claims
    assert claim["id"] == note["claim_id"]
    assert claim["runner_id"] == busy
    assert claim["lease_left_s"] < -2
    pending = await run_redis_cli(redis, claim["redis_cli"])  # XPENDING of the runner's stream
    assert isinstance(pending, list)

    (parked,) = report.parked
    assert parked["entity_url"] == poison.url
    assert parked["failed_attempts"] == MAX_ATTEMPTS
    assert "without progress" in parked["parked_reason"]
    groups = await run_redis_cli(redis, parked["redis_cli"])  # XINFO GROUPS
    assert groups

    (runner,) = report.runners
    assert runner["id"] == quiet
    assert runner["liveness"] == "expired"
    assert runner["outstanding_wakes"] == 1
    assert 595 < runner["expired_s"] < 700
    consumers = await run_redis_cli(redis, runner["redis_cli"])  # XINFO CONSUMERS
    assert consumers  # the session that read the wake

    text = report.text()
    assert "wakes unclaimed for more than 1 min: 1" in text
    assert "claims past their lease or within 5 s of it: 1" in text
    assert "parked entities (resume them with the signal `resume`): 1" in text
    assert "runners not online with wakes waiting: 1" in text
    lines = text.splitlines()
    row = next(i for i, line in enumerate(lines) if line.startswith(f"  {stuck_wake['id']}"))
    assert " 2 min " in lines[row], lines[row]
    assert lines[row + 1] == f"      $ {stuck_wake['redis_cli']}"
    assert any("passed 3 s ago" in line or "passed 4 s ago" in line for line in lines), text
    assert any(line.startswith("  quiet-box") and "10 min ago" in line for line in lines), text
    assert json.loads(report.json())["runners"][0]["id"] == quiet


async def test_stuck_is_quiet_when_nothing_is(api: Any) -> None:
    alice = await api.as_(ALICE)
    runner_id = await register_runner(api.http, alice)
    await send(api.http, alice, await create_entity(api.http, alice, runner_id), "fresh")
    report = await inspect_stuck(
        api.services, older_than=timedelta(minutes=1), lease_margin=timedelta(seconds=5)
    )
    assert (report.wakes, report.claims, report.parked) == ([], [], [])
    assert [r["id"] for r in report.runners] == [runner_id]  # never seen, a wake waits
    assert "wakes unclaimed for more than 1 min: none" in report.text()


async def test_runner_and_entity_pages_in_text_and_json(api: Any) -> None:
    http, services = api.http, api.services
    alice = await api.as_(ALICE)
    runner_id = await register_runner(http, alice)
    entity = await create_entity(http, alice, runner_id)
    sent = await send(http, alice, entity, "hello")

    page = await inspect_runner(services, runner_id)
    assert "oldest outstanding" in page
    assert "raw: redis-cli" in page
    data = json.loads(await inspect_runner(services, runner_id, as_json=True))
    assert data["outstanding_wakes"] == 1
    assert data["redis"]["length"] == 1
    assert data["oldest_outstanding_s"] >= 0

    page = await inspect_entity(services, entity.url)
    assert sent["wake"]["id"] in page
    assert " ago" in page
    data = json.loads(await inspect_entity(services, entity.url, as_json=True))
    assert data["dispatch"]["outstanding_wake_id"] == sent["wake"]["id"]
    assert data["last_wakes"][0]["reason"] == "message"


async def test_the_cli_prints_stuck_as_json(api: Any, db: Any) -> None:
    alice = await api.as_(ALICE)
    runner_id = await register_runner(api.http, alice)
    entity = await create_entity(api.http, alice, runner_id)
    await send(api.http, alice, entity, "old")
    await db.execute("UPDATE wakes SET created_at = now() - interval '2 hours'")
    settings = api.settings
    env = {
        **os.environ,
        "PULLWAKE_DATABASE_URL": settings.database_url,
        "PULLWAKE_REDIS_URL": settings.redis_url,
        "PULLWAKE_REDIS_KEY_PREFIX": settings.redis_key_prefix,
    }
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "pullwake",
        "inspect",
        "stuck",
        "--older-than",
        "1h",
        "--json",
        env=env,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode == 0, err.decode()
    report = json.loads(out)
    assert report["older_than_s"] == 3600
    assert [w["entity_url"] for w in report["wakes"]] == [entity.url]
    assert report["wakes"][0]["redis_cli"].startswith('redis-cli -u "$PULLWAKE_REDIS_URL" XRANGE')
