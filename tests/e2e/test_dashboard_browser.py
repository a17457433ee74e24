"""The dashboard in a real browser, against a running stack with seeded data.

``pullwake serve`` (the dashboard at ``/ui``), ``pullwake worker`` and, where a test needs one,
``pullwake runner`` run as real processes on the shared test Postgres and Redis (the test's own
key prefix and principals). The state is seeded through the HTTP API as a user would make it;
the browser then checks what a person sees: the login form, every page without a JavaScript
error (each screenshotted), the overview's numbers, sorting, the confirmed actions (disable,
enable, resume, pause), a parked entity on Stuck resumed from the page and running again, a
killed runner turning ``expired`` without a reload, a revoked token sending an open tab to the
login form, one principal not seeing another's runner, and ``pullwake dev`` without a login.
"""

from __future__ import annotations

import os
import re
import secrets
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import asyncpg
import httpx
import pytest

from pullwake.testing import free_port

from .browser import Tab, wait_for
from .harness import PULLWAKE, Cli, ServerProcess, WorkerProcess, open_wakes, stop_process
from .runner_procs import RunnerProcess

if TYPE_CHECKING:
    from playwright.async_api import Locator

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(60)]

E2E_DIR = Path(__file__).resolve().parent
UI = "/ui"
MAX_ATTEMPTS = 2  # claims ending without progress before an entity is parked
RUNNER_LEASE_MS = 3_000  # the longest liveness lease the kill test's server grants
POLL_S = 2  # the dashboard's htmx polling interval


def uid(prefix: str) -> str:
    return f"{prefix}-{secrets.token_hex(3)}"


# --- the stack -----------------------------------------------------------------------------


@dataclass
class Stack:
    """One test's ``pullwake serve`` + ``pullwake worker`` and the runners it starts."""

    env: dict[str, str]
    tmp: Path
    server: ServerProcess
    worker: WorkerProcess
    runners: list[RunnerProcess] = field(default_factory=list)

    @property
    def ui(self) -> str:
        return self.server.base_url + UI

    async def token(self, principal: str) -> str:
        """A new API token of ``principal`` (``pullwake tokens create``)."""
        args = ("tokens", "create", "--principal", principal, "--label", "browser")
        result = (await Cli(self.env)(*args)).ok()
        token = result.stdout.strip()
        assert token.startswith("pwk_"), result.describe()
        return token

    def api(self, token: str) -> httpx.AsyncClient:
        return httpx.AsyncClient(
            base_url=self.server.base_url,
            headers={"Authorization": f"Bearer {token}"},
            timeout=10,
        )

    def runner(self, token: str, *args: str, quick: bool = False) -> RunnerProcess:
        """``pullwake runner`` (with ``quick``: heartbeats every second, see quick_runner.py)."""
        env = {
            **self.env,
            "PULLWAKE_SERVER_URL": self.server.base_url,
            "PULLWAKE_TOKEN": token,
            "PYTHONPATH": os.pathsep.join([str(E2E_DIR), *sys.path]),
        }
        log = self.tmp / f"runner-{len(self.runners)}.log"
        proc = (QuickRunner if quick else RunnerProcess)(list(args), env, log, self.tmp)
        self.runners.append(proc)
        proc.start()
        return proc


class QuickRunner(RunnerProcess):
    """``pullwake runner`` through tests/e2e/quick_runner.py: a 1 s heartbeat, a 3 s lease."""

    def start(self) -> None:
        with self.log_path.open("ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, str(E2E_DIR / "quick_runner.py"), *self.args],
                env=self.env,
                cwd=self.cwd,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
            )


StackFactory = Callable[..., Awaitable[Stack]]


@pytest.fixture
async def stack_factory(pw_env: dict[str, str], tmp_path: Path) -> AsyncIterator[StackFactory]:
    """Start a stack with extra ``PULLWAKE_*`` settings; everything is stopped afterwards."""
    stacks: list[Stack] = []

    async def start(**settings: str) -> Stack:
        env = {
            **pw_env,
            "PULLWAKE_DASHBOARD_PATH": UI,
            "PULLWAKE_MAX_ATTEMPTS": str(MAX_ATTEMPTS),
            "PULLWAKE_RECOVERY_INTERVAL_MS": "200",
            **settings,
        }
        server = ServerProcess(env, free_port(), tmp_path / "serve.log")
        worker = WorkerProcess(
            {**env, "PULLWAKE_PUBLIC_URL": server.base_url}, tmp_path / "worker.log"
        )
        stack = Stack({**env, "PULLWAKE_PUBLIC_URL": server.base_url}, tmp_path, server, worker)
        stacks.append(stack)
        await server.start()
        worker.start()
        await worker.wait_ready()
        return stack

    try:
        yield start
    finally:
        for stack in stacks:
            for runner in stack.runners:
                runner.cleanup()
            stack.worker.cleanup()
            stack.server.cleanup()


