"""End to end: ``pullwake serve`` and the CLI as real processes, driven like a runner would."""

from __future__ import annotations

import asyncio
import re
import secrets
import signal
import time
from collections.abc import Awaitable, Callable
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import httpx
import pytest
from redis.asyncio import Redis

from pullwake.model import hash_token
from pullwake.store.migrate import available_migrations

from .harness import ADMIN_DATABASE_URL, Cli, ServerProcess, child_env, open_wakes

pytestmark = pytest.mark.e2e

PRINCIPAL = "user:e2e@example.com"
GROUP = "pullwake"
ENTRY_ID = re.compile(r"^\d+-\d+$")
ISO_UTC = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d+)?Z$")


def uid(prefix: str) -> str:
    return f"{prefix}-{secrets.token_hex(4)}"


def entry_order(entry_id: str) -> tuple[int, int]:
    ms, _, seq = entry_id.partition("-")
    return int(ms), int(seq)


def stream_key(prefix: str, runner_id: str) -> str:
    return f"{prefix}:{{runner:{runner_id}}}:wakes"


async def create_token(cli: Cli, label: str = "e2e") -> tuple[str, str]:
    """``pullwake tokens create``: (raw token from stdout, token id from the stderr note)."""
    result = (await cli("tokens", "create", "--principal", PRINCIPAL, "--label", label)).ok()
    token = result.stdout.strip()
    assert re.fullmatch(r"pwk_[A-Za-z0-9_-]{43}", token), result.describe()
    found = re.search(r"token id (tok_[0-9a-f]+) for " + re.escape(PRINCIPAL), result.stderr)
    assert found, result.describe()
    return token, found.group(1)


def client_for(server: ServerProcess, token: str) -> httpx.AsyncClient:
    return httpx.AsyncClient(
        base_url=server.base_url, headers={"Authorization": f"Bearer {token}"}, timeout=10
    )


async def register_runner_and_entity(http: httpx.AsyncClient) -> tuple[str, str, str]:
    """A runner and an entity whose policy targets it: (runner id, entity url, entity path)."""
    runner_id = uid("e2e-runner")
    r = await http.post("/v1/runners", json={"id": runner_id, "label": "e2e box", "kind": "ci"})
    assert r.status_code == 201, r.text
    assert r.json()["owner_principal"] == PRINCIPAL
    assert r.json()["admin_status"] == "enabled"

    entity_id = uid("job")
    policy = {"targets": [{"type": "runner", "runner_id": runner_id}]}
    r = await http.put(
        f"/v1/entities/e2etask/{entity_id}",
        json={"dispatch_policy": policy, "tags": {"suite": "e2e"}},
    )
    assert r.status_code == 201, r.text
    body = r.json()
    assert body["status"] == "idle"
    assert body["dispatch_policy"] == policy
    assert body["dispatch"]["tail_offset"] == 0
    return runner_id, f"/e2etask/{entity_id}", f"/v1/entities/e2etask/{entity_id}"


def check_wake(data: dict[str, Any], *, wake_id: str, entity: str, epoch: int, reason: str) -> None:
    assert set(data) == {"wake_id", "entity", "epoch", "reason", "created_at"}, data
    assert data["wake_id"] == wake_id
    assert data["entity"] == entity
    assert type(data["epoch"]) is int
    assert data["epoch"] == epoch
    assert data["reason"] == reason
    assert ISO_UTC.match(data["created_at"]), data


async def claim(
    http: httpx.AsyncClient, runner_id: str, wake_id: str, entry_id: str
) -> dict[str, Any]:
    r = await http.post(
        f"/v1/runners/{runner_id}/claim", json={"wake_id": wake_id, "entry_id": entry_id}
    )
    assert r.status_code == 200, r.text
    assert r.headers.get("cache-control") == "no-store"
    return r.json()  # type: ignore[no-any-return]


async def done(
    http: httpx.AsyncClient, notification: dict[str, Any], acked_offset: int
) -> dict[str, Any]:
    """Done through the notification's own callback URL, authenticated by the claim token."""
    r = await http.post(
        notification["callbacks"]["done"],
        json={"epoch": notification["epoch"], "acked_offset": acked_offset},
        headers={"Authorization": f"Bearer {notification['claim_token']}"},
    )
    assert r.status_code == 200, r.text
    return r.json()  # type: ignore[no-any-return]


