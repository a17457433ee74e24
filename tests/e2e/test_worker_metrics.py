"""``pullwake worker --metrics-port``: a separately deployed worker's own metrics, scraped."""

from __future__ import annotations

import asyncio
import signal
import subprocess
import time
from pathlib import Path

import httpx
import pytest

from pullwake.testing import free_port

from .harness import PULLWAKE, cleanup_process, stop_process

pytestmark = pytest.mark.e2e


async def _scrape_until(url: str, wanted: list[str], proc: subprocess.Popen[bytes]) -> str:
    deadline = time.monotonic() + 20
    text = ""
    async with httpx.AsyncClient(timeout=2) as http:
        while time.monotonic() < deadline:
            assert proc.poll() is None, "the worker exited"
            try:
                text = (await http.get(url)).text
            except httpx.TransportError:
                text = ""
            if all(line in text for line in wanted):
                return text
            await asyncio.sleep(0.2)
    raise AssertionError(f"never scraped {wanted}; last scrape:\n{text}")


async def test_worker_serves_its_own_metrics(pw_env: dict[str, str], tmp_path: Path) -> None:
    port = free_port()
    log_path = tmp_path / "worker.log"
    env = {**pw_env, "PULLWAKE_RECOVERY_INTERVAL_MS": "200"}
    with log_path.open("wb") as log:
        proc = subprocess.Popen(
            [*PULLWAKE, "worker", "--metrics-port", str(port)],
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    try:
        text = await _scrape_until(
            f"http://127.0.0.1:{port}/metrics",
            [
                'pullwake_worker_dependency_up{dependency="redis"} 1.0',
                'pullwake_worker_dependency_up{dependency="postgres"} 1.0',
                'pullwake_worker_last_pass_timestamp_seconds{job="expire_claims"}',
                'pullwake_worker_last_pass_timestamp_seconds{job="repair_streams"}',
            ],
            proc,
        )
        # Only the worker's own series: the Postgres-backed gauges belong to the API's /metrics.
        assert "pullwake_dead_letters" not in text
        assert "pullwake_sends" not in text
        rc = await stop_process(proc, signal.SIGTERM, timeout=20, log=log_path.read_text)
        assert rc == 0, log_path.read_text()
    finally:
        cleanup_process(proc)
