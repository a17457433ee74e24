"""``PULLWAKE_LOG_FORMAT=json``: every line ``pullwake serve`` writes (pullwake's, uvicorn's,
the access log) is one JSON object, in one process and under ``--workers 2``; the text format
shows the structured fields as key=value."""

from __future__ import annotations

import json
import re
from collections.abc import Awaitable, Callable
from typing import Any

import pytest

from .harness import ServerProcess, open_wakes
from .test_processes import client_for, create_token, register_runner_and_entity

pytestmark = pytest.mark.e2e


def json_lines(log: str) -> list[dict[str, Any]]:
    """Every line of the server's output as JSON (the harness's own start markers aside)."""
    lines = [line for line in log.splitlines() if line and not line.startswith("=====")]
    records = []
    for line in lines:
        try:
            records.append(json.loads(line))
        except ValueError:
            raise AssertionError(f"not a JSON line: {line!r}\n{log}") from None
    return records


@pytest.mark.parametrize("workers", ["1", "2"])
async def test_json_logs_of_serve_are_one_object_per_line(
    server_factory: Callable[..., Awaitable[ServerProcess]],
    pw_env: dict[str, str],
    cli: Any,
    workers: str,
) -> None:
    pw_env.update(PULLWAKE_LOG_FORMAT="json", PULLWAKE_LOG_LEVEL="debug")
    server = await server_factory("--workers", workers, "--access-log")
    token, _ = await create_token(cli)
    async with client_for(server, token) as http:
        runner_id, url, path = await register_runner_and_entity(http)
        async with open_wakes(http, runner_id, "json-logs") as wakes:
            r = await http.post(f"{path}/messages", json={"payload": {"n": 1}})
            assert r.status_code == 202, r.text
            entry_id, wake = await wakes.next_wake()
            r = await http.post(
                f"/v1/runners/{runner_id}/claim",
                json={"wake_id": wake["wake_id"], "entry_id": entry_id},
            )
            assert r.status_code == 200, r.text
    await server.stop()

    records = json_lines(server.log())
    for record in records:
        assert {"ts", "level", "logger", "message"} <= record.keys(), record
        assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", record["ts"]), record
    loggers = {record["logger"] for record in records}
    assert {"pullwake", "uvicorn.error", "uvicorn.access"} <= loggers, loggers
    access = [r for r in records if r["logger"] == "uvicorn.access"]
    assert any("POST" in r["message"] and "/claim" in r["message"] for r in access), access
    claimed = [r for r in records if r["logger"] == "pullwake.core.claims"]
    assert claimed, records
    assert claimed[0]["runner"] == runner_id
    assert claimed[0]["entity"] == url
    assert claimed[0]["wake"] == wake["wake_id"]
    assert claimed[0]["claim"] == wake["wake_id"]  # a claim takes its wake's id
    assert claimed[0]["epoch"] == 1


async def test_text_logs_show_the_fields_as_key_value(
    server_factory: Callable[..., Awaitable[ServerProcess]],
    pw_env: dict[str, str],
    cli: Any,
) -> None:
    pw_env.update(PULLWAKE_LOG_LEVEL="INFO")
    server = await server_factory()
    token, _ = await create_token(cli)
    async with client_for(server, token) as http:
        runner_id, _url, _path = await register_runner_and_entity(http)
        async with open_wakes(http, runner_id, "text-logs"):
            pass
    await server.stop()
    log = server.log()
    assert re.search(
        rf"INFO  pullwake\.http\.wakestream: runner {runner_id} session text-logs connected "
        rf"to its wake stream runner={runner_id} session=text-logs$",
        log,
        re.MULTILINE,
    ), log
    assert "DEBUG" not in log


async def test_the_level_applies_to_uvicorn_too(
    server_factory: Callable[..., Awaitable[ServerProcess]],
    pw_env: dict[str, str],
) -> None:
    pw_env.update(PULLWAKE_LOG_LEVEL="warning", PULLWAKE_LOG_FORMAT="json")
    server = await server_factory("--access-log")
    async with client_for(server, "no-such-token") as http:
        assert (await http.get("/v1/runners")).status_code == 401
    await server.stop()
    records = json_lines(server.log())
    assert [r for r in records if r["level"] in ("DEBUG", "INFO")] == [], records