async def group_info(redis: Redis, key: str) -> dict[str, Any]:
    groups = await redis.xinfo_groups(key)
    assert [g["name"] for g in groups] == [GROUP], groups
    return groups[0]  # type: ignore[no-any-return]


# --- the whole runner round trip ----------------------------------------------------------


async def test_runner_round_trip(
    server: ServerProcess, cli: Cli, redis: Redis, key_prefix: str
) -> None:
    token, _ = await create_token(cli)
    async with client_for(server, token) as http:
        runner_id, url, path = await register_runner_and_entity(http)
        key = stream_key(key_prefix, runner_id)

        r = await http.post(
            f"/v1/runners/{runner_id}/heartbeat",
            json={"lease_ms": 60_000, "diagnostics": {"version": "e2e", "stream_connected": True}},
        )
        assert r.status_code == 200, r.text
        assert r.json()["liveness"] == "online"

        async with open_wakes(http, runner_id, "sess-a") as wakes:
            # 1. send: a new wake is queued and arrives on the stream
            r = await http.post(f"{path}/messages", json={"payload": {"n": 1}})
            assert r.status_code == 202, r.text
            sent = r.json()
            assert sent["offset"] == 1
            assert sent["wake"]["status"] == "queued"
            wake_id = sent["wake"]["id"]

            entry_id, data = await wakes.next_wake()
            assert ENTRY_ID.match(entry_id)
            check_wake(data, wake_id=wake_id, entity=url, epoch=1, reason="message")
            assert "connected session=sess-a" in wakes.comments
            assert wakes.retry == [1000]

            # delivered but unclaimed: pending for this session in the consumer group
            group = await group_info(redis, key)
            assert group["pending"] == 1
            assert group["last-delivered-id"] == entry_id
            pending = await redis.xpending_range(key, GROUP, min="-", max="+", count=10)
            assert [(p["message_id"], p["consumer"]) for p in pending] == [(entry_id, "sess-a")]

            # 2. a second send before the claim coalesces into the outstanding wake
            r = await http.post(f"{path}/messages", json={"payload": {"n": 2}})
            assert r.status_code == 202, r.text
            assert r.json()["offset"] == 2
            assert r.json()["wake"]["id"] == wake_id
            assert r.json()["wake"]["status"] == "coalesced"

            # 3. claim: the notification carries everything a handler needs
            note = await claim(http, runner_id, wake_id, entry_id)
            assert note["claim_id"] == wake_id
            assert note["wake_id"] == wake_id
            assert note["epoch"] == 1
            assert note["claim_token"].startswith("pwc_")
            assert note["lease_ms"] > 0
            assert note["entity"]["url"] == url
            assert note["entity"]["status"] == "running"
            assert note["entity"]["created_by"] == PRINCIPAL
            assert note["entity"]["tags"] == {"suite": "e2e"}
            assert (note["acked_offset"], note["tail_offset"]) == (0, 2)
            assert [m["offset"] for m in note["messages"]] == [1, 2]
            assert [m["payload"] for m in note["messages"]] == [{"n": 1}, {"n": 2}]
            assert all(m["sender"] == PRINCIPAL for m in note["messages"])
            assert note["more_messages"] is False
            for name in ("heartbeat", "done", "release", "events"):
                assert note["callbacks"][name].startswith(server.base_url + "/v1/"), name

            # the entry is acked at once: nothing pending, the entry itself stays readable
            group = await group_info(redis, key)
            assert group["pending"] == 0
            assert group["consumers"] == 1
            assert await redis.xpending_range(key, GROUP, min="-", max="+", count=10) == []
            assert (await redis.xpending(key, GROUP))["pending"] == 0
            entries = await redis.xrange(key)
            assert len(entries) == 1
            assert entries[0][0] == entry_id
            assert entries[0][1] == {
                "v": "1",
                "wake_id": wake_id,
                "entity": url,
                "epoch": "1",
                "reason": "message",
                "created_at": data["created_at"],
            }

            # a duplicate claim of the same wake is refused and changes nothing
            r = await http.post(
                f"/v1/runners/{runner_id}/claim", json={"wake_id": wake_id, "entry_id": entry_id}
            )
            assert r.status_code == 409, r.text
            assert r.json()["code"] == "ALREADY_CLAIMED"
            assert r.headers["content-type"].startswith("application/problem+json")

            claim_auth = {"Authorization": f"Bearer {note['claim_token']}"}

            # 4. work: heartbeat, append an event, a message arriving meanwhile coalesces
            r = await http.post(
                note["callbacks"]["heartbeat"], json={"epoch": 1}, headers=claim_auth
            )
            assert r.status_code == 200, r.text
            assert r.json()["ok"] is True
            assert r.json()["entity_status"] == "running"

            r = await http.post(
                note["callbacks"]["events"],
                json={"payload": {"progress": "half"}},
                headers=claim_auth,
            )
            assert r.status_code == 201, r.text
            assert r.json() == {"offset": 1}

            r = await http.post(f"{path}/messages", json={"payload": {"n": 3}})
            assert r.status_code == 202, r.text
            assert r.json()["offset"] == 3
            assert r.json()["wake"] == {
                "id": wake_id,
                "status": "coalesced",
                "reason": "active-claim",
            }

            r = await http.get(path)
            entity = r.json()
            assert entity["status"] == "running"
            assert entity["dispatch"]["active_claim"]["claim_id"] == wake_id
            assert entity["dispatch"]["active_claim"]["runner_id"] == runner_id
            assert entity["dispatch"]["outstanding_wake_id"] is None

            # 5. done up to the tail the claim saw: message 3 is still pending ⇒ follow-up wake
            assert await done(http, note, acked_offset=note["tail_offset"]) == {
                "ok": True,
                "next_wake": True,
            }
            entry2, data2 = await wakes.next_wake()
            assert entry_order(entry2) > entry_order(entry_id)
            assert data2["wake_id"] != wake_id
            check_wake(data2, wake_id=data2["wake_id"], entity=url, epoch=2, reason="follow_up")

            # the finished claim is fenced now
            r = await http.post(
                note["callbacks"]["heartbeat"], json={"epoch": 1}, headers=claim_auth
            )
            assert r.status_code == 409, r.text
            assert r.json()["code"] == "FENCED"

            note2 = await claim(http, runner_id, data2["wake_id"], entry2)
            assert note2["epoch"] == 2
            assert (note2["acked_offset"], note2["tail_offset"]) == (2, 3)
            assert [m["offset"] for m in note2["messages"]] == [3]
            assert await done(http, note2, acked_offset=3) == {"ok": True, "next_wake": False}
            await wakes.expect_quiet(0.5)

            r = await http.get(path)
            entity = r.json()
            assert entity["status"] == "idle"
            d = entity["dispatch"]
            assert (d["acked_offset"], d["tail_offset"], d["epoch"]) == (3, 3, 2)
            assert d["active_claim"] is None
            assert d["outstanding_wake_id"] is None

            r = await http.get(f"{path}/events")
            assert [(e["offset"], e["payload"]) for e in r.json()["events"]] == [
                (1, {"progress": "half"})
            ]

            r = await http.get(f"/v1/wakes/{wake_id}")
            assert r.status_code == 200, r.text
            assert r.json()["claim_status"] == "completed"
            assert r.json()["stream_entry_id"] == entry_id

            # 6. the CLI sees the same state through Postgres and Redis
            runner_report, entity_report, wake_report = await asyncio.gather(
                cli("inspect", "runner", runner_id),
                cli("inspect", "entity", url),
                cli("inspect", "wake", wake_id),
            )
            text = runner_report.ok().stdout
            assert f"runner {runner_id}" in text
            assert PRINCIPAL in text
            assert "admin_status" in text
            assert "enabled" in text
            assert f"redis stream {key}" in text
            assert "XLEN 2" in text
            assert re.search(r"group pullwake: consumers=1 pending=0", text), text
            assert "consumer sess-a: pending=0" in text
            assert f"entry {entry_id} v=1 wake_id={wake_id} entity={url} epoch=1" in text
            assert f"entry {entry2} v=1 wake_id={data2['wake_id']}" in text
            assert token not in text

            text = entity_report.ok().stdout
            assert f"entity {url}" in text
            assert re.search(r"status\s+idle", text), text
            assert "acked 3 / tail 3 (0 pending)" in text
            assert re.search(rf"{wake_id}\s+epoch 1\s+message\s+delivered/completed", text)
            assert re.search(rf"{data2['wake_id']}\s+epoch 2\s+follow_up", text), text

            text = wake_report.ok().stdout
            assert f"wake {wake_id}" in text
            assert re.search(r"claim_status\s+completed", text), text
            assert re.search(rf"stream_entry_id\s+{re.escape(entry_id)}", text), text

            # 7. pullwake send --direct goes straight to Postgres+Redis and wakes the live stream
            sent3 = (await cli("send", url, '{"x":1}', "--direct", "--as", "service:e2e-cli")).ok()
            found = re.fullmatch(r"offset 4: wake (wk_[0-9a-f]+) queued\n", sent3.stdout)
            assert found, sent3.describe()
            entry3, data3 = await wakes.next_wake()
            check_wake(data3, wake_id=found.group(1), entity=url, epoch=3, reason="message")
            note3 = await claim(http, runner_id, data3["wake_id"], entry3)
            assert [(m["offset"], m["payload"], m["sender"]) for m in note3["messages"]] == [
                (4, {"x": 1}, "service:e2e-cli")
            ]
            assert await done(http, note3, acked_offset=4) == {"ok": True, "next_wake": False}

        # the client went away: the group keeps nothing pending
        group = await group_info(redis, key)
        assert group["pending"] == 0
        assert await redis.xlen(key) == 3