# --- seeding through the API ---------------------------------------------------------------


async def register(http: httpx.AsyncClient, runner_id: str) -> None:
    r = await http.post("/v1/runners", json={"id": runner_id, "label": runner_id, "kind": "ci"})
    assert r.status_code == 201, r.text


async def heartbeat(http: httpx.AsyncClient, runner_id: str, lease_ms: int) -> None:
    r = await http.post(f"/v1/runners/{runner_id}/heartbeat", json={"lease_ms": lease_ms})
    assert r.status_code == 200, r.text


async def liveness(http: httpx.AsyncClient, runner_id: str) -> str:
    r = await http.get(f"/v1/runners/{runner_id}")
    assert r.status_code == 200, r.text
    return str(r.json()["liveness"])


async def entity(http: httpx.AsyncClient, target: dict[str, Any], kind: str = "job") -> str:
    """A new entity of type ``kind`` dispatching to ``target``: its ``/{type}/{id}``."""
    url = f"/{kind}/{uid('e')}"
    r = await http.put(f"/v1/entities{url}", json={"dispatch_policy": {"targets": [target]}})
    assert r.status_code == 201, r.text
    return url


def to_runner(runner_id: str) -> dict[str, Any]:
    return {"type": "runner", "runner_id": runner_id}


async def send(http: httpx.AsyncClient, url: str, payload: Any) -> dict[str, Any]:
    r = await http.post(f"/v1/entities{url}/messages", json={"payload": payload})
    assert r.status_code == 202, r.text
    return r.json()  # type: ignore[no-any-return]


async def dispatch(http: httpx.AsyncClient, url: str) -> dict[str, Any]:
    r = await http.get(f"/v1/entities{url}")
    assert r.status_code == 200, r.text
    return r.json()  # type: ignore[no-any-return]


async def claim(http: httpx.AsyncClient, runner_id: str, wakes: Any) -> dict[str, Any]:
    """Claim the next wake on the open stream ``wakes``: the notification."""
    entry_id, data = await wakes.next_wake()
    r = await http.post(
        f"/v1/runners/{runner_id}/claim", json={"wake_id": data["wake_id"], "entry_id": entry_id}
    )
    assert r.status_code == 200, r.text
    return r.json()  # type: ignore[no-any-return]


async def release(http: httpx.AsyncClient, note: dict[str, Any], error: str) -> bool:
    """Release a claim without progress; whether a next wake was made."""
    r = await http.post(
        note["callbacks"]["release"],
        json={"epoch": note["epoch"], "error": error},
        headers={"Authorization": f"Bearer {note['claim_token']}"},
    )
    assert r.status_code == 200, r.text
    return bool(r.json()["next_wake"])


# --- the browser side ----------------------------------------------------------------------


async def log_in(tab: Tab, stack: Stack, token: str) -> None:
    """Log in through the form; the overview follows."""
    tab.base_url = stack.ui
    await tab.goto("/login")
    await tab.page.fill("input[name=token]", token)
    await tab.page.click("[data-testid=login-submit]")
    # the overview's numbers (the nav links are on the login page too)
    await tab.page.get_by_test_id("runners-online").wait_for()
    assert "/login" not in tab.page.url, tab.page.url


async def text(tab: Tab, selector: str) -> str:
    return (await tab.page.locator(selector).first.text_content() or "").strip()


def numbers(shown: str) -> list[float]:
    return [float(n) for n in re.findall(r"\d+(?:\.\d+)?", shown)]


async def shows_number(tab: Tab, testid: str, expected: int, timeout: float = 10) -> None:
    """The element ``data-testid=testid`` shows ``expected`` (its only number), polling."""

    async def check() -> bool:
        return numbers(await text(tab, f"[data-testid={testid}]")) == [expected]

    await wait_for(check, timeout=timeout, what=f"{testid} showing {expected}")


