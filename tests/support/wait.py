"""Polling until a condition holds, for the tests that wait on other processes or loops."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import Any


async def wait_for(
    check: Callable[[], Awaitable[Any]],
    *,
    timeout: float = 5.0,
    interval: float = 0.02,
    what: str = "condition",
    context: Callable[[], str] | None = None,
) -> Any:
    """Poll ``check`` until it returns something truthy (returned), or fail after ``timeout``
    seconds naming ``what``, the last value and ``context()`` (logs, say)."""
    deadline = time.monotonic() + timeout
    while True:
        value = await check()
        if value:
            return value
        if time.monotonic() > deadline:
            message = f"{what} not met within {timeout}s (last value {value!r})"
            raise AssertionError(message + (f"\n{context()}" if context else ""))
        await asyncio.sleep(interval)
