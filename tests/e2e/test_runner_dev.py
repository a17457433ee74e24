"""End to end: ``pullwake dev`` starts a demo runner process and shows wakes flowing."""

from __future__ import annotations

import asyncio
import re
from pathlib import Path

import pytest

from pullwake.testing import free_port

from .harness import PULLWAKE

pytestmark = pytest.mark.e2e


async def test_dev_runs_the_demo_runner_and_the_live_view(
    pw_env: dict[str, str], tmp_path: Path
) -> None:
    port = free_port()
    proc = await asyncio.create_subprocess_exec(
        *PULLWAKE,
        "dev",
        "--port",
        str(port),
        "--data-dir",
        str(tmp_path),
        "--exit-after-demo",
        env=pw_env,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    try:
        out, _ = await asyncio.wait_for(proc.communicate(), 60)
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    text = out.decode()
    runner_log = (tmp_path / "dev-runner.log").read_text()
    assert proc.returncode == 0, text + runner_log
    assert "demo runner 'dev-runner' started as a process" in text
    assert "✓ every message acked by a done" in text, text + runner_log
    rows = re.findall(r"/live/job-\d+-\d\s+idle\s+2/2\s+2 wake\(s\), last completed: \d+ ms", text)
    assert len(rows) == 3, text
    assert "Cancel" not in text  # the runner closed its stream before the server stopped
    assert "connected: streaming wakes" in runner_log
    assert re.search(r"runner dev-runner stopped", runner_log), runner_log