async def shows_text(locator: Locator, expected: str, timeout: float) -> None:
    """``locator`` shows ``expected`` within ``timeout`` seconds, as the page updates itself.
    (Playwright's own polling: the dashboard's CSP forbids the eval behind wait_for_function.)"""
    from playwright.async_api import expect

    await expect(locator).to_have_text(expected, timeout=timeout * 1000)


async def runner_ids(tab: Tab) -> list[str]:
    """The Runners table's rows, in order."""
    rows = tab.page.locator("tr[data-runner-id]")
    found = [await rows.nth(i).get_attribute("data-runner-id") for i in range(await rows.count())]
    return [str(runner_id) for runner_id in found]


async def liveness_cell(tab: Tab, runner_id: str) -> str:
    shown = await text(tab, f'tr[data-runner-id="{runner_id}"] [data-testid=liveness]')
    return shown


# --- the tests -----------------------------------------------------------------------------


async def test_log_in_with_a_token_through_the_form(
    stack_factory: StackFactory, tab: Tab, screenshot_dir: Path
) -> None:
    stack = await stack_factory()
    token = await stack.token(f"user:{uid('login')}@example.com")
    tab.base_url = stack.ui

    # Not logged in: a page sends the browser to the login form.
    response = await tab.page.goto(stack.ui + "/runners")
    assert response is not None
    await tab.page.locator("input[name=token]").wait_for()
    assert await tab.page.get_by_test_id("runners-table").count() == 0
    await tab.screenshot("login")

    await tab.page.fill("input[name=token]", "pwk_" + "x" * 43)
    await tab.page.click("[data-testid=login-submit]")
    error = tab.page.get_by_test_id("login-error")
    await error.wait_for()
    assert (await error.text_content() or "").strip(), "the login error says nothing"
    await tab.screenshot("login-error")
    tab.errors[:] = [e for e in tab.errors if not re.search(r"\b40[13]\b", e)]

    await tab.page.fill("input[name=token]", token)
    await tab.page.click("[data-testid=login-submit]")
    await tab.page.get_by_test_id("runners-online").wait_for()
    assert await tab.page.get_by_test_id("login-error").count() == 0
    cookies = await tab.page.context.cookies()
    session = [c for c in cookies if c["httpOnly"]]
    assert session, f"no HttpOnly session cookie: {cookies}"
    assert all(c["sameSite"] == "Strict" for c in session), session
    assert not any(token in c["value"] for c in cookies), "the raw token is in a cookie"
    await tab.goto("/runners")
    await tab.page.get_by_test_id("runners-table").wait_for()
    tab.assert_no_errors()


