"""``pullwake runner`` child processes for the e2e tests (output to a log file each)."""

from __future__ import annotations

import asyncio
import contextlib
import signal
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

from .harness import PULLWAKE


@dataclass
class RunnerProcess:
    """One ``python -m pullwake runner ...`` process."""

    args: list[str]
    env: dict[str, str]
    log_path: Path
    cwd: Path
    proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        with self.log_path.open("ab") as log:
            self.proc = subprocess.Popen(
                [*PULLWAKE, "runner", *self.args],
                env=self.env,
                cwd=self.cwd,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
            )

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    async def wait_log(self, text: str, *, count: int = 1, timeout: float = 15) -> None:
        """Wait until ``text`` appears ``count`` times in the log (fails if the process died)."""
        deadline = time.monotonic() + timeout
        while self.log().count(text) < count:
            if not self.alive:
                raise AssertionError(f"runner exited early:\n{self.log()}")
            if time.monotonic() > deadline:
                raise AssertionError(f"{text!r} x{count} not logged in {timeout} s:\n{self.log()}")
            await asyncio.sleep(0.05)

    async def stop(self, *, timeout: float = 20) -> int:
        """SIGTERM (graceful stop) and wait; killed after ``timeout``. The exit code."""
        proc = self.proc
        assert proc is not None
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            deadline = time.monotonic() + timeout
            while proc.poll() is None and time.monotonic() < deadline:
                await asyncio.sleep(0.05)
        if proc.poll() is None:
            proc.kill()
            proc.wait(5)
            raise AssertionError(f"runner ignored SIGTERM:\n{self.log()}")
        return proc.returncode

    def cleanup(self) -> None:
        """Best effort, never raises: terminate, wait, kill."""
        proc = self.proc
        if proc is None or proc.poll() is not None:
            return
        try:
            proc.terminate()
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(5)
