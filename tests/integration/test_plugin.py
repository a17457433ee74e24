"""PullWakePlugin inside a host app: its own dependencies and paths, the in-process accessor,
start-up errors."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from typing import Any

import httpx
import msgspec
import pytest
from litestar import Litestar, get, post
from litestar.di import NamedDependency, Provide
from litestar.exceptions import ImproperlyConfiguredException
from litestar.params import FromPath, JSONBody

from pullwake import (
    Principal,
    PullWake,
    PullWakeConfig,
    PullWakeDep,
    PullWakePlugin,
    Settings,
    create_app,
)
from pullwake.errors import ConfigError, InvalidRequest, NotFound, Unavailable
from pullwake.testing import serve_in_background
from pullwake.wire import DispatchPolicy, RunnerTarget

from .helpers import ALICE, BOB, assert_problem, create_entity, register_runner, uid


class HostServices:
    """The host app's own ``services``: nothing to do with pullwake's."""

    name = "the host's services"


def provide_host_services() -> HostServices:
    return HostServices()


@get("/host/services", sync_to_thread=False)
def host_services(services: NamedDependency[HostServices]) -> dict[str, str]:
    return {"services": services.name}


@get("/healthz", sync_to_thread=False)
def host_healthz() -> dict[str, str]:
    return {"status": "the host is fine"}


@contextlib.asynccontextmanager
async def hosted(app: Litestar) -> AsyncIterator[httpx.AsyncClient]:
    async with (
        serve_in_background(app) as base_url,
        httpx.AsyncClient(base_url=base_url, timeout=10) as http,
    ):
        yield http


async def token(app: Litestar, principal: str) -> dict[str, str]:
    raw, _ = await app.state["pullwake"].tokens.create(Principal.parse(principal), "test")
    return {"Authorization": f"Bearer {raw}"}


async def test_a_host_dependency_named_services_and_pullwake_both_work(
    settings: Settings,
) -> None:
    """A host dependency named ``services`` once reached pullwake's routes: 500 on each."""
    app = Litestar(
        route_handlers=[host_services],
        dependencies={"services": Provide(provide_host_services, sync_to_thread=False)},
        plugins=[PullWakePlugin(PullWakeConfig(settings=settings))],
        logging_config=None,
    )
    async with hosted(app) as http:
        resp = await http.get("/host/services")
        assert resp.json() == {"services": "the host's services"}
        alice = await token(app, ALICE)
        runner_id = await register_runner(http, alice)
        entity = await create_entity(http, alice, runner_id)
        sent = await http.post(f"{entity.path}/messages", json={"payload": 1}, headers=alice)
        assert sent.status_code == 202, sent.text
        assert (await http.get(f"/v1/runners/{runner_id}", headers=alice)).status_code == 200
        ready = await http.get("/readyz")
        assert (ready.status_code, ready.json()["status"]) == (200, "ready")
        assert (await http.get("/metrics")).status_code == 200


def test_a_host_with_its_own_healthz_conflicts_unless_pullwake_moves_or_drops_its_own(
    settings: Settings,
) -> None:
    with pytest.raises(ImproperlyConfiguredException):
        Litestar(route_handlers=[host_healthz], plugins=[PullWakePlugin(settings)])
    moved = Litestar(
        route_handlers=[host_healthz],
        plugins=[PullWakePlugin(PullWakeConfig(settings=settings, health_path="/pw/healthz"))],
    )
    dropped = Litestar(
        route_handlers=[host_healthz],
        plugins=[PullWakePlugin(PullWakeConfig(settings=settings, health_path=None))],
    )
    assert {"/healthz", "/pw/healthz"} <= {r.path for r in moved.routes}
    assert "/pw/healthz" not in {r.path for r in dropped.routes}


async def test_probes_and_metrics_move_or_go(settings: Settings) -> None:
    config = PullWakeConfig(
        settings=settings,
        health_path="/ops/live",
        ready_path="/ops/ready",
        metrics_path=None,
    )
    app = Litestar(route_handlers=[host_healthz], plugins=[PullWakePlugin(config)])
    async with hosted(app) as http:
        assert (await http.get("/healthz")).json() == {"status": "the host is fine"}
        assert (await http.get("/ops/live")).json() == {"status": "ok"}
        assert (await http.get("/ops/ready")).json()["status"] == "ready"
        assert_problem(await http.get("/metrics"), 404, "NOT_FOUND")
        assert_problem(await http.get("/readyz"), 404, "NOT_FOUND")
    paths = app.openapi_schema.to_schema()["paths"]
    assert {"/ops/live", "/ops/ready"} <= set(paths)
    assert "/metrics" not in paths


class Reply(msgspec.Struct):
    ticket: str
    text: str


SUPPORT = Principal("system", "support-desk")


@post("/tickets/reply")
async def reply(data: JSONBody[Reply], pullwake: PullWakeDep) -> dict[str, Any]:
    """A host handler sending in-process, as the host's own principal."""
    sent = await pullwake.send(f"/ticket/{data.ticket}", {"text": data.text}, sender=SUPPORT)
    return {"offset": sent.offset, "wake": sent.wake.status}


@post("/tickets/reply-as/{who:str}")
async def reply_as(
    who: FromPath[str], data: JSONBody[Reply], pullwake: PullWakeDep
) -> dict[str, Any]:
    sent = await pullwake.send(f"/ticket/{data.ticket}", data.text, sender=Principal.parse(who))
    return {"offset": sent.offset}