# --- tokens --------------------------------------------------------------------------------


async def test_tokens_list_and_revoke(server: ServerProcess, cli: Cli) -> None:
    (token, token_id), (other_token, other_id) = await asyncio.gather(
        create_token(cli, label="to-revoke"), create_token(cli, label="keeper")
    )

    listing = (await cli("tokens", "list", "--principal", PRINCIPAL)).ok().stdout
    lines = {line.split()[0]: line for line in listing.splitlines() if line.strip()}
    assert token_id in lines
    assert other_id in lines
    assert "active" in lines[token_id]
    assert lines[token_id].endswith("  to-revoke")
    assert listing.startswith("ID ")  # the header
    for secret in (token, other_token, hash_token(token), hash_token(other_token)):
        assert secret not in listing
    assert "pwk_" not in listing

    async with client_for(server, token) as http:
        r = await http.get("/v1/runners")
        assert r.status_code == 200, r.text

        revoked = (await cli("tokens", "revoke", token_id)).ok()
        assert revoked.stdout.strip() == f"revoked {token_id} ({PRINCIPAL})"

        r = await http.get("/v1/runners")
        assert r.status_code == 401, r.text
        assert r.headers["content-type"].startswith("application/problem+json")
        assert r.json()["code"] == "UNAUTHORIZED"

    async with client_for(server, other_token) as http:
        assert (await http.get("/v1/runners")).status_code == 200

    listing = (await cli("tokens", "list")).ok().stdout
    assert re.search(rf"^{token_id}\s+{re.escape(PRINCIPAL)}\s+revoked\b", listing, re.M)
    assert re.search(rf"^{other_id}\s+{re.escape(PRINCIPAL)}\s+active\b", listing, re.M)

    missing = await cli("tokens", "revoke", "tok_doesnotexist")
    assert missing.returncode == 1, missing.describe()
    assert "NOT_FOUND" in missing.stderr


