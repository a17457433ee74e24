"""The operator dashboard over a live server: login and sessions (cookie flags, CSRF, revoked
tokens), what each principal sees (and does not), every page and fragment over seeded state, the
actions going through the API's use cases, one query per refresh, static assets, and where the
dashboard is served (off by default)."""

from __future__ import annotations

import asyncio
import html
import re
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import asyncpg
import httpx
import pytest
from litestar import Request
from redis.asyncio import Redis

from pullwake.config import Settings
from pullwake.http import create_app
from pullwake.http.plugin import PullWakeConfig
from pullwake.model import Principal
from pullwake.store import q
from pullwake.testing import serve_in_background

from .helpers import (
    ALICE,
    BOB,
    Entity,
    append_event,
    claim_ok,
    create_entity,
    get_entity,
    read_sse,
    read_wake,
    register_runner,
    release,
    send,
    signal,
    uid,
    wakes_of,
)

MAX_ATTEMPTS = 2
UI = "/ui"


@pytest.fixture
def server_settings(settings: Settings) -> Settings:
    return settings.with_(max_attempts=MAX_ATTEMPTS, dashboard_path=UI)


# --- a browser, more or less -----------------------------------------------------------------


class Browser:
    """An httpx client that keeps cookies and the page's CSRF token, as a browser with htmx."""

    def __init__(self, base_url: str) -> None:
        self.http = httpx.AsyncClient(base_url=base_url, timeout=10)
        self.csrf = ""

    async def get(self, path: str, **kwargs: Any) -> httpx.Response:
        resp = await self.http.get(UI + path, **kwargs)
        self._remember(resp)
        return resp

    async def fragment(self, path: str) -> httpx.Response:
        return await self.get(path, headers={"HX-Request": "true"})

    async def action(self, path: str, csrf: str | None = None, **form: str) -> httpx.Response:
        """What an htmx button posts: the form values and the CSRF header of ``<body>``."""
        headers = {"HX-Request": "true"}
        token = self.csrf if csrf is None else csrf
        if token:
            headers["X-CSRF-Token"] = token
        return await self.http.post(UI + path, data=form, headers=headers)

    async def submit(self, path: str, **form: str) -> httpx.Response:
        """What a plain form posts: its hidden CSRF field."""
        return await self.http.post(UI + path, data={"csrf_token": self.csrf, **form})

    def _remember(self, resp: httpx.Response) -> None:
        found = re.search(r'"x-csrf-token": "([^"]*)"', resp.text)
        if found and found.group(1):
            self.csrf = found.group(1)
        hidden = re.search(r'name="csrf_token" value="([^"]+)"', resp.text)
        if hidden:
            self.csrf = hidden.group(1)

    async def login(self, token: str) -> httpx.Response:
        assert (await self.get("/login")).status_code == 200
        return await self.submit("/login", token=token)

    async def aclose(self) -> None:
        await self.http.aclose()


@asynccontextmanager
async def browser(api: Any, principal: str | None = None) -> AsyncIterator[Browser]:
    """A browser, logged in as ``principal`` (None: not logged in)."""
    b = Browser(api.base_url)
    try:
        if principal is not None:
            resp = await b.login(await api.make_token(principal))
            assert resp.status_code == 303, resp.text
            assert (await b.get("/")).status_code == 200
        yield b
    finally:
        await b.aclose()


def text_of(page: str, name: str) -> str:
    """The text of the element with ``data-testid="name"`` (tags stripped)."""
    found = re.search(rf'data-testid="{name}"[^>]*>(.*?)</', page, re.S)
    assert found, f"no data-testid={name!r} in the page"
    return html.unescape(re.sub(r"<[^>]+>", "", found.group(1))).strip()


def rows(page: str, attribute: str) -> list[str]:
    return [html.unescape(v) for v in re.findall(rf'<tr {attribute}="([^"]+)"', page)]


def section(page: str, name: str) -> str:
    """The table with ``data-testid="name"``."""
    found = re.search(rf'<table data-testid="{name}">(.*?)</table>', page, re.S)
    assert found, f"no table {name!r}"
    return found.group(1)


def set_cookies(resp: httpx.Response) -> list[str]:
    return resp.headers.get_list("set-cookie")


async def park(http: httpx.AsyncClient, alice: dict[str, str], runner: str) -> Entity:
    """An entity parked by poison work: its claims end without progress MAX_ATTEMPTS times."""
    poison = await create_entity(http, alice, runner)
    await send(http, alice, poison, "crashes the handler")
    for _ in range(MAX_ATTEMPTS):
        events = await read_sse(
            http,
            alice,
            runner,
            uid("s"),
            until=lambda evs: any(e.data["entity"] == poison.url for e in wakes_of(evs)),
        )
        (wake,) = [e for e in wakes_of(events) if e.data["entity"] == poison.url]
        failing = await claim_ok(http, alice, runner, wake.data["wake_id"], wake.id)
        assert (await release(http, failing, error="boom")).status_code == 200
    view = await get_entity(http, alice, poison)
    assert view["dispatch"]["parked_reason"], view
    return poison


