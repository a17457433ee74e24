"""End to end: ``pullwake serve --workers 2``: two processes on one port, drained on SIGTERM."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import httpx
import pytest

from .harness import Cli, ServerProcess, open_wakes
from .test_processes import client_for, create_token, register_runner_and_entity

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc"),
]


def children(pid: int) -> list[int]:
    text = Path(f"/proc/{pid}/task/{pid}/children").read_text()
    return [int(child) for child in text.split()]


def listening_inode(port: int) -> str:
    """The inode of the socket listening on 127.0.0.1:``port`` (from /proc/net/tcp)."""
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        local, state, inode = fields[1], fields[3], fields[9]
        if state == "0A" and local == f"0100007F:{port:04X}":
            return inode
    raise AssertionError(f"nothing listens on 127.0.0.1:{port}")


def holds_socket(pid: int, inode: str) -> bool:
    fd_dir = Path(f"/proc/{pid}/fd")
    for fd in fd_dir.iterdir():
        try:
            if os.readlink(fd) == f"socket:[{inode}]":
                return True
        except OSError:
            continue
    return False


async def test_two_workers_share_the_port_and_end_wake_streams_on_sigterm(
    server_factory: Callable[..., Awaitable[ServerProcess]], cli: Cli
) -> None:
    server = await server_factory("--workers", "2")
    assert server.proc is not None
    parent = server.proc.pid
    inode = listening_inode(server.port)
    assert holds_socket(parent, inode)  # bound once, by the parent
    workers = [pid for pid in children(parent) if holds_socket(pid, inode)]
    assert len(workers) == 2, (children(parent), server.log())

    # the workers come up one after the other: wait until both answered the supervisor's
    # health check, i.e. both report "Application startup complete"
    deadline = time.monotonic() + 20
    while server.log().count("Application startup complete") < 2:
        assert time.monotonic() < deadline, server.log()
        await asyncio.sleep(0.1)

    async def one_request() -> int:
        # a connection per request, so the kernel hands them to either worker
        async with httpx.AsyncClient(base_url=server.base_url, timeout=10) as http:
            return (await http.get("/readyz")).status_code

    assert await asyncio.gather(*(one_request() for _ in range(20))) == [200] * 20

    token, _ = await create_token(cli)
    async with client_for(server, token) as http:
        runner_id, _url, path = await register_runner_and_entity(http)
        async with open_wakes(http, runner_id, "pool-1") as wakes:
            r = await http.post(f"{path}/messages", json={"payload": {"n": 1}})
            assert r.status_code == 202, r.text
            await wakes.next_wake()

            started = time.monotonic()
            code = await server.stop(signal.SIGTERM)
            stopped_in_s = time.monotonic() - started
            await wakes.wait_ended(timeout=2)

    log = server.log()
    assert code == 0, log
    assert stopped_in_s < 3, f"shutdown waited {stopped_in_s:.1f} s for the open stream\n{log}"
    assert "Traceback" not in log, log
    assert "2 worker processes, event loop uvloop, HTTP parser httptools" in log, log
    assert log.count("migrations:") == 1, log  # once, in the parent
    for pid in workers:
        assert not Path(f"/proc/{pid}").exists(), f"worker {pid} outlived the parent"
