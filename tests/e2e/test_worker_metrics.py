"""``pullwake worker --metrics-port``: a separately deployed worker's own metrics, scraped."""

from __future__ import annotations

import asyncio
import signal
import subprocess
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from pullwake.testing import free_port

from .harness import PULLWAKE, Cli, ServerProcess, cleanup_process, open_wakes, stop_process
from .test_processes import client_for, create_token, register_runner_and_entity

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


async def test_the_workers_recovery_work_is_scrapeable(
    pw_env: dict[str, str],
    tmp_path: Path,
    server_factory: Callable[..., Awaitable[ServerProcess]],
    cli: Cli,
) -> None:
    """A claim whose holder went away: the worker (configured by PULLWAKE_WORKER_METRICS_PORT)
    expires its lease and wakes the entity again, and its own /metrics says so."""
    pw_env.update(PULLWAKE_CLAIM_LEASE_MS="500", PULLWAKE_RECOVERY_INTERVAL_MS="200")
    server = await server_factory()
    token, _ = await create_token(cli)
    async with client_for(server, token) as http:
        runner_id, _url, path = await register_runner_and_entity(http)
        async with open_wakes(http, runner_id, "gone") as wakes:
            assert (await http.post(f"{path}/messages", json={"payload": 1})).status_code == 202
            entry_id, wake = await wakes.next_wake()
            r = await http.post(
                f"/v1/runners/{runner_id}/claim",
                json={"wake_id": wake["wake_id"], "entry_id": entry_id},
            )
            assert r.status_code == 200, r.text  # and the holder never comes back

    port = free_port()
    log_path = tmp_path / "worker.log"
    with log_path.open("wb") as log:
        proc = subprocess.Popen(
            [*PULLWAKE, "worker"],
            env={**pw_env, "PULLWAKE_WORKER_METRICS_PORT": str(port)},
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    try:
        text = await _scrape_until(
            f"http://127.0.0.1:{port}/metrics",
            [
                'pullwake_claim_ends_total{reason="lease_expired"} 1.0',
                'pullwake_wakes_created_total{reason="lease_expired"} 1.0',
                'pullwake_wakes_published_total{result="ok",target="runner"} 1.0',
            ],
            proc,
        )
        names = {family.name for family in text_string_to_metric_families(text)}
        assert {"pullwake_wakes_redelivered", "pullwake_webhook_attempts"} <= names
        assert "pullwake_http_requests" not in names  # the API's
        rc = await stop_process(proc, signal.SIGTERM, timeout=20, log=log_path.read_text)
        assert rc == 0, log_path.read_text()
    finally:
        cleanup_process(proc)