# --- login, sessions, CSRF -------------------------------------------------------------------


async def test_login_keeps_a_strict_http_only_session_cookie_never_the_token(
    api: Any, redis: Redis
) -> None:
    token = await api.make_token(ALICE)
    async with browser(api) as b:
        form = await b.get("/login")
        assert form.status_code == 200
        assert '<input id="token" name="token"' in form.text
        assert 'data-testid="login-submit"' in form.text
        assert 'data-testid="nav-overview"' not in form.text  # nothing to navigate to yet
        (anonymous,) = set_cookies(form)
        assert anonymous.startswith("pullwake_login=")  # the form's own, never the session's
        resp = await b.submit("/login", token=token)
        assert resp.status_code == 303, resp.text
        assert resp.headers["location"] == f"{UI}/"
        (cookie,) = [c for c in set_cookies(resp) if c.startswith("pullwake_session=")]
        for flag in ("HttpOnly", "SameSite=Strict", f"Path={UI}"):
            assert flag.lower() in cookie.lower(), cookie
        assert "secure" not in cookie.lower()  # plain http here; https sets it
        session_id = cookie.split(";")[0].split("=", 1)[1]
        assert session_id != anonymous.split(";")[0].split("=", 1)[1]  # a new id at login
        assert "pullwake_login" not in b.http.cookies  # the form's session ended
        assert token not in cookie
        keys = [k async for k in redis.scan_iter(match=f"{api.settings.redis_key_prefix}:ui:*")]
        assert keys
        for key in keys:
            assert session_id not in key
            assert token not in (await redis.get(key) or "")
        page = await b.get("/")
        assert page.status_code == 200
        assert text_of(page.text, "principal") == ALICE


async def test_https_sets_the_secure_flag(api: Any) -> None:
    async with browser(api) as b:
        resp = await b.http.get(f"{UI}/login", headers={"x-forwarded-proto": "https"})
        # uvicorn trusts X-Forwarded-Proto from loopback (its default forwarded_allow_ips).
        (cookie,) = set_cookies(resp)
        assert "secure" in cookie.lower(), cookie


async def test_a_link_from_another_site_reloads_from_here_to_send_the_strict_cookie(
    api: Any,
) -> None:
    async with browser(api) as b:
        resp = await b.get("/runners?sort=backlog", headers={"sec-fetch-site": "cross-site"})
        assert resp.status_code == 200
        assert '<meta http-equiv="refresh" content="0;url=/ui/runners?sort=backlog">' in resp.text
        assert not set_cookies(resp)
        # The reload is a same-site navigation: without a session then, the login page.
        resp = await b.get("/runners", headers={"sec-fetch-site": "same-origin"})
        assert resp.status_code == 303
        assert resp.headers["location"] == f"{UI}/login"


async def test_a_bad_token_shows_the_form_again_with_an_error(api: Any) -> None:
    async with browser(api) as b:
        for bad in ("pwk_nope", "not-a-token", "pwc_claimtoken"):
            resp = await b.login(bad)
            assert resp.status_code == 200
            assert text_of(resp.text, "login-error"), resp.text
            assert 'name="token"' in resp.text
        assert (await b.get("/")).status_code == 303  # still not logged in


async def test_pages_and_fragments_need_a_session(api: Any) -> None:
    async with browser(api) as b:
        for path in ("/", "/runners", "/stuck", "/runners/x", "/entities/t/i"):
            resp = await b.get(path)
            assert resp.status_code == 303, path
            assert resp.headers["location"] == f"{UI}/login"
        resp = await b.fragment("/fragments/overview")
        assert resp.status_code == 204  # htmx goes where HX-Redirect says
        assert resp.headers["hx-redirect"] == f"{UI}/login"


async def test_logout_needs_the_csrf_token_and_ends_the_session(api: Any) -> None:
    async with browser(api, ALICE) as b:
        refused = await b.http.post(f"{UI}/logout", data={})
        assert refused.status_code == 403
        assert (await b.get("/")).status_code == 200  # still logged in
        cookie = b.http.cookies.get("pullwake_session")
        resp = await b.submit("/logout")
        assert resp.status_code == 303
        assert resp.headers["location"] == f"{UI}/login"
        assert (await b.get("/")).status_code == 303
        # The old id is gone from Redis too, not only from this browser.
        again = httpx.AsyncClient(base_url=api.base_url, cookies={"pullwake_session": cookie})
        async with again:
            assert (await again.get(f"{UI}/")).status_code == 303


