"""A headless Chromium for the end-to-end tests, driven by Playwright for Python.

The browser is the system's own (Debian's ``chromium``; ``PULLWAKE_CHROMIUM`` names another
binary): Playwright's own browser builds are never downloaded. Where there is none, or Playwright
is not installed, :func:`browser_missing` says why and the ``browser`` fixture skips with that.

Every :class:`Tab` records the page's JavaScript console errors, uncaught exceptions and failed
requests; :meth:`Tab.assert_no_errors` fails on any, and the ``tab`` fixture checks once more when
the test ends. ``confirm()`` / ``alert()`` dialogs are accepted and recorded. Screenshots (PNG, the
full page, a 1200x800 viewport) go to ``$PULLWAKE_SCREENSHOTS`` when set (``docs/screenshots``
refreshes the README's), else to a folder of the test's own under pytest's temporary directory;
the terminal summary names the folders.
"""

from __future__ import annotations

import os
import shutil
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from playwright.async_api import Browser, ConsoleMessage, Dialog, Page, Request

DEFAULT_CHROMIUM = "/usr/bin/chromium"
VIEWPORT = {"width": 1200, "height": 800}
# Chromium's flags for a root user in a container: no sandbox (it needs user namespaces), no
# /dev/shm limits, no first-run or background network chatter.
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-dev-shm-usage",
    "--disable-gpu",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
]


def chromium_path() -> str:
    """The Chromium binary the tests use: ``$PULLWAKE_CHROMIUM``, else Debian's."""
    return os.environ.get("PULLWAKE_CHROMIUM") or DEFAULT_CHROMIUM


def browser_missing() -> str | None:
    """Why no browser test can run here (``None`` when one can)."""
    try:
        import playwright.async_api  # noqa: F401
    except ImportError:
        return "Playwright for Python is not installed (it is in pyproject's dev group)"
    return chromium_missing()


def chromium_missing() -> str | None:
    """Why there is no Chromium binary to run (``None`` when there is)."""
    binary = chromium_path()
    found = shutil.which(binary)
    if found is None or not os.access(found, os.X_OK):
        return (
            f"no Chromium at {binary} (install Debian's chromium and chromium-driver, as .ci/run "
            "does, or name a binary in PULLWAKE_CHROMIUM)"
        )
    return None


@dataclass
class Tab:
    """One page of a fresh browser profile, with everything that went wrong on it recorded."""

    page: Page
    shots: Path
    base_url: str = ""
    errors: list[str] = field(default_factory=list)
    dialogs: list[str] = field(default_factory=list)
    taken: list[Path] = field(default_factory=list)

    def watch(self) -> None:
        """Record console errors, page errors and failed requests; accept every dialog."""
        self.page.on("console", self._console)
        self.page.on("pageerror", lambda exc: self.errors.append(f"page error: {exc}"))
        self.page.on("requestfailed", self._request_failed)
        self.page.on("dialog", self._dialog)

    def _console(self, message: ConsoleMessage) -> None:
        where = message.location
        if message.type == "error":
            self.errors.append(
                f"console error at {where.get('url')}:{where.get('lineNumber')}: {message.text}"
            )

    def _request_failed(self, request: Request) -> None:
        failure = request.failure or "failed"
        # A navigation away from a page aborts its open requests (htmx polls among them).
        if "ERR_ABORTED" not in failure:
            self.errors.append(f"request failed: {request.method} {request.url}: {failure}")

    async def _dialog(self, dialog: Dialog) -> None:
        self.dialogs.append(f"{dialog.type}: {dialog.message}")
        await dialog.accept()

    async def goto(self, path: str) -> None:
        """Open ``path`` (relative to ``base_url``); fails on an HTTP error status."""
        response = await self.page.goto(self.base_url + path, wait_until="load")
        assert response is not None, path
        assert response.ok, f"GET {path}: {response.status} {await response.text()}"

    async def screenshot(self, name: str) -> Path:
        """A full-page PNG ``<name>.png`` in the screenshot folder."""
        self.shots.mkdir(parents=True, exist_ok=True)
        path = self.shots / f"{name}.png"
        await self.page.screenshot(path=str(path), full_page=True)
        self.taken.append(path)
        return path

    def assert_no_errors(self) -> None:
        """Fail with every console error, page error and failed request seen so far."""
        assert not self.errors, "the page reported errors:\n" + "\n".join(self.errors)


async def wait_for(
    check: Callable[[], Awaitable[Any]],
    *,
    timeout: float,
    what: str,
    interval: float = 0.1,
) -> Any:
    """Poll ``check`` until it returns something truthy (returned); fail after ``timeout``."""
    import asyncio

    deadline = time.monotonic() + timeout
    last: Any = None
    while True:
        last = await check()
        if last:
            return last
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not within {timeout} s (last: {last!r})")
        await asyncio.sleep(interval)


async def new_tab(browser: Browser, shots: Path, base_url: str = "") -> Tab:
    """A page in a new browser context (its own cookies and storage: a fresh profile)."""
    context = await browser.new_context(viewport=VIEWPORT)  # type: ignore[arg-type]
    context.set_default_timeout(15_000)
    tab = Tab(await context.new_page(), shots, base_url)
    tab.watch()
    return tab
