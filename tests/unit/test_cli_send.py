"""``pullwake send`` refuses bad input before it opens any connection, and its batching loop."""

from __future__ import annotations

from typing import Any

import httpx
import msgspec
import pytest

from pullwake.cli import main
from pullwake.client import AsyncClient, BatchItem, RetryPolicy
from pullwake.sendfile import send_items

pytestmark = pytest.mark.usefixtures("nowhere")


@pytest.mark.parametrize("direct", [[], ["--direct"]])
@pytest.mark.parametrize(
    ("payload", "key", "named"),
    [
        (r'{"a": {"b": "x\u0000"}}', None, "payload.a.b"),
        (r'{"a": "\ud800"}', None, "payload.a"),
        ('{"a": 1}', "k\x00", "idempotency_key"),
    ],
)
def test_send_refuses_unstorable_text(
    payload: str,
    key: str | None,
    named: str,
    direct: list[str],
    capsys: pytest.CaptureFixture[str],
) -> None:
    argv = ["send", "/t/e", payload, *direct] + (["--idempotency-key", key] if key else [])
    assert main(argv) == 2
    assert named in capsys.readouterr().err


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["/t/e", "{not json"], "pullwake send: PAYLOAD is not JSON (Expecting property name"),
        (["/t/e", "hello"], "PAYLOAD is not JSON"),
        (["/t/e", "NaN"], "NaN is not JSON"),
        (["chat/x", "1"], "pullwake send: entity URL must start with '/': did you mean /chat/x?"),
        (["/chat/x", "not json"], "pullwake send: PAYLOAD is not JSON (Expecting value: line 1"),
        (["/t/e/x", "1"], "an entity is written /type/id"),
        (["/t/e", "1", "--as", "user:x"], "--as needs --direct"),
        (["/t/e"], "give ENTITY and PAYLOAD, or --file"),
        (["/t/e", "--file", "x.jsonl"], "not both"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(
    argv: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["send", *argv]) == 2
    err = capsys.readouterr().err
    assert message in err
    assert err.count("\n") == 1, err


def test_a_bad_file_is_refused_whole(tmp_path: Any, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "bad.jsonl"
    path.write_text('{"entity": "/job/a", "payload": 1}\nnot json\n{"entity": "nope"}\n')
    assert main(["send", "--file", str(path)]) == 2
    err = capsys.readouterr().err
    assert "line 2:" in err
    assert "line 3:" in err
    assert main(["send", "--file", str(tmp_path / "missing.jsonl")]) == 2
    assert "No such file" in capsys.readouterr().err


def test_an_unreachable_server_is_one_line_and_exit_1(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["send", "/t/e", "1"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("pullwake send: UNREACHABLE: POST /v1/entities/t/e/messages: Connect")
    assert "is pullwake serving at http://127.0.0.1:9?" in err
    assert err.count("\n") == 1, err


# --- the batching loop ---------------------------------------------------------------------------


def _batch_server(limit: int, rate_limited: int = 0) -> tuple[httpx.MockTransport, list[int]]:
    """Refuses batches longer than ``limit`` as the server does, and the first
    ``rate_limited`` batches with 429; records the size of each batch it accepts."""
    accepted: list[int] = []
    state = {"429": rate_limited}

    def problem(status: int, code: str, **extra: Any) -> httpx.Response:
        body = {"type": "t", "title": code, "status": status, "detail": code, "code": code}
        return httpx.Response(status, json=body | extra, headers={"Retry-After": "2"})

    def handler(request: httpx.Request) -> httpx.Response:
        messages = msgspec.json.decode(request.content)["messages"]
        if len(messages) > limit:
            errors = [{"key": "messages", "message": "too many", "source": "body"}]
            return problem(400, "INVALID_REQUEST", errors=errors)
        if state["429"]:
            state["429"] -= 1
            return problem(429, "RATE_LIMITED")
        accepted.append(len(messages))
        start = sum(accepted[:-1])
        results = [
            {"entity": m["entity"], "offset": start + n + 1, "wake": {"id": None, "status": "held"}}
            for n, m in enumerate(messages)
        ]
        return httpx.Response(200, json={"results": results})

    return httpx.MockTransport(handler), accepted


ITEMS = [BatchItem("/t/e", n) for n in range(10)]


async def test_batches_are_halved_until_the_server_takes_them() -> None:
    transport, accepted = _batch_server(limit=3)
    notes: list[str] = []
    progress: list[tuple[int, int]] = []
    async with AsyncClient("http://pw", transport=transport) as client:
        results, error = await send_items(
            client, ITEMS, 8, progress=lambda *p: progress.append(p), note=notes.append
        )
    assert error is None
    assert [r.offset for r in results] == list(range(1, 11))
    assert accepted == [2, 2, 2, 2, 2]
    assert notes == [
        "the server refused 8 messages at once; trying 4",
        "the server refused 4 messages at once; trying 2",
    ]
    assert progress == [(2, 10), (4, 10), (6, 10), (8, 10), (10, 10)]


async def test_a_rate_limited_batch_waits_and_is_sent_again() -> None:
    transport, accepted = _batch_server(limit=100, rate_limited=2)
    slept: list[float] = []

    async def sleep(seconds: float) -> None:
        slept.append(seconds)

    async with AsyncClient("http://pw", transport=transport, retry=RetryPolicy(1)) as client:
        results, error = await send_items(
            client, ITEMS, 6, progress=lambda *_: None, note=lambda _: None, sleep=sleep
        )
    assert error is None
    assert (len(results), accepted, slept) == (10, [6, 4], [2.0, 2.0])


async def test_a_batch_refused_for_another_reason_stops_the_sending() -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        body = {"type": "t", "title": "x", "status": 403, "detail": "nope", "code": "FORBIDDEN"}
        return httpx.Response(403, json=body)

    async with AsyncClient("http://pw", transport=httpx.MockTransport(handler)) as client:
        results, error = await send_items(client, ITEMS, 4, progress=lambda *_: None)
    assert results == []
    assert error is not None
    assert (error.code, error.status) == ("FORBIDDEN", 403)