# --- restart while a runner is connected ----------------------------------------------------


async def test_server_restart_redelivers_pending_wake(
    server: ServerProcess, cli: Cli, redis: Redis, key_prefix: str
) -> None:
    token, _ = await create_token(cli)
    async with client_for(server, token) as http:
        runner_id, url, path = await register_runner_and_entity(http)
        key = stream_key(key_prefix, runner_id)

        async with open_wakes(http, runner_id, "pool-1") as wakes:
            r = await http.post(f"{path}/messages", json={"payload": {"n": 1}})
            assert r.status_code == 202, r.text
            wake_id = r.json()["wake"]["id"]
            entry_id, data = await wakes.next_wake()
            check_wake(data, wake_id=wake_id, entity=url, epoch=1, reason="message")

            # SIGTERM while the stream is open and the wake is delivered but not claimed: the
            # server ends the stream at once (runners reconnect elsewhere) instead of holding it
            # for uvicorn's 5 s graceful timeout and then cancelling it with a traceback.
            started = time.monotonic()
            code = await server.stop(signal.SIGTERM)
            stopped_in_s = time.monotonic() - started
            assert code in (0, -signal.SIGTERM), server.log()
            await wakes.wait_ended(timeout=5)
            assert stopped_in_s < 4, f"shutdown waited {stopped_in_s:.1f} s for the open stream"

        log = server.log()
        assert "Traceback" not in log, log
        assert "server shutting down" in log or "disconnected" in log, log

        # while the API is down an operator can still send: it coalesces into the open wake
        sent = (await cli("send", url, '{"n":2}', "--direct")).ok()
        assert sent.stdout.strip() == f"offset 2: wake {wake_id} coalesced (outstanding-wake)"

        # the entry is still pending for the session in Redis
        pending = await redis.xpending_range(key, GROUP, min="-", max="+", count=10)
        assert [(p["message_id"], p["consumer"]) for p in pending] == [(entry_id, "pool-1")]

        await server.start()
        assert server.starts == 2

        # the runner reconnects with the same session and is handed its pending entry again
        async with open_wakes(http, runner_id, "pool-1") as wakes:
            again_id, again = await wakes.next_wake()
            assert again_id == entry_id
            assert again == data

            note = await claim(http, runner_id, wake_id, again_id)
            assert note["epoch"] == 1
            assert [m["payload"] for m in note["messages"]] == [{"n": 1}, {"n": 2}]
            assert await done(http, note, acked_offset=2) == {"ok": True, "next_wake": False}
            assert (await group_info(redis, key))["pending"] == 0

            # a message sent after the restart is delivered on the live stream
            r = await http.post(f"{path}/messages", json={"payload": {"n": 3}})
            assert r.status_code == 202, r.text
            assert r.json()["wake"]["status"] == "queued"
            entry3, data3 = await wakes.next_wake()
            check_wake(data3, wake_id=r.json()["wake"]["id"], entity=url, epoch=2, reason="message")
            note3 = await claim(http, runner_id, data3["wake_id"], entry3)
            assert await done(http, note3, acked_offset=3) == {"ok": True, "next_wake": False}

        entity = (await http.get(path)).json()
        assert entity["status"] == "idle"
        assert (entity["dispatch"]["acked_offset"], entity["dispatch"]["tail_offset"]) == (3, 3)
        assert (await group_info(redis, key))["pending"] == 0


