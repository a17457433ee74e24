"""Helpers for testing pullwake and apps that embed it: a real server on a free port, and a
private ``redis-server`` that a test may stop and start again (empty)."""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import socket
import subprocess
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import uvicorn

from pullwake.http.plugin import DrainingServer

__all__ = ["RedisServer", "free_port", "serve_in_background"]


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


@contextlib.asynccontextmanager
async def serve_in_background(app: Any, *, host: str = "127.0.0.1") -> AsyncIterator[str]:
    """Run ``app`` under uvicorn in this event loop; yield its base URL; stop it on exit."""
    config = uvicorn.Config(
        app,
        host=host,
        port=free_port(),
        log_level="warning",
        lifespan="on",
        timeout_graceful_shutdown=1,
    )
    server = DrainingServer(config)
    task = asyncio.create_task(server.serve())
    try:
        while not server.started:
            if task.done():
                task.result()
                raise RuntimeError("server exited during start-up")
            await asyncio.sleep(0.01)
        yield f"http://{host}:{config.port}"
    finally:
        server.drain_and_exit()
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.wait_for(task, timeout=10)


class RedisServer:
    """A ``redis-server`` of one test on a fixed loopback port, without persistence: every
    :meth:`start` after a :meth:`stop` is a Redis restarted empty."""

    def __init__(self, directory: Path, port: int | None = None) -> None:
        self.directory = directory
        self.port = port or free_port()
        self.proc: subprocess.Popen[bytes] | None = None
        self.starts = 0

    @property
    def url(self) -> str:
        """The server's URL (database 0)."""
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self, timeout_s: float = 10) -> None:
        """Start the server and wait until it accepts connections."""
        program = shutil.which("redis-server")
        if program is None:
            raise RuntimeError("redis-server is not on PATH")
        self.starts += 1
        log = (self.directory / f"redis-{self.port}.log").open("ab")
        args = ["--port", str(self.port), "--bind", "127.0.0.1", "--save", ""]
        args += ["--appendonly", "no", "--dir", str(self.directory)]
        with log:
            self.proc = subprocess.Popen(
                [program, *args],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        deadline = time.monotonic() + timeout_s
        while not _accepts(self.port):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"redis-server on port {self.port} did not start")
            time.sleep(0.02)

    def stop(self) -> None:
        """Stop the server (its data is gone: nothing is saved)."""
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(5)


def _accepts(port: int) -> bool:
    with socket.socket() as sock:
        sock.settimeout(0.2)
        return sock.connect_ex(("127.0.0.1", port)) == 0