async def test_every_page_shows_the_seeded_state(
    stack_factory: StackFactory, tab: Tab, database_url: str
) -> None:
    stack = await stack_factory(
        PULLWAKE_CLAIM_LEASE_MS="300000",  # the seeded claim stays active through the test
        PULLWAKE_WEBHOOK_ALLOW_PRIVATE="1",
        PULLWAKE_WEBHOOK_MAX_ATTEMPTS="1",
    )
    token = await stack.token(f"user:{uid('ops')}@example.com")
    online, expired, offline = uid("online"), uid("expired"), uid("offline")
    async with stack.api(token) as http:
        for runner_id in (online, expired, offline):
            await register(http, runner_id)
        await heartbeat(http, online, 600_000)
        await heartbeat(http, expired, 1_000)

        # one wake outstanding (its runner never came), two minutes old
        waiting = await entity(http, to_runner(offline))
        await send(http, waiting, {"n": 1})
        conn = await asyncpg.connect(database_url)
        try:
            await conn.execute(
                "UPDATE wakes SET created_at = created_at - interval '2 minutes' "
                "WHERE entity_url = $1",
                waiting,
            )
        finally:
            await conn.close()

        # one active claim, one entity parked by claims ending without progress
        busy, poison = await entity(http, to_runner(online)), await entity(http, to_runner(online))
        async with open_wakes(http, online, "seed-session") as wakes:
            await send(http, busy, {"n": 1})
            held = await claim(http, online, wakes)
            assert held["entity"]["url"] == busy
            await send(http, poison, {"n": 1})
            for attempt in range(1, MAX_ATTEMPTS + 1):
                note = await claim(http, online, wakes)
                assert note["entity"]["url"] == poison
                assert await release(http, note, f"boom {attempt}") is (attempt < MAX_ATTEMPTS)
        assert (await dispatch(http, poison))["dispatch"]["parked_reason"]

        # one dead letter: a webhook nobody answers (its entity is parked too)
        hook = {"type": "webhook", "url": f"http://127.0.0.1:{free_port()}/hook"}
        dead = await entity(http, {**hook, "secret": "s" * 24}, kind="hook")
        await send(http, dead, {"n": 1})

        async def dead_lettered() -> bool:
            return bool((await dispatch(http, dead))["dispatch"]["parked_reason"])

        await wait_for(dead_lettered, timeout=20, what="the webhook wake dead-lettered")

        async def lease_passed() -> bool:
            return await liveness(http, expired) == "expired"

        await wait_for(lease_passed, timeout=5, what="the short lease passing")

    await log_in(tab, stack, token)

    # Overview
    page = tab.page
    for testid, expected in {
        "runners-online": 1,
        "runners-expired": 1,
        "runners-offline": 1,
        "outstanding-wakes": 1,
        "active-claims": 1,
        "parked-entities": 2,
        "dead-letters": 1,
    }.items():
        await shows_number(tab, testid, expected)
    age = await text(tab, "[data-testid=oldest-wake-age]")
    assert re.search(r"\b2\s*m|\b1[2-9]\d\s*s", age), f"oldest wake age shown as {age!r}"
    await page.locator("svg[data-testid=rate-chart]").wait_for()
    await tab.screenshot("overview")

    # Runners: one row each, liveness as seeded
    await page.get_by_test_id("nav-runners").click()
    await page.get_by_test_id("runners-table").wait_for()
    assert sorted(await runner_ids(tab)) == sorted([online, expired, offline])
    for runner_id, state in ((online, "online"), (expired, "expired"), (offline, "offline")):
        assert await liveness_cell(tab, runner_id) == state, runner_id
    await tab.screenshot("runners")
    # sortable: the runner column's header turns the order around, the liveness one sorts by it
    ascending = await runner_ids(tab)
    await page.locator("th a", has_text="Runner").click()
    await page.wait_for_url(re.compile(r"sort=id&dir=desc"))
    assert await runner_ids(tab) == ascending[::-1]
    await page.locator("th a", has_text="Liveness").click()
    await page.wait_for_url(re.compile(r"sort=liveness"))
    assert sorted(await runner_ids(tab)) == sorted(ascending)

    # Runner: its consumer (the seeding session) and its recent wakes
    await tab.goto(f"/runners/{online}")
    assert "seed-session" in await text(tab, "[data-testid=consumers]")
    await page.get_by_test_id("pending").wait_for()
    recent = await text(tab, "[data-testid=recent-wakes]")
    assert held["wake_id"] in recent or busy in recent, recent
    await tab.screenshot("runner")
    # disable and enable again from the page, each confirmed, each seen by the API
    async with stack.api(token) as http:
        for action, status in (("disable", "disabled"), ("enable", "enabled")):
            await page.locator(f'[data-action="{action}"]').click()

            async def admin_status(wanted: str = status) -> bool:
                r = await http.get(f"/v1/runners/{online}")
                return bool(r.json()["admin_status"] == wanted)

            await wait_for(admin_status, timeout=10, what=f"the runner {status}")
    assert [d for d in tab.dialogs if "Disable" in d or "Enable" in d], tab.dialogs

    # Entity: the parked one, with its reason and its story
    await tab.goto(f"/entities{poison}")
    assert await text(tab, "[data-testid=entity-status]")
    reason = await text(tab, "[data-testid=parked-reason]")
    assert str(MAX_ATTEMPTS) in reason or "progress" in reason, reason
    assert "boom" in await text(tab, "[data-testid=timeline]")
    for action in ("resume", "pause", "stop", "kill"):
        assert await page.locator(f'[data-action="{action}"]').count() >= 1, action
    await tab.screenshot("entity")

    # Stuck: both parked entities, each with a resume button
    await page.get_by_test_id("nav-stuck").click()
    parked = page.get_by_test_id("stuck-parked")
    await parked.wait_for()
    for url in (poison, dead):
        await parked.locator(f'tr[data-entity="{url}"] button[data-action="resume"]').wait_for()
    await tab.screenshot("stuck")
    tab.assert_no_errors()


