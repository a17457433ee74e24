"""compose.yaml runs real ``pullwake`` subcommands and starts its services in a safe order."""

from __future__ import annotations

import argparse
import re
import shlex
from pathlib import Path
from typing import Any

import pytest
import yaml

COMPOSE_PATH = Path(__file__).resolve().parents[2] / "compose.yaml"
Service = dict[str, Any]


def _services() -> dict[str, Service]:
    services: dict[str, Service] = yaml.safe_load(COMPOSE_PATH.read_text())["services"]
    return services


def _uses_our_image(service: Service) -> bool:
    return "build" in service or str(service.get("image", "")).startswith("pullwake")


def _is_one_shot(service: Service) -> bool:
    return service.get("restart", "no") == "no" and "healthcheck" not in service


def _condition_to_wait_for(target: Service) -> str | None:
    if "healthcheck" in target:
        return "service_healthy"
    if _is_one_shot(target):
        return "service_completed_successfully"
    return None  # "service_started" says nothing about being ready


OUR_SERVICES = sorted(name for name, s in _services().items() if _uses_our_image(s))


def _subcommands() -> dict[str, argparse.ArgumentParser]:
    from pullwake.cli import build_parser

    parser = build_parser()
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    raise AssertionError("pullwake.cli.build_parser() has no subcommands")


def _command(service: Service) -> list[str]:
    command = service.get("command")
    assert command, "a pullwake service needs an explicit command"
    return shlex.split(command) if isinstance(command, str) else [str(c) for c in command]


def _environment(service: Service) -> dict[str, str]:
    raw = service.get("environment") or {}
    if isinstance(raw, list):
        raw = dict(item.split("=", 1) for item in raw)
    # Resolve compose interpolation the way an unset variable would: ${NAME:-default}.
    return {k: re.sub(r"\$\{\w+:-([^}]*)\}", r"\1", str(v)) for k, v in raw.items()}


def test_compose_runs_every_pullwake_process() -> None:
    commands = {_command(_services()[name])[0] for name in OUR_SERVICES}
    assert {"migrate", "serve", "worker", "runner"} <= commands


@pytest.mark.parametrize("name", OUR_SERVICES)
def test_command_is_a_real_subcommand_with_valid_arguments(
    name: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from pullwake.cli import build_parser

    service = _services()[name]
    command = _command(service)
    assert command[0] in _subcommands(), f"{name}: `pullwake {command[0]}` does not exist"
    for key, value in _environment(service).items():
        monkeypatch.setenv(key, value)
    try:
        build_parser().parse_args(command)
    except SystemExit as exc:
        shown = shlex.join(command)
        pytest.fail(f"{name}: `pullwake {shown}` exits {exc.code}: {capsys.readouterr().err}")


def test_every_service_is_health_checked_one_shot_or_ordered() -> None:
    services = _services()
    for name, service in services.items():
        depends_on = service.get("depends_on") or {}
        assert isinstance(depends_on, dict), f"{name}: depends_on needs conditions"
        for dependency, spec in depends_on.items():
            wanted = _condition_to_wait_for(services[dependency])
            assert wanted, f"{name} depends on {dependency}, which has no healthcheck"
            assert spec.get("condition") == wanted, f"{name} -> {dependency}: want {wanted}"
        ordered = bool(depends_on) or "healthcheck" in service or _is_one_shot(service)
        assert ordered, f"{name}: no healthcheck, not one-shot, depends on nothing"


def test_one_shot_migrate_gates_the_api_and_worker() -> None:
    services = _services()
    assert _is_one_shot(services["migrate"])
    assert _command(services["migrate"]) == ["migrate"]
    for name in ("api", "worker"):
        condition = services[name]["depends_on"]["migrate"]["condition"]
        assert condition == "service_completed_successfully"


def test_api_waits_for_healthy_postgres_and_redis() -> None:
    services = _services()
    api = services["api"]
    assert "healthz" in str(api["healthcheck"]["test"])
    for dependency in ("postgres", "redis"):
        assert "healthcheck" in services[dependency]
        assert api["depends_on"][dependency]["condition"] == "service_healthy"
    assert "pg_isready" in str(services["postgres"]["healthcheck"]["test"])
    assert "ping" in str(services["redis"]["healthcheck"]["test"])


def test_the_runner_gets_no_server_credentials_and_time_to_drain() -> None:
    """A runner talks HTTP only; compose stops it later than its drain ends."""
    runner = _services()["runner"]
    env = _environment(runner)
    assert set(env) == {"PULLWAKE_SERVER_URL", "PULLWAKE_TOKEN"}, env
    assert env["PULLWAKE_TOKEN"] == ""  # no placeholder: started with a minted token only
    assert runner["profiles"] == ["demo"]  # so `docker compose up` does not start it tokenless
    grace = re.fullmatch(r"(\d+)s", runner["stop_grace_period"])
    assert grace, runner["stop_grace_period"]
    from pullwake.cli import build_parser

    drain_ms = build_parser().parse_args(_command(runner)).drain_timeout_ms
    assert int(grace.group(1)) * 1000 > drain_ms + 5_000


def test_published_ports_are_loopback_only() -> None:
    for name, service in _services().items():
        for port in service.get("ports", []):
            assert str(port).startswith("127.0.0.1:"), f"{name} publishes {port} on every interface"


def test_the_worker_is_health_checked_by_arq() -> None:
    worker = _services()["worker"]
    assert worker["healthcheck"]["test"][1:] == ["arq", "--check", "pullwake.tasks.WorkerSettings"]


def test_callbacks_point_where_the_runner_container_reaches_the_api() -> None:
    services = _services()
    public = _environment(services["api"])["PULLWAKE_PUBLIC_URL"]
    assert public == _environment(services["runner"])["PULLWAKE_SERVER_URL"] == "http://api:8000"
