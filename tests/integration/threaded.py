"""An event loop on its own thread, for synchronous tests (hypothesis state machines,
schemathesis) that drive pullwake's async services or a live server."""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import Coroutine
from typing import Any, TypeVar

from pullwake.config import Settings
from pullwake.http import create_app
from pullwake.services import Services
from pullwake.testing import serve_in_background

T = TypeVar("T")


class LoopThread:
    """Runs coroutines on a private event loop in a daemon thread."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()

    def run(self, coro: Coroutine[Any, Any, T], timeout: float = 30) -> T:
        """Run ``coro`` on the loop and wait for its result."""
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def close(self) -> None:
        """Stop the loop and join the thread."""
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(timeout=10)
        self.loop.close()


class ThreadedServer:
    """pullwake served by uvicorn on a :class:`LoopThread`; ``services`` are the app's own."""

    def __init__(self, settings: Settings) -> None:
        self.loop = LoopThread()
        self.app = create_app(settings)
        self._stack = contextlib.AsyncExitStack()
        self.base_url: str = self.loop.run(self._stack.enter_async_context(self._serve()))

    @contextlib.asynccontextmanager
    async def _serve(self) -> Any:
        async with serve_in_background(self.app) as base_url:
            yield base_url

    @property
    def services(self) -> Services:
        """The running app's services (use them through :meth:`run`)."""
        services: Services = self.app.state["pullwake"]
        return services

    def run(self, coro: Coroutine[Any, Any, T], timeout: float = 30) -> T:
        """Run ``coro`` on the server's loop."""
        return self.loop.run(coro, timeout)

    def close(self) -> None:
        """Stop the server and its loop."""
        try:
            self.loop.run(self._stack.aclose())
        finally:
            self.loop.close()