async def test_resuming_a_parked_entity_from_stuck_makes_it_run_again(
    stack_factory: StackFactory, tab: Tab
) -> None:
    stack = await stack_factory()
    token = await stack.token(f"user:{uid('resume')}@example.com")
    broken = stack.tmp / "handler-broken"
    broken.touch()
    box = uid("box")
    # The handler fails while the flag file exists: the operator "fixes" it by removing it.
    command = f"cat >/dev/null; test ! -e {broken}"
    runner = stack.runner(token, "--id", box, "--exec", command, "--retry-delay-ms", "0")
    await runner.wait_log(f"runner {box} connected")
    async with stack.api(token) as http:
        job = await entity(http, to_runner(box))
        await send(http, job, {"n": 1})

        async def parked() -> bool:
            return bool((await dispatch(http, job))["dispatch"]["parked_reason"])

        await wait_for(parked, timeout=20, what="the failing entity parked")

        await log_in(tab, stack, token)
        await tab.page.get_by_test_id("nav-stuck").click()
        row = tab.page.locator(f'[data-testid=stuck-parked] tr[data-entity="{job}"]')
        await row.wait_for()
        await tab.screenshot("stuck-before-resume")

        broken.unlink()
        await row.locator('button[data-action="resume"]').click()

        async def ran_again() -> dict[str, Any] | None:
            view = await dispatch(http, job)
            return view if view["dispatch"]["acked_offset"] == 1 else None

        view = await wait_for(ran_again, timeout=20, what="the resumed entity run and acked")
        assert view["dispatch"]["parked_reason"] is None
        assert any(d.startswith("confirm") for d in tab.dialogs), tab.dialogs
        # the page follows without a reload: the row leaves Stuck
        await row.wait_for(state="detached", timeout=(POLL_S + 8) * 1000)
        await tab.goto(f"/entities{job}")
        assert await tab.page.get_by_test_id("parked-reason").count() == 0
        await tab.screenshot("entity-resumed")

        # pause from the entity page: the API and then the page (on its next poll) say paused
        await tab.page.locator('[data-action="pause"]').click()

        async def paused() -> bool:
            return bool((await dispatch(http, job))["status"] == "paused")

        await wait_for(paused, timeout=10, what="the entity paused")
        await shows_text(tab.page.get_by_test_id("entity-status"), "paused", POLL_S + 5)
    tab.assert_no_errors()


async def test_a_killed_runner_turns_expired_without_a_reload(
    stack_factory: StackFactory, tab: Tab
) -> None:
    stack = await stack_factory(PULLWAKE_MAX_RUNNER_LEASE_MS=str(RUNNER_LEASE_MS))
    token = await stack.token(f"user:{uid('kill')}@example.com")
    box = uid("doomed")
    runner = stack.runner(token, "--id", box, "--exec", "cat >/dev/null", quick=True)
    await runner.wait_log(f"runner {box} connected")
    async with stack.api(token) as http:

        async def online() -> bool:
            return await liveness(http, box) == "online"

        await wait_for(online, timeout=10, what="the runner online")

    await log_in(tab, stack, token)
    await tab.page.get_by_test_id("nav-runners").click()
    cell = tab.page.locator(f'tr[data-runner-id="{box}"] [data-testid=liveness]')
    await cell.wait_for()
    assert (await cell.text_content() or "").strip() == "online"
    await tab.screenshot("runners-before-kill")
    await tab.page.evaluate("window.__notReloaded = true")

    assert runner.proc is not None
    runner.proc.send_signal(signal.SIGKILL)
    runner.proc.wait(5)
    killed = time.monotonic()
    budget_s = RUNNER_LEASE_MS / 1000 + 2 * POLL_S + 3  # the lease, a poll, a slow poll
    await shows_text(cell, "expired", budget_s)
    took = time.monotonic() - killed
    assert await tab.page.evaluate("window.__notReloaded === true"), "the page was reloaded"
    print(f"killed runner shown expired after {took:.1f} s (lease {RUNNER_LEASE_MS} ms)")
    await tab.screenshot("runners-after-kill")
    tab.assert_no_errors()