async def test_state_changing_requests_without_the_csrf_token_change_nothing(
    api: Any, world: Any
) -> None:
    http, alice = api.http, await api.as_(ALICE)
    entity = world.entity
    async with browser(api, ALICE) as b, browser(api, ALICE) as other:
        path = f"/entities/{entity.type}/{entity.id}/signal"
        for csrf in ("", "wrong", other.csrf):  # none, a made-up one, another session's
            resp = await b.action(path, csrf=csrf, signal="pause")
            assert resp.status_code == 403, (csrf, resp.text)
            assert "CSRF" in resp.text
        resp = await b.http.post(f"{UI}{path}", data={"signal": "pause", "csrf_token": "x"})
        assert resp.status_code == 403
        assert "data-testid" in resp.text  # a page, not a problem document
        resp = await b.action(f"/runners/{world.runner_id}/disable", csrf="")
        assert resp.status_code == 403
        assert (await get_entity(http, alice, entity))["status"] == "idle"
        runner = (await http.get(f"/v1/runners/{world.runner_id}", headers=alice)).json()
        assert runner["admin_status"] == "enabled"
        # With the token, the same request works (so the refusals above were the CSRF check).
        assert (await b.action(path, signal="pause")).status_code == 200
        assert (await get_entity(http, alice, entity))["status"] == "paused"
    async with browser(api) as anonymous:
        await anonymous.get("/login")
        token = await api.make_token(ALICE)
        resp = await anonymous.http.post(f"{UI}/login", data={"token": token})
        assert resp.status_code == 403  # a login form needs its CSRF token too


async def test_revoking_the_token_ends_the_session_on_the_next_request(
    api: Any, redis: Redis
) -> None:
    services = api.services
    token = await api.make_token(ALICE)
    async with browser(api) as b:
        assert (await b.login(token)).status_code == 303
        assert (await b.get("/")).status_code == 200
        token_id = await services.tokens.id_of(token)
        await services.tokens.revoke(token_id)
        # The revocation trigger reaches this process's auth cache (strict mode: at once).
        resp = await b.fragment("/fragments/overview")  # an open tab's next poll
        assert resp.status_code == 204
        assert resp.headers["hx-redirect"] == f"{UI}/login?ended=revoked"
        resp = await b.get("/")
        assert resp.status_code == 303
        assert resp.headers["location"] == f"{UI}/login"  # the session is gone now
        notice = await b.get("/login?ended=revoked")
        assert "revoked" in text_of(notice.text, "login-notice")
        keys = [
            k async for k in redis.scan_iter(match=f"{api.settings.redis_key_prefix}:ui:session:*")
        ]
        sessions = [await redis.get(k) for k in keys]
        assert not [s for s in sessions if s and '"token"' in s], sessions


# --- what each principal sees ----------------------------------------------------------------


async def test_each_principal_sees_only_what_the_api_shows_it(api: Any, db: Any) -> None:
    http = api.http
    alice, bob = await api.as_(ALICE), await api.as_(BOB)
    runner = await register_runner(http, alice, uid("alice-box"))
    entity = await create_entity(http, alice, runner)
    await send(http, alice, entity, "hello")
    parked = await park(http, alice, runner)
    shared = await create_entity(http, alice, runner, members=[BOB])
    bobs_runner = await register_runner(http, bob, uid("bob-box"))
    async with browser(api, BOB) as b, browser(api, ALICE) as a:
        page = (await b.get("/runners")).text
        assert rows(page, "data-runner-id") == [bobs_runner]
        assert (await b.get(f"/runners/{runner}")).status_code == 404
        assert (await b.get(f"/runners/{runner}/fragment")).status_code == 404
        assert (await b.get(f"/entities/{entity.type}/{entity.id}")).status_code == 404
        assert (await b.get(f"/entities/{parked.type}/{parked.id}/fragment")).status_code == 404
        overview = (await b.get("/")).text
        assert text_of(overview, "runners-offline") == "1"  # bob's own, never seen
        assert text_of(overview, "parked-entities") == "0"
        assert text_of(overview, "outstanding-wakes") == "0"
        stuck = (await b.get("/stuck")).text
        assert parked.url not in stuck
        assert rows(section(stuck, "stuck-parked"), "data-entity") == []
        # A member sees the entity it is granted, without the creator's buttons.
        member = (await b.get(f"/entities/{shared.type}/{shared.id}")).text
        assert text_of(member, "entity-status") == "idle"
        assert "data-action=" not in member
        # Bob's actions on alice's work go through the use cases: refused, nothing changes.
        resp = await b.action(f"/entities/{parked.type}/{parked.id}/signal", signal="resume")
        assert resp.status_code == 403, resp.text
        assert text_of(resp.text, "action-error")
        resp = await b.action(f"/runners/{runner}/disable")
        assert resp.status_code == 403
        assert "owned by another principal" in resp.text
        assert (await get_entity(http, alice, parked))["dispatch"]["parked_reason"]
        runner_view = (await http.get(f"/v1/runners/{runner}", headers=alice)).json()
        assert runner_view["admin_status"] == "enabled"
        # Alice sees all of hers.
        assert rows((await a.get("/runners")).text, "data-runner-id") == [runner]
        assert (await a.get(f"/runners/{runner}")).status_code == 200
        assert rows(section((await a.get("/stuck")).text, "stuck-parked"), "data-entity") == [
            parked.url
        ]
        assert text_of((await a.get("/")).text, "parked-entities") == "1"


