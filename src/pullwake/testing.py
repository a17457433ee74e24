"""Helpers for testing pullwake and apps that embed it: a real server on a free port."""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import AsyncIterator
from typing import Any

import uvicorn

from pullwake.http.plugin import DrainingServer

__all__ = ["free_port", "serve_in_background"]


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