async def test_a_principal_does_not_see_another_principals_runner(
    stack_factory: StackFactory, tab: Tab
) -> None:
    stack = await stack_factory()
    alice, bob = f"user:{uid('alice')}@example.com", f"user:{uid('bob')}@example.com"
    alice_token, bob_token = await stack.token(alice), await stack.token(bob)
    mine, theirs = uid("alice-box"), uid("bob-box")
    async with stack.api(alice_token) as http:
        await register(http, mine)
        await heartbeat(http, mine, 600_000)
    async with stack.api(bob_token) as http:
        await register(http, theirs)
        await heartbeat(http, theirs, 600_000)
        bobs_job = await entity(http, to_runner(theirs))
        await send(http, bobs_job, {"secret": "bob's"})

    await log_in(tab, stack, alice_token)
    await shows_number(tab, "runners-online", 1)
    await shows_number(tab, "outstanding-wakes", 0)
    await tab.page.get_by_test_id("nav-runners").click()
    await tab.page.get_by_test_id("runners-table").wait_for()
    assert await runner_ids(tab) == [mine]
    assert theirs not in (await tab.page.content())

    for path in (f"/runners/{theirs}", f"/entities{bobs_job}"):
        response = await tab.page.goto(stack.ui + path)
        assert response is not None
        assert response.status in (403, 404), f"{path}: {response.status}"
        assert "bob's" not in await tab.page.content()
    # the browser logs each refused page load as a console error: expected here
    tab.errors[:] = [e for e in tab.errors if not re.search(r"\b40[34]\b", e)]
    tab.assert_no_errors()


async def test_a_tab_left_open_goes_to_the_login_form_when_its_token_is_revoked(
    stack_factory: StackFactory, tab: Tab
) -> None:
    stack = await stack_factory(PULLWAKE_AUTH_CACHE_TTL_MS="1000")
    token = await stack.token(f"user:{uid('revoked')}@example.com")
    await log_in(tab, stack, token)
    await tab.page.get_by_test_id("nav-runners").click()
    await tab.page.get_by_test_id("runners-table").wait_for()
    (await Cli(stack.env)("tokens", "revoke", token)).ok()
    # the next poll finds the session's token revoked and sends the page to the login form
    await tab.page.wait_for_url(re.compile(r"/login"), timeout=(POLL_S + 1 + 5) * 1000)
    await tab.page.locator("input[name=token]").wait_for()
    notice = await text(tab, "[data-testid=login-notice]")
    assert "revoked" in notice, f"the login form says {notice!r}"
    await tab.screenshot("login-after-revoke")
    tab.assert_no_errors()


async def test_pullwake_dev_serves_the_dashboard_without_a_login(
    pw_env: dict[str, str], tmp_path: Path, tab: Tab
) -> None:
    port = free_port()
    log_path = tmp_path / "dev.log"
    with log_path.open("wb") as log:
        proc = subprocess.Popen(
            [*PULLWAKE, "dev", "--port", str(port), "--data-dir", str(tmp_path), "--no-demo"],
            env=pw_env,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    try:
        base = f"http://127.0.0.1:{port}"

        async def printed_the_dashboard() -> bool:
            assert proc.poll() is None, log_path.read_text()
            return f"{base}{UI}/" in log_path.read_text()

        await wait_for(printed_the_dashboard, timeout=30, what="pullwake dev's dashboard URL")
        tab.base_url = base + UI
        await tab.goto("/")  # no login form: dev mode's identity, system:dev-local
        await tab.page.get_by_test_id("runners-online").wait_for()
        assert await tab.page.locator("input[name=token]").count() == 0
        await tab.screenshot("dev-overview")
        # The demo runner is the dev token's principal's, the one dev mode's dashboard shows.
        await tab.goto("/runners")
        cell = tab.page.locator('tr[data-runner-id="dev-runner"] [data-testid=liveness]')

        async def demo_runner_online() -> bool:
            return await cell.count() == 1 and (await cell.text_content() or "").strip() == (
                "online"
            )

        await wait_for(demo_runner_online, timeout=20, what="the demo runner online")
        await tab.screenshot("dev-runners")
        tab.assert_no_errors()
    finally:
        await stop_process(proc, signal.SIGINT, timeout=20, log=log_path.read_text)
