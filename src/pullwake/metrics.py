"""Prometheus metrics: process counters, plus gauges read from Postgres at scrape time."""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.metrics_core import Metric

from pullwake.model import liveness
from pullwake.store import Store
from pullwake.store.ops import WorkerStatus

__all__ = [
    "CLAIMS",
    "CONTENT_TYPE",
    "PRUNED",
    "REGISTRY",
    "SENDS",
    "WAKE_TO_CLAIM",
    "WORKER_DEPENDENCY_UP",
    "WORKER_LAST_PASS",
    "WORKER_PASS_ERRORS",
    "WorkerMetrics",
    "render",
    "worker_state",
    "workers_by_state",
]

CONTENT_TYPE = "text/plain; version=0.0.4"  # Litestar appends the charset
REGISTRY = CollectorRegistry(auto_describe=True)
MAX_RUNNER_SERIES = 1_000

SENDS = Counter(
    "pullwake_sends", "Messages accepted, by wake outcome", ["outcome"], registry=REGISTRY
)
CLAIMS = Counter("pullwake_claims", "Claim requests, by answer", ["outcome"], registry=REGISTRY)
CLAIM_ENDS = Counter(
    "pullwake_claim_ends",
    "Claims ended, by reason (done, release, lease_expired, ...)",
    ["reason"],
    registry=REGISTRY,
)
PRUNED = Counter(
    "pullwake_pruned_rows",
    "Rows deleted by retention (PULLWAKE_RETENTION_MS), by table",
    ["table"],
    registry=REGISTRY,
)
WAKE_TO_CLAIM = Histogram(
    "pullwake_wake_to_claim_seconds",
    "Time from wake creation to its claim",
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 15, 60, 300),
    registry=REGISTRY,
)
WORKER_DEPENDENCY_UP = Gauge(
    "pullwake_worker_dependency_up",
    "1 while this process's worker reaches the dependency (redis, postgres), else 0",
    ["dependency"],
    registry=REGISTRY,
)
WORKER_LAST_PASS = Gauge(
    "pullwake_worker_last_pass_timestamp_seconds",
    "Unix time of the last successful pass of each periodic worker job in this process",
    ["job"],
    registry=REGISTRY,
)
WORKER_PASS_ERRORS = Counter(
    "pullwake_worker_pass_errors",
    "Periodic worker job passes that failed, by job",
    ["job"],
    registry=REGISTRY,
)
_RUNNER_LIVENESS = Gauge(
    "pullwake_runner_liveness",
    "1 for the runner's current liveness state",
    ["runner", "state"],
    registry=REGISTRY,
)
_RUNNER_OUTSTANDING = Gauge(
    "pullwake_runner_outstanding_wakes",
    "Unclaimed wakes per runner",
    ["runner"],
    registry=REGISTRY,
)
_RUNNER_OLDEST = Gauge(
    "pullwake_runner_oldest_wake_age_seconds",
    "Age of the oldest unclaimed wake per runner",
    ["runner"],
    registry=REGISTRY,
)
_RUNNER_ACTIVE = Gauge(
    "pullwake_runner_active_claims", "Active claims per runner", ["runner"], registry=REGISTRY
)
_ENTITIES = Gauge("pullwake_entities", "Entities by status", ["status"], registry=REGISTRY)
_PARKED = Gauge("pullwake_entities_parked", "Entities whose dispatch is parked", registry=REGISTRY)
_PENDING = Gauge(
    "pullwake_pending_messages", "Inbox messages not yet acked by a done", registry=REGISTRY
)
_DEAD = Gauge("pullwake_dead_letters", "Wakes whose delivery failed for good", registry=REGISTRY)
_WORKERS = Gauge(
    "pullwake_workers",
    "Worker processes by state (working, impaired: Redis down or a job failing, silent)",
    ["state"],
    registry=REGISTRY,
)
_WORKER_RECOVERY = Gauge(
    "pullwake_worker_last_recovery_timestamp_seconds",
    "Unix time of each worker's last successful periodic (recovery) pass",
    ["worker"],
    registry=REGISTRY,
)
_WORKER_SEEN_AGE = Gauge(
    "pullwake_worker_seen_age_seconds",
    "Seconds since each worker last recorded its status",
    ["worker"],
    registry=REGISTRY,
)
MAX_WORKER_SERIES = 100
WORKER_STATES = ("working", "impaired", "silent")


def worker_state(status: WorkerStatus) -> str:
    """``working``, ``impaired`` (alive, but Redis is down or a job keeps failing) or
    ``silent`` (no status for about five probes: stopped, hung or cut off from Postgres)."""
    if status.silent:
        return "silent"
    return "working" if status.redis_ok and not status.failing_jobs else "impaired"


async def workers_by_state(store: Store) -> dict[str, int]:
    """How many workers are in each state, from their status rows."""
    counts = dict.fromkeys(WORKER_STATES, 0)
    for status in await store.worker_statuses(MAX_WORKER_SERIES):
        counts[worker_state(status)] += 1
    return counts


async def _refresh_workers(store: Store) -> None:
    _WORKER_RECOVERY.clear()
    _WORKER_SEEN_AGE.clear()
    counts = dict.fromkeys(WORKER_STATES, 0)
    for status in await store.worker_statuses(MAX_WORKER_SERIES):
        counts[worker_state(status)] += 1
        _WORKER_SEEN_AGE.labels(status.worker_id).set(status.seen_age_s)
        if status.last_recovery_at is not None:
            _WORKER_RECOVERY.labels(status.worker_id).set(status.last_recovery_at.timestamp())
    for state, count in counts.items():
        _WORKERS.labels(state).set(count)


async def _refresh(store: Store) -> None:
    for gauge in (_RUNNER_LIVENESS, _RUNNER_OUTSTANDING, _RUNNER_OLDEST, _RUNNER_ACTIVE, _ENTITIES):
        gauge.clear()
    for runner in await store.runner_gauges(MAX_RUNNER_SERIES):
        current = liveness(runner.admin_status, runner.lease_expires_at, runner.now).value
        for state in ("online", "expired", "offline"):
            _RUNNER_LIVENESS.labels(runner.id, state).set(1 if state == current else 0)
        _RUNNER_OUTSTANDING.labels(runner.id).set(runner.outstanding_wakes)
        _RUNNER_OLDEST.labels(runner.id).set(runner.oldest_wake_age_s or 0)
        _RUNNER_ACTIVE.labels(runner.id).set(runner.active_claims)
    parked = pending = 0
    for counts in await store.entity_counts():
        _ENTITIES.labels(counts.status).set(counts.entities)
        parked += counts.parked
        pending += counts.pending_messages
    _PARKED.set(parked)
    _PENDING.set(pending)
    _DEAD.set(await store.dead_letters())
    await _refresh_workers(store)


class WorkerMetrics:
    """What a worker process serves on ``pullwake worker --metrics-port``: its own counters and
    gauges, none of the Postgres-backed ones (the API's ``/metrics`` has those)."""

    NAMES = frozenset(
        {
            "pullwake_claim_ends",
            "pullwake_pruned_rows",
            "pullwake_worker_dependency_up",
            "pullwake_worker_last_pass_timestamp_seconds",
            "pullwake_worker_pass_errors",
        }
    )

    def collect(self) -> Iterator[Metric]:
        """The worker's metric families (prometheus_client's collector protocol)."""
        return (family for family in REGISTRY.collect() if family.name in self.NAMES)


async def render(store: Store) -> bytes:
    """The exposition text: refresh the Postgres-backed gauges, then render everything."""
    await _refresh(store)
    return generate_latest(REGISTRY)