# --- CLI without a server ------------------------------------------------------------------


def _with_database(url: str, name: str) -> str:
    return urlunsplit(urlsplit(url)._replace(path=f"/{name}"))


async def test_migrate_twice_is_idempotent(key_prefix: str) -> None:
    name = f"pullwake_e2e_{secrets.token_hex(4)}"
    admin = await asyncpg.connect(ADMIN_DATABASE_URL)
    await admin.execute(f'CREATE DATABASE "{name}"')
    await admin.close()
    try:
        cli = Cli(
            child_env(
                PULLWAKE_DATABASE_URL=_with_database(ADMIN_DATABASE_URL, name),
                PULLWAKE_REDIS_URL="redis://127.0.0.1:1/0",  # never contacted by migrate
                PULLWAKE_REDIS_KEY_PREFIX=key_prefix,
            )
        )
        shipped = available_migrations()
        first = (await cli("migrate")).ok()
        names = ", ".join(f"{m.version:04d}_{m.name}" for m in shipped)
        assert first.stdout.strip() == f"applied: {names}"
        assert first.stdout.startswith("applied: 0001_initial")
        second = (await cli("migrate")).ok()
        assert second.stdout.strip() == "database is up to date"
        conn = await asyncpg.connect(_with_database(ADMIN_DATABASE_URL, name))
        try:
            rows = await conn.fetch("SELECT version, name FROM pullwake_migrations")
        finally:
            await conn.close()
        assert sorted((r["version"], r["name"]) for r in rows) == [
            (m.version, m.name) for m in shipped
        ]
    finally:
        admin = await asyncpg.connect(ADMIN_DATABASE_URL)
        await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        await admin.close()


