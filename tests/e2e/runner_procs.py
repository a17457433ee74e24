"""``pullwake runner`` child processes for the e2e tests (output to a log file each)."""

from __future__ import annotations

import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

from .harness import PULLWAKE, ChildProcess


@dataclass
class RunnerProcess(ChildProcess):
    """One ``python -m pullwake runner ...`` process."""

    args: list[str]
    env: dict[str, str]
    log_path: Path
    cwd: Path
    proc: subprocess.Popen[bytes] | None = None
    name: ClassVar[str] = "runner"
    stop_timeout_s: ClassVar[float] = 20
    cleanup_wait_s: ClassVar[float] = 15

    def start(self) -> None:
        self.spawn([*PULLWAKE, "runner", *self.args], self.env, cwd=self.cwd)