async def test_unknown_and_malformed_ids_are_404_pages(api: Any) -> None:
    async with browser(api, ALICE) as b:
        for path in (
            "/runners/no-such-runner",
            "/runners/no-such-runner/fragment",
            "/entities/nope/nothing",
            "/entities/bad%20type/x",
        ):
            resp = await b.get(path)
            assert resp.status_code == 404, path
            assert text_of(resp.text, "error-detail"), path
            assert 'data-testid="nav-overview"' in resp.text
        # A live region polling a page that went away gets a notice, not a page in the page.
        resp = await b.fragment("/entities/nope/nothing/fragment")
        assert resp.status_code == 404
        assert "does not exist" in text_of(resp.text, "action-error")
        assert "<html" not in resp.text


# --- pages -----------------------------------------------------------------------------------


async def test_overview_counts_and_charts_what_the_principal_has(
    api: Any, db: asyncpg.Connection
) -> None:
    http, alice = api.http, await api.as_(ALICE)
    online = await register_runner(http, alice, uid("online"))
    assert (await http.post(f"/v1/runners/{online}/heartbeat", json={}, headers=alice)).is_success
    expired = await register_runner(http, alice, uid("expired"))
    assert (await http.post(f"/v1/runners/{expired}/heartbeat", json={}, headers=alice)).is_success
    await db.execute(
        "UPDATE runner_liveness SET lease_expires_at = now() - interval '1 minute' "
        "WHERE runner_id = $1",
        expired,
    )
    await register_runner(http, alice, uid("offline"))
    waiting = await create_entity(http, alice, expired)  # nobody reads its wake
    await send(http, alice, waiting, 1)
    await db.execute(
        "UPDATE wakes SET created_at = now() - interval '3 minutes' WHERE entity_url = $1",
        waiting.url,
    )
    busy = await create_entity(http, alice, online)
    await send(http, alice, busy, 1)
    wake = await read_wake(http, alice, online)
    note = await claim_ok(http, alice, online, wake.data["wake_id"], wake.id)
    done = await create_entity(http, alice, online)
    await send(http, alice, done, 1)
    wake = await read_wake(http, alice, online, uid("s"))
    finished = await claim_ok(http, alice, online, wake.data["wake_id"], wake.id)
    resp = await http.post(
        f"/v1/claims/{finished['claim_id']}/done",
        json={"epoch": finished["epoch"], "acked_offset": 1},
        headers={"Authorization": f"Bearer {finished['claim_token']}"},
    )
    assert resp.status_code == 200, resp.text
    await db.execute(
        "UPDATE wakes SET delivery_status = 'failed' WHERE id = "
        "(SELECT id FROM wakes WHERE entity_url = $1 LIMIT 1)",
        done.url,
    )
    assert note["claim_id"]
    async with browser(api, ALICE) as b:
        for page in ((await b.get("/")).text, (await b.fragment("/fragments/overview")).text):
            assert text_of(page, "runners-online") == "1"
            assert text_of(page, "runners-expired") == "1"
            assert text_of(page, "runners-offline") == "1"
            assert text_of(page, "outstanding-wakes") == "1"
            assert text_of(page, "oldest-wake-age").endswith("min"), page
            assert text_of(page, "active-claims") == "1"
            assert text_of(page, "parked-entities") == "0"
            assert text_of(page, "dead-letters") == "1"
            chart = re.search(r'<svg data-testid="rate-chart".*?</svg>', page, re.S)
            assert chart
            series = dict(re.findall(r'data-series="(\w+)" points="([^"]+)"', chart.group(0)))
            assert sorted(series) == ["claims", "dones", "sends"]
            assert all(len(points.split()) == 60 for points in series.values())
            assert "3 in 10 min" in page  # sends
            assert "2 in 10 min" in page  # claims
            assert "1 in 10 min" in page  # dones


