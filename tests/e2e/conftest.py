"""Fixtures for the end-to-end tests: environment, CLI runner and server processes."""

from __future__ import annotations

import os
import secrets
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import asyncpg
import pytest
from redis.asyncio import Redis

from pullwake.testing import free_port

from .browser import CHROMIUM_ARGS, Tab, browser_missing, chromium_path, new_tab
from .harness import REDIS_URL, Cli, ServerProcess, child_env

if TYPE_CHECKING:
    from playwright.async_api import Browser

SCREENSHOT_DIRS = pytest.StashKey[list[Path]]()


@pytest.fixture
def key_prefix() -> str:
    return f"pwe2e{secrets.token_hex(4)}"


@pytest.fixture
async def pw_env(
    database_url: str, db: asyncpg.Connection, redis: Redis, key_prefix: str
) -> AsyncIterator[dict[str, str]]:
    """Environment of every child process: the test database (emptied before the test, as for
    integration tests: a worker would otherwise find an earlier test's claims and wakes and
    recover them), Redis and a unique key prefix."""
    yield child_env(
        PULLWAKE_DATABASE_URL=database_url,
        PULLWAKE_REDIS_URL=REDIS_URL,
        PULLWAKE_REDIS_KEY_PREFIX=key_prefix,
        # short Redis blocks and keep-alives so streams notice shutdowns quickly
        PULLWAKE_SSE_BLOCK_MS="200",
        PULLWAKE_SSE_KEEPALIVE_MS="1000",
    )
    keys = [key async for key in redis.scan_iter(match=f"{key_prefix}:*", count=500)]
    if keys:
        await redis.delete(*keys)


@pytest.fixture
def cli(pw_env: dict[str, str]) -> Cli:
    return Cli(pw_env)


@pytest.fixture
def server_factory(
    pw_env: dict[str, str], tmp_path: Path
) -> Iterator[Callable[..., Awaitable[ServerProcess]]]:
    """Start ``pullwake serve`` processes; every one is terminated (then killed) afterwards."""
    servers: list[ServerProcess] = []

    async def start(*args: str) -> ServerProcess:
        log_path = tmp_path / f"serve-{len(servers)}.log"
        server = ServerProcess(pw_env, free_port(), log_path, args=args)
        servers.append(server)
        await server.start()
        return server

    try:
        yield start
    finally:
        for server in servers:
            server.cleanup()


@pytest.fixture
async def server(server_factory: Callable[[], Awaitable[ServerProcess]]) -> ServerProcess:
    return await server_factory()


# --- the browser ---------------------------------------------------------------------------


@pytest.fixture
async def browser() -> AsyncIterator[Browser]:
    """The system's headless Chromium, launched for this test alone (a fresh profile); skips
    with the reason where there is none."""
    missing = browser_missing()
    if missing is not None:
        pytest.skip(f"no browser for the browser tests: {missing}")
    from playwright.async_api import async_playwright

    async with async_playwright() as playwright:
        launched = await playwright.chromium.launch(
            executable_path=chromium_path(), headless=True, args=CHROMIUM_ARGS
        )
        try:
            yield launched
        finally:
            await launched.close()


@pytest.fixture
def screenshot_dir(request: pytest.FixtureRequest, tmp_path: Path) -> Path:
    """``$PULLWAKE_SCREENSHOTS`` if set (shared by every test), else the test's own folder."""
    chosen = os.environ.get("PULLWAKE_SCREENSHOTS")
    folder = Path(chosen).resolve() if chosen else tmp_path / "screenshots"
    request.config.stash.setdefault(SCREENSHOT_DIRS, []).append(folder)
    return folder


@pytest.fixture
async def tab(browser: Browser, screenshot_dir: Path) -> AsyncIterator[Tab]:
    """A page in a fresh context; the test fails if the page reported any error."""
    page = await new_tab(browser, screenshot_dir)
    yield page
    await page.page.context.close()
    page.assert_no_errors()


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    """Name the folders that screenshots went to."""
    folders = terminalreporter.config.stash.get(SCREENSHOT_DIRS, [])
    written = sorted({str(f) for f in folders if f.is_dir() and any(f.glob("*.png"))})
    for folder in written:
        terminalreporter.write_line(f"browser screenshots: {folder}")
