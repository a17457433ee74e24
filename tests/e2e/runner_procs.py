"""``pullwake runner`` child processes for the e2e tests (output to a log file each)."""

from __future__ import annotations

import asyncio
import signal
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

from .harness import PULLWAKE, cleanup_process, stop_process


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
        assert self.proc is not None
        return await stop_process(self.proc, signal.SIGTERM, timeout=timeout, log=self.log)

    def cleanup(self) -> None:
        """Best effort, never raises: terminate, wait, kill."""
        cleanup_process(self.proc, wait_s=15)