async def test_a_host_handler_sends_in_process(settings: Settings) -> None:
    plugin = PullWakePlugin(PullWakeConfig(settings=settings))
    app = Litestar(route_handlers=[reply, reply_as], plugins=[plugin], logging_config=None)
    with pytest.raises(Unavailable):
        plugin.pullwake  # noqa: B018 -- not started yet
    async with hosted(app) as http:
        alice = await token(app, ALICE)
        runner_id = await register_runner(http, alice)
        ticket = uid("t")
        # The host creates the entity in-process too, granting its desk and alice's runner.
        pw = plugin.pullwake
        view, created = await pw.create_entity(
            f"/ticket/{ticket}",
            creator=Principal.parse(ALICE),
            dispatch_policy=DispatchPolicy([RunnerTarget(runner_id)]),
            members=[SUPPORT.key],
        )
        assert created
        assert view.url == f"/ticket/{ticket}"

        resp = await http.post("/tickets/reply", json={"ticket": ticket, "text": "hello"})
        assert resp.status_code == 201, resp.text
        assert resp.json() == {"offset": 1, "wake": "queued"}
        again = await http.post("/tickets/reply", json={"ticket": ticket, "text": "more"})
        assert again.json() == {"offset": 2, "wake": "coalesced"}

        # The same rules as over HTTP: bob is no member, answered as pullwake's problem.
        refused = await http.post(f"/tickets/reply-as/{BOB}", json={"ticket": ticket, "text": "x"})
        assert_problem(refused, 403, "FORBIDDEN")
        missing = await http.post("/tickets/reply", json={"ticket": "nope", "text": "x"})
        assert_problem(missing, 404, "NOT_FOUND")

        inbox = await http.get(f"/v1/entities/ticket/{ticket}/messages", headers=alice)
        assert [(m["payload"], m["sender"]) for m in inbox.json()["messages"]] == [
            ({"text": "hello"}, SUPPORT.key),
            ({"text": "more"}, SUPPORT.key),
        ]
        entity = await pw.get_entity(f"/ticket/{ticket}", viewer=SUPPORT)
        assert entity.dispatch.tail_offset == 2
        with pytest.raises(NotFound):
            await pw.get_entity("/ticket/nope", viewer=SUPPORT)
        stopped = await pw.signal(f"/ticket/{ticket}", "stop", sender=Principal.parse(ALICE))
        assert stopped.status in ("stopping", "stopped")


async def test_in_process_calls_check_their_input(settings: Settings) -> None:
    plugin = PullWakePlugin(settings)
    async with hosted(Litestar(plugins=[plugin])):
        pw: PullWake = plugin.pullwake
        with pytest.raises(InvalidRequest, match=r"addressed as /type/id"):
            await pw.send("ticket/1", 1, sender=SUPPORT)
        with pytest.raises(InvalidRequest, match=r"expected one of pause, resume, stop, kill"):
            await pw.signal("/ticket/1", "halt", sender=SUPPORT)


@get("/mine", sync_to_thread=False)
def mine(hub: NamedDependency[PullWake]) -> dict[str, str]:
    return {"prefix": hub.services.settings.redis_key_prefix}


async def test_the_dependency_key_is_configurable(settings: Settings) -> None:
    with pytest.raises(ConfigError, match="already has a dependency named 'pullwake'"):
        Litestar(
            dependencies={"pullwake": Provide(provide_host_services, sync_to_thread=False)},
            plugins=[PullWakePlugin(settings)],
        )
    app = Litestar(
        route_handlers=[mine],
        dependencies={"pullwake": Provide(provide_host_services, sync_to_thread=False)},
        plugins=[PullWakePlugin(PullWakeConfig(settings=settings, dependency_key="hub"))],
    )
    async with hosted(app) as http:
        assert (await http.get("/mine")).json() == {"prefix": settings.redis_key_prefix}
    none = Litestar(
        plugins=[PullWakePlugin(PullWakeConfig(settings=settings, dependency_key=None))]
    )
    assert "pullwake" not in none.dependencies


@pytest.mark.parametrize(
    ("env", "named"),
    [
        ({}, "PULLWAKE_DATABASE_URL and PULLWAKE_REDIS_URL not set"),
        ({"PULLWAKE_REDIS_URL": "redis://127.0.0.1:6379/0"}, "PULLWAKE_DATABASE_URL not set"),
        ({"PULLWAKE_DATABASE_URL": "postgresql://x/y"}, "PULLWAKE_REDIS_URL not set"),
        (
            {
                "PULLWAKE_DATABASE_URL": "postgresql://x/y",
                "PULLWAKE_REDIS_URL": "redis://127.0.0.1:7000",
                "PULLWAKE_REDIS_CLUSTER": "1",
            },
            "PULLWAKE_ARQ_REDIS_URL",
        ),
    ],
)
def test_missing_settings_fail_at_start_up_in_one_line(
    monkeypatch: pytest.MonkeyPatch, env: dict[str, str], named: str
) -> None:
    """Once a bare AssertionError inside an ExceptionGroup from the lifespan; now a ConfigError
    when the app is built, naming what to set."""
    for name in ("DATABASE_URL", "REDIS_URL", "REDIS_CLUSTER", "ARQ_REDIS_URL"):
        monkeypatch.delenv(f"PULLWAKE_{name}", raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    with pytest.raises(ConfigError) as caught:
        Litestar(plugins=[PullWakePlugin()])
    message = str(caught.value)
    assert named in message
    assert "\n" not in message
    assert message.startswith("pullwake cannot start: ")


async def test_the_older_constructor_still_works(settings: Settings) -> None:
    app = create_app(settings, path="/api")
    async with hosted(app) as http:
        alice = await token(app, ALICE)
        resp = await http.post("/api/runners", json={"id": uid("r")}, headers=alice)
        assert resp.status_code == 201, resp.text
        assert_problem(await http.get("/v1/runners", headers=alice), 404, "NOT_FOUND")
    plugin = PullWakePlugin(settings, path="/api")
    assert (plugin.config.path, plugin.settings) == ("/api", settings)