COMMANDS = ("serve", "migrate", "tokens", "inspect", "send", "dev")
NESTED = [("tokens", a) for a in ("create", "list", "revoke")] + [
    ("inspect", w) for w in ("runner", "entity", "wake", "stuck")
]


async def test_help_of_every_command_exits_zero(capsys: pytest.CaptureFixture[str]) -> None:
    cli = Cli(child_env())  # no configuration at all: --help must not need any
    commands: list[tuple[str, ...]] = [(), *((c,) for c in COMMANDS)]
    results = await asyncio.gather(*(cli(*args, "--help") for args in commands))
    for args, result in zip(commands, results, strict=True):
        result.ok()
        usage = "usage: pullwake" + "".join(f" {a}" for a in args)
        assert result.stdout.startswith(usage), result.describe()
        assert result.stderr == "", result.describe()
    for command in COMMANDS:
        assert command in results[0].stdout

    # the second-level actions: same parser, in-process (a process each would add seconds)
    from pullwake.cli import main

    for args in NESTED:
        with pytest.raises(SystemExit) as exited:
            main([*args, "--help"])
        assert exited.value.code == 0
        assert capsys.readouterr().out.startswith("usage: pullwake " + " ".join(args))


async def test_cli_errors_are_reported_not_raised(cli: Cli) -> None:
    """Bad input exits non-zero with a one-line message; never a traceback."""
    unconfigured = Cli(child_env())
    results = await asyncio.gather(
        cli("inspect", "runner", "no-such-runner"),
        cli("send", "/nope/none", '{"x":1}', "--direct"),
        cli("send", "/nope/none", "{not json"),
        cli("tokens", "create", "--principal", "alice"),
        unconfigured("inspect", "runner", "x"),
        cli("no-such-command"),
    )
    expected = [
        (1, "NOT_FOUND"),
        (1, "NOT_FOUND"),
        (2, "pullwake send: PAYLOAD is not JSON"),
        (2, "principal must look like"),
        (2, "configuration error: PULLWAKE_DATABASE_URL"),
        (2, "invalid choice"),
    ]
    for result, (code, message) in zip(results, expected, strict=True):
        assert result.returncode == code, result.describe()
        assert message in result.stderr, result.describe()
        assert "Traceback" not in result.stderr, result.describe()


# --- connection limits ---------------------------------------------------------------------------


async def test_serve_bounds_half_open_connections_and_header_size(
    server_factory: Callable[..., Awaitable[ServerProcess]],
) -> None:
    """Slowloris: clients that never finish their headers cannot hold more than the limit."""
    server = await server_factory("--limit-concurrency", "4", "--max-header-bytes", "2048")
    writers = []
    try:
        for _ in range(6):
            _reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
            writer.write(b"GET /healthz HTTP/1.1\r\nHost: slow\r\n")  # never the blank line
            await writer.drain()
            writers.append(writer)
        async with httpx.AsyncClient(base_url=server.base_url, timeout=10) as http:
            assert (await http.get("/healthz")).status_code == 503
            for writer in writers:
                writer.close()
            writers.clear()

            async def recovered() -> bool:
                return (await http.get("/healthz")).status_code == 200

            await wait_until(recovered)
            assert (await http.get("/healthz", headers={"x-padding": "p" * 512})).is_success
        # A head that keeps growing without ending is refused once past the limit.
        reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
        writers.append(writer)
        writer.write(b"GET /healthz HTTP/1.1\r\nHost: slow\r\n" + b"x-pad: ppppppp\r\n" * 300)
        await writer.drain()
        status_line = await asyncio.wait_for(reader.readline(), timeout=10)
        assert status_line.startswith(b"HTTP/1.1 400"), status_line
    finally:
        for writer in writers:
            writer.close()


async def wait_until(check: Callable[[], Awaitable[bool]], timeout: float = 10) -> None:
    """Poll ``check`` until it is true."""
    deadline = time.monotonic() + timeout
    while not await check():
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.1)
