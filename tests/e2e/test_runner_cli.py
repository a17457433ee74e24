"""End to end: the README's runner example, run both ways against ``pullwake serve``, and
``pullwake runner`` refused by the server."""

from __future__ import annotations

import asyncio
import os
import re
import secrets
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from .harness import PULLWAKE, Cli, ServerProcess, stop_process

pytestmark = pytest.mark.e2e

README = Path(__file__).resolve().parents[2] / "README.md"
PRINCIPAL = "user:readme@example.com"


def readme_example() -> str:
    """The README's library example (the code block that starts ``# echo_handler.py``)."""
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), re.S)
    [example] = [b for b in blocks if b.startswith("# echo_handler.py\n")]
    return example


async def token(cli: Cli) -> str:
    result = (await cli("tokens", "create", "--principal", PRINCIPAL, "--label", "e2e")).ok()
    return result.stdout.strip()


class Proc:
    """A child process whose stderr goes to a file."""

    def __init__(self, args: list[str], env: dict[str, str], cwd: Path, log: Path) -> None:
        self.log_path = log
        with log.open("wb") as out:
            self.proc = subprocess.Popen(
                args, env=env, cwd=cwd, stdin=subprocess.DEVNULL, stdout=out, stderr=out
            )

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    async def wait_log(self, text: str, timeout: float = 20) -> None:
        for _ in range(int(timeout / 0.05)):
            if text in self.log():
                return
            assert self.proc.poll() is None, f"exited {self.proc.returncode}:\n{self.log()}"
            await asyncio.sleep(0.05)
        raise AssertionError(f"{text!r} not logged:\n{self.log()}")

    async def stop(self) -> int:
        """One SIGTERM; fails if the process needs more."""
        return await stop_process(self.proc, 15, timeout=10, log=self.log)


@pytest.mark.parametrize("how", ["library", "cli"])
async def test_the_readme_example_runs_as_shown(
    server: ServerProcess, cli: Cli, pw_env: dict[str, str], tmp_path: Path, how: str
) -> None:
    (tmp_path / "echo_handler.py").write_text(readme_example())
    secret = await token(cli)
    env = {**pw_env, "PULLWAKE_SERVER_URL": server.base_url, "PULLWAKE_TOKEN": secret}
    env["PYTHONPATH"] = os.pathsep.join(sys.path)
    session = f"readme-{secrets.token_hex(3)}"
    command = [*PULLWAKE, "runner", "--id", "build-box", "--session", session]
    command += ["--handler", "echo_handler:handle"]
    args = [sys.executable, "echo_handler.py"] if how == "library" else command
    proc = Proc(args, env, tmp_path, tmp_path / f"{how}.log")
    try:
        # The library example logs with no logging set up; the command uses its --session
        # (the example's main block did not run on import).
        connected = "runner build-box connected: streaming wakes (session "
        await proc.wait_log(connected + (session if how == "cli" else ""))
        headers = {"Authorization": f"Bearer {secret}"}
        entity = f"/v1/entities/chat/{how}-{secrets.token_hex(3)}"
        policy = {"targets": [{"type": "runner", "runner_id": "build-box"}]}
        async with httpx.AsyncClient(base_url=server.base_url, headers=headers) as http:
            assert (await http.put(entity, json={"dispatch_policy": policy})).status_code == 201
            for text in ("hi", "there"):
                sent = await http.post(f"{entity}/messages", json={"payload": {"text": text}})
                assert sent.status_code == 202, sent.text
            for _ in range(200):
                events = (await http.get(f"{entity}/events")).json()["events"]
                if len(events) == 2:
                    break
                await asyncio.sleep(0.05)
        assert [e["payload"] for e in events] == [
            {"reply": "echo: hi", "to": 1},
            {"reply": "echo: there", "to": 2},
        ]
        assert await proc.stop() == 0
        assert "runner build-box stopped" in proc.log()
    finally:
        if proc.proc.poll() is None:
            proc.proc.kill()
            proc.proc.wait(5)


async def test_a_refused_runner_exits_with_one_line(server: ServerProcess, cli: Cli) -> None:
    refused = Cli({**cli.env, "PULLWAKE_SERVER_URL": server.base_url, "PULLWAKE_TOKEN": "pwk_no"})
    result = await refused("runner", "--id", "build-box", "--exec", "cat", timeout=20)
    assert result.returncode == 78, result.describe()
    assert "Traceback" not in result.stderr
    lines = result.stderr.splitlines()
    assert lines[-1] == (
        "pullwake runner: the server refused the token (401 UNAUTHORIZED): "
        "the API token is unknown or revoked"
    )
    assert [line for line in lines if "refused" in line or "WARNING" in line] == [lines[-1]]
