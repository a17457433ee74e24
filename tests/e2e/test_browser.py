"""The browser harness itself: it sees what goes wrong on a page, Swagger UI loads cleanly in it,
and it skips with a reason where no browser is installed."""

from __future__ import annotations

from typing import TYPE_CHECKING

import pytest

from .browser import Tab, chromium_missing
from .harness import ServerProcess

if TYPE_CHECKING:
    from playwright.async_api import Route

pytestmark = pytest.mark.e2e

BROKEN_PAGE = """<!doctype html>
<title>broken</title>
<p>broken on purpose</p>
<script>console.error("logged by the page"); console.log("only a log line")</script>
<script src="/no-such-script.js"></script>
<script>setTimeout(() => { throw new Error("thrown later") }, 0)</script>
"""


async def test_the_harness_records_console_errors_page_errors_and_failed_loads(
    tab: Tab, server: ServerProcess
) -> None:
    async def serve_broken(route: Route) -> None:
        await route.fulfill(status=200, content_type="text/html", body=BROKEN_PAGE)

    await tab.page.route(server.base_url + "/broken", serve_broken)
    tab.base_url = server.base_url
    await tab.goto("/broken")
    await tab.page.wait_for_function("document.readyState === 'complete'")
    await tab.page.wait_for_timeout(200)  # let the deferred throw happen
    seen = "\n".join(tab.errors)
    assert "logged by the page" in seen
    assert "only a log line" not in seen
    assert "thrown later" in seen
    assert "404" in seen  # Chromium logs the failed script load as a console error
    with pytest.raises(AssertionError, match="the page reported errors"):
        tab.assert_no_errors()
    tab.errors.clear()  # seen on purpose: the fixture's own check passes

    await tab.page.set_content("<button onclick=\"confirm('sure?') && (this.textContent='yes')\">")
    await tab.page.click("button")
    assert await tab.page.text_content("button") == "yes"
    assert tab.dialogs == ["confirm: sure?"]


async def test_swagger_ui_loads_offline_without_console_errors(
    tab: Tab, server: ServerProcess
) -> None:
    tab.base_url = server.base_url
    external: list[str] = []
    tab.page.on(
        "request",
        lambda r: None if r.url.startswith(server.base_url) else external.append(r.url),
    )
    await tab.goto("/schema")
    title = tab.page.locator(".swagger-ui .info .title")
    await title.wait_for()
    assert "pullwake" in (await title.text_content() or "")
    # the operations rendered, one block per route
    await tab.page.locator(".opblock").first.wait_for()
    assert await tab.page.locator(".opblock").count() > 10
    shot = await tab.screenshot("swagger-ui")
    assert shot.read_bytes().startswith(b"\x89PNG")
    assert external == [], "Swagger UI fetched from outside the server"
    tab.assert_no_errors()


def test_no_browser_is_a_skip_with_the_reason(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PULLWAKE_CHROMIUM", "/nonexistent/chromium")
    reason = chromium_missing()
    assert reason is not None
    assert "no Chromium at /nonexistent/chromium" in reason
    assert "chromium-driver" in reason
