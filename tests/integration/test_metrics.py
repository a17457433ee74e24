"""/metrics: Prometheus text with Postgres-backed gauges and process counters."""

from __future__ import annotations

import re
from typing import Any


def _value(text: str, series: str) -> float:
    match = re.search(rf"^{re.escape(series)} ([0-9.e+-]+)$", text, re.MULTILINE)
    assert match, f"{series} not in metrics output"
    return float(match.group(1))


async def test_metrics_report_backlog_liveness_and_counters(api: Any) -> None:
    headers = await api.as_("user:metrics@example.com")
    r = await api.http.post("/v1/runners", json={"id": "m-runner"}, headers=headers)
    assert r.status_code == 201
    await api.http.post("/v1/runners/m-runner/heartbeat", json={}, headers=headers)
    policy = {"targets": [{"type": "runner", "runner_id": "m-runner"}]}
    r = await api.http.put("/v1/entities/m/one", json={"dispatch_policy": policy}, headers=headers)
    assert r.status_code == 201
    before = await api.http.get("/metrics")
    sends_before = (
        _value(before.text, 'pullwake_sends_total{outcome="coalesced"}')
        if ('pullwake_sends_total{outcome="coalesced"}' in before.text)
        else 0.0
    )
    for n in range(3):
        r = await api.http.post("/v1/entities/m/one/messages", json={"payload": n}, headers=headers)
        assert r.status_code == 202

    r = await api.http.get("/metrics")
    assert r.status_code == 200
    assert r.headers["content-type"].startswith("text/plain")
    text = r.text
    assert _value(text, 'pullwake_runner_outstanding_wakes{runner="m-runner"}') == 1
    assert _value(text, 'pullwake_runner_liveness{runner="m-runner",state="online"}') == 1
    assert _value(text, 'pullwake_runner_liveness{runner="m-runner",state="expired"}') == 0
    assert _value(text, "pullwake_pending_messages") == 3
    assert _value(text, 'pullwake_entities{status="idle"}') == 1
    assert _value(text, "pullwake_dead_letters") == 0
    assert _value(text, 'pullwake_sends_total{outcome="coalesced"}') - sends_before == 2
    assert _value(text, 'pullwake_runner_oldest_wake_age_seconds{runner="m-runner"}') >= 0