async def test_the_runner_table_renders_a_bounded_number_of_rows(
    api: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A large fleet's table is cut after MAX_RUNNER_ROWS rows (sorted first), and says so."""
    from pullwake.http.dashboard import views

    monkeypatch.setattr(views, "MAX_RUNNER_ROWS", 2)
    http, alice = api.http, await api.as_(ALICE)
    ids = [await register_runner(http, alice, f"r-{n}") for n in range(3)]
    async with browser(api, ALICE) as b:
        page = (await b.fragment("/fragments/runners")).text
        assert rows(page, "data-runner-id") == ids[:2]
        assert text_of(page, "runners-more") == (
            "2 of 3 runners shown (sort by another column to see others)."
        )
        page = (await b.fragment("/fragments/runners?sort=id&dir=desc")).text
        assert rows(page, "data-runner-id") == [ids[2], ids[1]]
    monkeypatch.setattr(views, "MAX_RUNNER_ROWS", 3)
    async with browser(api, ALICE) as b:
        assert 'data-testid="runners-more"' not in (await b.get("/runners")).text


async def test_runners_table_lists_liveness_backlog_and_sorts_by_column(
    api: Any, db: asyncpg.Connection
) -> None:
    http, alice = api.http, await api.as_(ALICE)
    quiet = await register_runner(http, alice, "a-quiet", label="<b>quiet</b>")
    busy = await register_runner(http, alice, "b-busy")
    assert (await http.post(f"/v1/runners/{busy}/heartbeat", json={}, headers=alice)).is_success
    for _ in range(2):
        await send(http, alice, await create_entity(http, alice, busy), 1)
    async with browser(api, ALICE) as b:
        page = (await b.get("/runners")).text
        assert 'data-testid="runners-table"' in page
        assert rows(page, "data-runner-id") == [quiet, busy]
        assert "<b>quiet</b>" not in page  # escaped
        assert "&lt;b&gt;quiet&lt;/b&gt;" in page
        assert f'href="{UI}/runners/{busy}"' in page
        row = re.search(rf'<tr data-runner-id="{busy}">(.*?)</tr>', page, re.S)
        assert row
        assert text_of(row.group(1), "liveness") == "online"
        assert text_of(row.group(1), "backlog") == "2"
        quiet_row = re.search(rf'<tr data-runner-id="{quiet}">(.*?)</tr>', page, re.S)
        assert quiet_row
        assert text_of(quiet_row.group(1), "liveness") == "offline"
        assert "never_seen" in quiet_row.group(1)
        by_backlog = (await b.get("/runners?sort=backlog&dir=desc")).text
        assert rows(by_backlog, "data-runner-id") == [busy, quiet]
        assert 'aria-sort="descending"' in by_backlog
        assert "/runners?sort=backlog&amp;dir=asc" in by_backlog  # the header flips the order
        assert rows((await b.get("/runners?sort=backlog&dir=asc")).text, "data-runner-id") == [
            quiet,
            busy,
        ]
        assert rows((await b.get("/runners?sort=id&dir=desc")).text, "data-runner-id") == [
            busy,
            quiet,
        ]
        fragment = (await b.fragment("/fragments/runners?sort=liveness&dir=desc")).text
        assert rows(fragment, "data-runner-id") == [busy, quiet]  # online > offline
        assert "<html" not in fragment
        assert (await b.get("/runners?sort=nonsense&dir=sideways")).status_code == 200


async def test_runner_page_shows_consumers_pending_entries_and_recent_wakes(api: Any) -> None:
    http, alice = api.http, await api.as_(ALICE)
    runner = await register_runner(http, alice)
    entity = await create_entity(http, alice, runner)
    sent = await send(http, alice, entity, 1)
    wake = await read_wake(http, alice, runner, "laptop-1")  # read, never claimed: pending
    async with browser(api, ALICE) as b:
        for page in (
            (await b.get(f"/runners/{runner}")).text,
            (await b.fragment(f"/runners/{runner}/fragment")).text,
        ):
            assert rows(section(page, "consumers"), "data-consumer") == ["laptop-1"]
            assert rows(section(page, "pending"), "data-entry") == [wake.id]
            assert rows(section(page, "recent-wakes"), "data-wake-id") == [sent["wake"]["id"]]
        page = (await b.get(f"/runners/{runner}")).text
        assert '<button data-action="disable"' in page  # only what applies: it is enabled
        assert 'data-action="enable"' not in page
        assert "hx-confirm=" in page
        resp = await b.action(f"/runners/{runner}/disable")
        assert resp.status_code == 200, resp.text
        assert resp.headers["hx-trigger"] == "pullwake-refresh"
        view = (await http.get(f"/v1/runners/{runner}", headers=alice)).json()
        assert view["admin_status"] == "disabled"
        page = (await b.fragment(f"/runners/{runner}/fragment")).text
        assert text_of(page, "admin-status") == "disabled"
        assert '<button data-action="enable"' in page
        assert 'data-action="disable"' not in page
        assert (await b.action(f"/runners/{runner}/enable")).status_code == 200
        view = (await http.get(f"/v1/runners/{runner}", headers=alice)).json()
        assert view["admin_status"] == "enabled"


async def test_entity_page_tells_the_story_of_one_entity(api: Any) -> None:
    http, alice = api.http, await api.as_(ALICE)
    runner = await register_runner(http, alice)
    entity = await create_entity(http, alice, runner)
    sent = await send(http, alice, entity, {"text": "first"})
    wake = await read_wake(http, alice, runner)
    note = await claim_ok(http, alice, runner, wake.data["wake_id"], wake.id)
    resp = await append_event(http, entity, note["claim_token"], {"step": "thinking"})
    assert resp.status_code == 201, resp.text
    path = f"/entities/{entity.type}/{entity.id}"
    async with browser(api, ALICE) as b:
        for page in ((await b.get(path)).text, (await b.fragment(f"{path}/fragment")).text):
            assert text_of(page, "entity-status") == "running"
            assert text_of(page, "offsets") == "acked 0 / tail 1 (1 pending)"
            assert note["claim_id"] in text_of(page, "active-claim")
            assert text_of(page, "lease-left").endswith("left")
            assert 'data-testid="parked-reason"' not in page
            timeline = re.search(r'data-testid="timeline">(.*?)</ol>', page, re.S)
            assert timeline
            kinds = re.findall(r'data-kind="(\w+)"', timeline.group(1))
            assert sorted(kinds) == ["claim", "event", "message", "wake"]
            assert kinds[0] == "event"  # newest first
            assert sent["wake"]["id"] in timeline.group(1)
            assert "thinking" in timeline.group(1)
            for action in ("pause", "stop", "kill"):
                assert f'<button data-action="{action}"' in page
            assert '<button data-action="resume"' not in page  # not paused, not parked
        resp = await b.action(f"{path}/signal", signal="pause")
        assert resp.status_code == 200
        assert text_of(resp.text, "action-ok") == f"pause: {entity.url} is paused"
        page = (await b.fragment(f"{path}/fragment")).text
        assert text_of(page, "entity-status") == "paused"
        assert '<button data-action="resume"' in page


async def test_stuck_lists_parked_work_and_resume_from_the_page_wakes_it(api: Any) -> None:
    http, alice = api.http, await api.as_(ALICE)
    runner = await register_runner(http, alice)
    parked = await park(http, alice, runner)
    async with browser(api, ALICE) as b:
        page = (await b.get("/stuck")).text
        for name in ("stuck-wakes", "stuck-claims", "stuck-parked", "stuck-runners"):
            section(page, name)
        parked_rows = section(page, "stuck-parked")
        assert rows(parked_rows, "data-entity") == [parked.url]
        row = re.search(rf'<tr data-entity="{parked.url}">(.*?)</tr>', parked_rows, re.S)
        assert row
        assert '<button data-action="resume"' in row.group(1)
        assert "hx-confirm=" in row.group(1)
        assert f'href="{UI}/entities{parked.url}"' in row.group(1)
        assert "Resume" in row.group(1)
        entity_page = (await b.get(f"/entities{parked.url}")).text
        assert "without progress" in text_of(entity_page, "parked-reason")
        assert '<button data-action="resume"' in entity_page
        resp = await b.action(f"/entities{parked.url}/signal", signal="resume")
        assert resp.status_code == 200, resp.text
        assert text_of(resp.text, "action-ok")
        view = await get_entity(http, alice, parked)
        assert view["dispatch"]["parked_reason"] is None
        assert view["dispatch"]["outstanding_wake_id"] is not None  # woken again
        fragment = (await b.fragment("/fragments/stuck")).text
        assert rows(section(fragment, "stuck-parked"), "data-entity") == []


async def test_action_errors_show_the_problem_in_the_page(api: Any, world: Any) -> None:
    http, alice = api.http, await api.as_(ALICE)
    await signal(http, alice, world.entity, "kill")
    path = f"/entities/{world.entity.type}/{world.entity.id}/signal"
    async with browser(api, ALICE) as b:
        resp = await b.action(path, signal="pause")
        assert resp.status_code == 409
        assert "only kill is accepted" in text_of(resp.text, "action-error")
        resp = await b.action(path, signal="explode")
        assert resp.status_code == 400
        assert "signal must be one of" in resp.text
        resp = await b.action("/entities/no/such/signal", signal="pause")
        assert resp.status_code == 404
        # Without htmx (a plain form post), the error is a page of its own.
        resp = await b.submit(path, signal="pause")
        assert resp.status_code == 409
        assert "only kill is accepted" in text_of(resp.text, "error-detail")
        assert 'data-testid="nav-stuck"' in resp.text


async def test_every_page_has_the_navigation(api: Any, world: Any) -> None:
    async with browser(api, ALICE) as b:
        for path in (
            "/",
            "/runners",
            f"/runners/{world.runner_id}",
            f"/entities/{world.entity.type}/{world.entity.id}",
            "/stuck",
        ):
            page = (await b.get(path)).text
            for nav in ("nav-overview", "nav-runners", "nav-stuck"):
                assert f'data-testid="{nav}"' in page, (path, nav)
            assert 'hx-trigger="every 2s' in page, path
            assert 'hx-headers=\'{"x-csrf-token": "' in page


# --- one query per refresh -------------------------------------------------------------------


# The session's token is checked as the API checks one: from the auth cache, or (its entry
# expired, PULLWAKE_AUTH_CACHE_TTL_MS) one lookup, and a use recorded about once a minute. Those
# are the API's costs (tests/integration/test_round_trips.py); the page's own are counted here.
# The delivery records of the seeding's wakes are written in batches off the request path.
AUTH = {q("token_lookup"), q("token_touch"), q("token_touch_batch")}
DELIVERY_RECORD = q("wakes_mark_delivered")


class Statements:
    def __init__(self) -> None:
        self.queries: list[str] = []
        self.seen: list[list[str]] = []

    def __call__(self, record: Any) -> None:
        if record.query in AUTH or record.query == DELIVERY_RECORD:
            return
        if "typeinfo_tree" in record.query or "set_config('jit'" in record.query:
            return  # asyncpg's type introspection, once per pooled connection and statement
        self.queries.append(record.query)

    async def count(self, services: Any, work: Any) -> int:
        await services.publisher.flush()  # the seeding's delivery records, written before
        for _ in range(3):
            await asyncio.sleep(0)
        self.queries.clear()
        resp = await work()
        assert resp.status_code == 200, resp.text
        for _ in range(3):  # asyncpg calls its query loggers soon after each statement
            await asyncio.sleep(0)
        self.seen.append(list(self.queries))
        return len(self.queries)


async def test_each_refresh_costs_one_query_however_many_rows(api: Any) -> None:
    http, alice = api.http, await api.as_(ALICE)
    services = api.services
    runner = await register_runner(http, alice)
    entity = await create_entity(http, alice, runner)
    await send(http, alice, entity, 1)
    await park(http, alice, runner)
    fragments = {
        "/fragments/overview": 1,
        "/fragments/runners": 1,
        f"/runners/{runner}/fragment": 1,
        f"/entities/{entity.type}/{entity.id}/fragment": 1,
        "/fragments/stuck": 4,  # inspect stuck's four sections, one query each
    }
    count = Statements()
    async with browser(api, ALICE) as b:
        for path in fragments:
            await b.fragment(path)  # warm: the token's cache entry, asyncpg's statements
        services.store.observer = count
        try:
            first = {p: await count.count(services, lambda p=p: b.fragment(p)) for p in fragments}
            for _ in range(5):  # more runners, entities, messages and parked work
                more = await register_runner(http, alice)
                other = await create_entity(http, alice, more)
                for n in range(3):
                    await send(http, alice, other, n)
            await park(http, alice, runner)
            again = {p: await count.count(services, lambda p=p: b.fragment(p)) for p in fragments}
        finally:
            services.store.observer = None
    assert first == fragments, (first, count.seen)
    assert again == fragments, (again, count.seen)


async def test_each_refresh_costs_one_redis_round_trip_for_its_streams(
    api: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Besides the session's GETEX: one pipeline where runners' streams are shown (open wake
    streams on the table; those, XINFO CONSUMERS and XPENDING on a runner's page)."""
    http, alice = api.http, await api.as_(ALICE)
    redis = api.services.redis
    runners = [await register_runner(http, alice) for _ in range(4)]
    entity = await create_entity(http, alice, runners[0])
    await send(http, alice, entity, 1)
    await read_wake(http, alice, runners[0], "laptop")
    calls: list[str] = []
    command, pipeline = redis.execute_command, redis.pipeline

    async def counted_command(*args: Any, **kwargs: Any) -> Any:
        calls.append(str(args[0]))
        return await command(*args, **kwargs)

    def counted_pipeline(*args: Any, **kwargs: Any) -> Any:
        calls.append("pipeline")
        return pipeline(*args, **kwargs)

    async with browser(api, ALICE) as b:
        await b.fragment("/fragments/runners")
        monkeypatch.setattr(redis, "execute_command", counted_command)
        monkeypatch.setattr(redis, "pipeline", counted_pipeline)
        for path, expected in {
            "/fragments/overview": ["GETEX"],
            "/fragments/runners": ["GETEX", "pipeline"],
            f"/runners/{runners[0]}/fragment": ["GETEX", "pipeline"],
            f"/entities/{entity.type}/{entity.id}/fragment": ["GETEX"],
            "/fragments/stuck": ["GETEX"],
        }.items():
            calls.clear()
            assert (await b.fragment(path)).status_code == 200
            assert calls == expected, (path, calls)


# --- assets and where the dashboard is ---------------------------------------------------------


async def test_static_assets_are_served_with_long_cache_headers(api: Any) -> None:
    async with browser(api, ALICE) as b:
        page = (await b.get("/")).text
        script = re.search(r'<script src="([^"]+)"', page)
        style = re.search(r'<link rel="stylesheet" href="([^"]+)"', page)
        assert script
        assert style
        assert "?v=" in script.group(1)
        for url, kind in ((script.group(1), "javascript"), (style.group(1), "css")):
            resp = await b.http.get(url)
            assert resp.status_code == 200, url
            assert kind in resp.headers["content-type"]
            assert "max-age=31536000" in resp.headers["cache-control"]
        htmx = await b.http.get(script.group(1))
        assert b"htmx" in htmx.content
        assert len(htmx.content) > 10_000
        icon = re.search(r'<link rel="icon" type="image/svg\+xml" href="([^"]+)"', page)
        assert icon  # else a browser asks for /favicon.ico: a 404 in its console
        assert (await b.http.get(icon.group(1))).headers["content-type"] == "image/svg+xml"
        license_ = await b.get("/static/htmx.LICENSE")
        assert license_.status_code == 200
        assert "Zero-Clause BSD" in license_.text
        assert (await b.get("/static/../plugin.py")).status_code == 404
        assert (await b.get("/static/nothing.js")).status_code == 404
        # Static files need no session (the login page uses them).
    async with browser(api) as anonymous:
        assert (await anonymous.get("/static/dashboard.css")).status_code == 200


async def test_pages_forbid_framing_and_inline_script(api: Any) -> None:
    async with browser(api, ALICE) as b:
        resp = await b.get("/")
        policy = resp.headers["content-security-policy"]
        assert "frame-ancestors 'none'" in policy
        assert "script-src 'self'" in policy
        assert "<script>" not in resp.text
        assert " style=" not in resp.text


@asynccontextmanager
async def served(app: Any) -> AsyncIterator[httpx.AsyncClient]:
    """``app`` on a free loopback port, and a client of it (keeping cookies)."""
    async with (
        serve_in_background(app) as base_url,
        httpx.AsyncClient(base_url=base_url, timeout=10) as http,
    ):
        yield http


def _paths(app: Any) -> list[str]:
    return [route.path for route in app.routes]


def test_the_dashboard_is_off_by_default(settings: Settings) -> None:
    assert PullWakeConfig().dashboard_path is None
    assert Settings().dashboard_path is None
    for app in (
        create_app(settings.with_(dashboard_path=None)),
        create_app(PullWakeConfig(settings=settings)),
    ):
        assert not [p for p in _paths(app) if p.startswith(UI)]
    assert f"{UI}/login" in _paths(create_app(settings.with_(dashboard_path=UI)))


def test_the_dashboard_path_is_configurable(settings: Settings) -> None:
    app = create_app(PullWakeConfig(settings=settings, dashboard_path="/ops/console"))
    assert "/ops/console/login" in _paths(app)
    assert "/ops/console/runners/{runner_id:str}" in _paths(app)
    env = Settings.from_env({"PULLWAKE_DASHBOARD_PATH": "/admin"})
    assert env.dashboard_path == "/admin"
    with pytest.raises(Exception, match="PULLWAKE_DASHBOARD_PATH"):
        Settings.from_env({"PULLWAKE_DASHBOARD_PATH": "ui"})


async def test_dev_mode_needs_no_login_and_still_checks_csrf(settings: Settings) -> None:
    app = create_app(settings.with_(dev_asserted_auth=True, dashboard_path="/console"))
    async with served(app) as http:
        resp = await http.get("/console/")
        assert resp.status_code == 200
        assert text_of(resp.text, "principal") == "system:dev-local"
        assert 'data-testid="logout"' not in resp.text  # nothing to log out of
        (cookie,) = set_cookies(resp)
        assert "path=/console" in cookie.lower()
        csrf = re.search(r'"x-csrf-token": "([^"]+)"', resp.text)
        assert csrf
        # The dev principal's work, created over the API without credentials.
        await http.post("/v1/runners", json={"id": "dev-box"})
        resp = await http.post("/console/runners/dev-box/disable", headers={"HX-Request": "1"})
        assert resp.status_code == 403
        resp = await http.post(
            "/console/runners/dev-box/disable",
            headers={"HX-Request": "1", "X-CSRF-Token": csrf.group(1)},
        )
        assert resp.status_code == 200, resp.text
        assert (await http.get("/v1/runners/dev-box")).json()["admin_status"] == "disabled"
        page = await http.get("/console/runners", headers={"X-Pullwake-Asserted-Email": "x@y.z"})
        assert text_of(page.text, "principal") == "user:x@y.z"
        assert rows(page.text, "data-runner-id") == []


async def test_the_host_authenticate_hook_applies(settings: Settings) -> None:
    async def hook(request: Request[Any, Any, Any]) -> Principal | None:
        user = request.headers.get("x-host-user")
        return None if user is None else Principal("user", user)

    config = PullWakeConfig(settings=settings, authenticate=hook, dashboard_path=UI)
    app = create_app(config)
    async with served(app) as http:
        assert (await http.get(f"{UI}/")).status_code == 303
        resp = await http.get(f"{UI}/", headers={"x-host-user": "hosted@example.com"})
        assert resp.status_code == 200
        assert text_of(resp.text, "principal") == "user:hosted@example.com"
        # Another user of the host with this browser's cookie gets a session of its own.
        resp = await http.get(f"{UI}/", headers={"x-host-user": "other@example.com"})
        assert text_of(resp.text, "principal") == "user:other@example.com"
