"""``pullwake send`` over HTTP against the live app: one-line answers, problems and files."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest

from pullwake.cli import main
from pullwake.client import AsyncClient, DispatchPolicy, RunnerTarget

from .helpers import ALICE, BOB, uid


async def _send(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    # main() runs its own event loop: in a thread, while this loop serves the app
    code = await asyncio.to_thread(main, ["send", *argv])
    out, err = capsys.readouterr()
    return code, out, err


async def _entity(api, token: str) -> str:
    async with AsyncClient(api.base_url, token) as client:
        runner_id = uid("runner")
        await client.register_runner(runner_id)
        entity = f"/job/{uid('e')}"
        await client.create_entity(
            entity, dispatch_policy=DispatchPolicy([RunnerTarget(runner_id)])
        )
    return entity


async def test_send_prints_the_offset_and_the_wake(
    api, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    token = await api.make_token(ALICE)
    entity = await _entity(api, token)
    monkeypatch.setenv("PULLWAKE_TOKEN", token)
    server = ["--server", api.base_url]

    code, out, err = await _send(capsys, entity, '{"n": 1}', "--idempotency-key", "k", *server)
    assert (code, err) == (0, "")
    assert out.startswith("offset 1: wake wk_")
    assert out.endswith(" queued\n")
    code, out, _ = await _send(capsys, entity, '{"n": 1}', "--idempotency-key", "k", *server)
    assert (code, out.endswith(" queued (duplicate)\n")) == (0, True)
    code, out, _ = await _send(capsys, entity, '"text"', *server)
    assert code == 0
    assert out.startswith("offset 2: wake wk_")
    assert out.endswith(" coalesced (outstanding-wake)\n")

    async with AsyncClient(api.base_url, token) as client:
        assert [(m.payload, m.sender) async for m in client.messages(entity)] == [
            ({"n": 1}, ALICE),
            ("text", ALICE),
        ]


async def test_problems_are_one_line_with_their_code(
    api, capsys: pytest.CaptureFixture[str]
) -> None:
    alice, bob = await api.make_token(ALICE), await api.make_token(BOB)
    entity = await _entity(api, alice)
    server = ["--server", api.base_url]
    cases = [
        (["--token", "pwk_nope"], "UNAUTHORIZED (401): the API token is unknown or revoked (set"),
        ([], "UNAUTHORIZED (401): missing credentials"),
        (["--token", bob], f"FORBIDDEN (403): {BOB} is not a member of entity {entity}"),
    ]
    for extra, expected in cases:
        code, out, err = await _send(capsys, entity, "1", *server, *extra)
        assert (code, out) == (1, ""), err
        assert err.startswith(f"pullwake send: {expected}"), err
        assert err.count("\n") == 1, err
    code, _, err = await _send(capsys, "/job/none", "1", *server, "--token", alice)
    assert code == 1
    assert err == "pullwake send: NOT_FOUND (404): entity /job/none does not exist\n"


async def test_send_file_over_http(
    api, capsys: pytest.CaptureFixture[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    token = await api.make_token(ALICE)
    entity = await _entity(api, token)
    lines = [json.dumps({"entity": entity, "payload": {"n": n}}) for n in range(5)]
    lines.insert(2, "")
    lines.append(json.dumps({"entity": "/job/missing", "payload": 1}))
    path = tmp_path / "messages.jsonl"
    path.write_text("\n".join(lines) + "\n")
    monkeypatch.setenv("PULLWAKE_TOKEN", token)
    monkeypatch.setenv("PULLWAKE_SERVER_URL", api.base_url)

    code, out, err = await _send(capsys, "--file", str(path), "--batch-size", "2")

    assert code == 1, err  # one item failed
    assert out.splitlines() == [
        "line 7: NOT_FOUND entity /job/missing does not exist",
        "6 messages: 5 accepted (1 queued, 4 coalesced), 1 failed",
    ]
    assert err.splitlines() == ["sent 2/6", "sent 4/6", "sent 6/6"]

    # the token's principal may not send to another's entity: every item says so
    bob = await api.make_token(BOB)
    code, out, err = await _send(capsys, "--file", str(path), "--token", bob)
    assert code == 1
    assert "6 messages: 0 accepted (none), 6 failed" in out
    assert f"line 1: FORBIDDEN {BOB} is not a member of entity {entity}" in out

    # a failure of the whole batch stops the sending and says what was not sent
    code, out, err = await _send(capsys, "--file", str(path), "--token", "pwk_nope")
    assert (code, out) == (1, "0 messages: 0 accepted (none), 0 failed\n")
    assert err.startswith(
        "pullwake send: stopped before line 1, 6 of 6 messages not sent: UNAUTHORIZED (401):"
    )
