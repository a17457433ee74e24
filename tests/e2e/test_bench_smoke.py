"""``./scripts/bench --smoke``: every scenario runs and produces numbers (how fast is not checked).

The bench starts its own ``pullwake serve``, ``pullwake worker``, runner and arq worker processes
against a database and Redis keys of its own; ``wrk`` is used when installed and not needed.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SCENARIOS = {
    "floor",
    "floor_32",
    "arq_default",
    "arq_10ms",
    "wake",
    "coalesced",
    "batch",
    "cycle",
    "recovery",
    "offline",
    "fleet",
}

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(240)]


def test_bench_smoke_measures_every_scenario(tmp_path: Path) -> None:
    out = tmp_path / "results"
    env = {**os.environ, "PULLWAKE_VENV": sys.prefix}  # the venv running this test
    proc = subprocess.run(
        [str(ROOT / "scripts" / "bench"), "--smoke", "--out", str(out)],
        cwd=ROOT,
        env=env,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=200,
    )
    assert proc.returncode == 0, f"{proc.stdout[-6000:]}\n--- stderr\n{proc.stderr[-6000:]}"

    report = json.loads((out / "results.json").read_text())
    results = report["results"]
    assert set(results) == SCENARIOS
    for key, result in results.items():
        latency = result["latency"]
        assert latency["n"] >= 1, key
        assert 0 < latency["p50"] <= latency["p95"] <= latency["p99"], key
        if key not in ("recovery", "offline"):
            assert result["throughput"] > 0, key
        assert result["server_cpu_us"] > 0, key
        assert result["pg_xacts"] is not None, key
        assert result["ratios"]["p50_vs_floor"] > 0, key
        assert result["ratios"]["p50_vs_arq_10ms"] > 0, key
    # Postgres publishes its transaction counts late and the bench subtracts its own probe's
    # cost: on a loaded machine a short smoke window can read a little below zero, so only the
    # presence of the number is checked here (the full run reports it).
    assert results["cycle"]["runner_cpu_us"] > 0
    assert results["recovery"]["latency"]["p50"] >= report["settings"]["claim_lease_ms"] / 2

    machine = report["machine"]
    for field in ("cpu", "cores", "kernel", "python", "postgres", "redis"):
        assert machine[field], field
    assert [t["target"] for t in report["targets"]]
    assert all(t["measured"] is not None for t in report["targets"])

    markdown = (out / "results.md").read_text()
    assert "| target | goal | measured | met |" in markdown
    assert markdown.count("\n| ") >= len(SCENARIOS) + 2
    assert (out / "results.png").stat().st_size > 0
    assert "wrk" in proc.stdout  # the output says whether wrk was used
