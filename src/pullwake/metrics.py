"""Prometheus metrics: process counters, plus gauges read from Postgres at scrape time."""

from __future__ import annotations

from collections.abc import Iterator

import prometheus_client
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.metrics_core import Metric

from pullwake.store import Store
from pullwake.store.ops import RunnerGauges, WorkerStatus

__all__ = [
    "CLAIMS",
    "CLAIM_ENDS",
    "CLAIM_TO_DONE",
    "CONTENT_TYPE",
    "FENCED",
    "OTHER_RUNNERS",
    "PRUNED",
    "REGISTRY",
    "SENDS",
    "WAKES_CREATED",
    "WAKES_PARKED",
    "WAKES_PUBLISHED",
    "WAKES_REDELIVERED",
    "WAKE_TO_CLAIM",
    "WEBHOOK_ATTEMPTS",
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
OTHER_RUNNERS = "_other"
"""The ``runner`` label of the per-runner gauges' one series for every runner past the top N
(a runner id starts with a letter or digit, so no runner is called that)."""

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
WAKES_CREATED = Counter(
    "pullwake_wakes_created",
    "Wakes created, by reason (message, follow_up, released, lease_expired, resume, ...)",
    ["reason"],
    registry=REGISTRY,
)
WAKES_PUBLISHED = Counter(
    "pullwake_wakes_published",
    "Wake deliveries: XADD to a runner's stream or a webhook job enqueued, by target and result"
    " (a redelivery counts again)",
    ["target", "result"],
    registry=REGISTRY,
)
WAKES_REDELIVERED = Counter(
    "pullwake_wakes_redelivered",
    "Outstanding wakes published again, by cause (unclaimed: not claimed in time; redis_lost: "
    "the entry was missing from Redis; stranded: left pending by a consumer that went away; "
    "runner_enabled)",
    ["cause"],
    registry=REGISTRY,
)
WAKES_PARKED = Counter(
    "pullwake_wakes_parked",
    "Runner wakes re-delivery left alone because nobody reads the runner's stream",
    registry=REGISTRY,
)
FENCED = Counter(
    "pullwake_fenced_rejections",
    "Calls of a claim's holder refused because the claim is no longer theirs (FENCED: stale "
    "epoch or ended claim; LEASE_EXPIRED: the lease passed), by endpoint and code",
    ["endpoint", "code"],
    registry=REGISTRY,
)
WEBHOOK_ATTEMPTS = Counter(
    "pullwake_webhook_attempts",
    "Webhook delivery attempts, by result (delivered, done, retry, failed, skipped; error: "
    "Postgres or Redis failed, the job is retried)",
    ["result"],
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
CLAIM_TO_DONE = Histogram(
    "pullwake_claim_to_done_seconds",
    "Time from a claim to its done (how long handlers take)",
    buckets=(0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 1800),
    registry=REGISTRY,
)
WAKE_STREAMS = Gauge(
    "pullwake_wake_streams",
    "Wake streams (SSE sessions of runners) open on this process",
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
_RUNNERS = Gauge("pullwake_runners", "Registered runners by liveness", ["state"], registry=REGISTRY)
_RUNNER_LIVENESS = Gauge(
    "pullwake_runner_liveness",
    "1 for the runner's current liveness state (the top runners by backlog only)",
    ["runner", "state"],
    registry=REGISTRY,
)
_RUNNER_OUTSTANDING = Gauge(
    "pullwake_runner_outstanding_wakes",
    f"Unclaimed wakes of each of the top runners by backlog; {OTHER_RUNNERS}: all the others",
    ["runner"],
    registry=REGISTRY,
)
_RUNNER_OLDEST = Gauge(
    "pullwake_runner_oldest_wake_age_seconds",
    f"Age of the oldest unclaimed wake of each of the top runners; {OTHER_RUNNERS}: the oldest "
    "of all the others",
    ["runner"],
    registry=REGISTRY,
)
_RUNNER_ACTIVE = Gauge(
    "pullwake_runner_active_claims",
    f"Active claims of each of the top runners by backlog; {OTHER_RUNNERS}: all the others",
    ["runner"],
    registry=REGISTRY,
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
LIVENESS_STATES = ("online", "expired", "offline")


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


async def _refresh_runners(store: Store, top: int) -> None:
    """One query: the ``top`` runners with the most unclaimed wakes get their own series, the
    rest share the ``_other`` series (sums; the oldest wake of them all), so the series stay
    bounded (6 per top runner, 6 more) whatever the size of the fleet."""
    for gauge in (_RUNNER_LIVENESS, _RUNNER_OUTSTANDING, _RUNNER_OLDEST, _RUNNER_ACTIVE):
        gauge.clear()
    by_state = dict.fromkeys(LIVENESS_STATES, 0)
    other = RunnerGauges(OTHER_RUNNERS, "offline", 0, 0, None, 0)
    for group in await store.runner_gauges(top):
        by_state[group.liveness] += group.runners
        if group.id is None:
            other = RunnerGauges(
                OTHER_RUNNERS,
                "offline",
                other.runners + group.runners,
                other.outstanding_wakes + group.outstanding_wakes,
                max(other.oldest_wake_age_s or 0, group.oldest_wake_age_s or 0),
                other.active_claims + group.active_claims,
            )
            continue
        for state in LIVENESS_STATES:
            _RUNNER_LIVENESS.labels(group.id, state).set(1 if state == group.liveness else 0)
        _RUNNER_OUTSTANDING.labels(group.id).set(group.outstanding_wakes)
        _RUNNER_OLDEST.labels(group.id).set(group.oldest_wake_age_s or 0)
        _RUNNER_ACTIVE.labels(group.id).set(group.active_claims)
    if other.runners:
        _RUNNER_OUTSTANDING.labels(OTHER_RUNNERS).set(other.outstanding_wakes)
        _RUNNER_OLDEST.labels(OTHER_RUNNERS).set(other.oldest_wake_age_s or 0)
        _RUNNER_ACTIVE.labels(OTHER_RUNNERS).set(other.active_claims)
    for state, count in by_state.items():
        _RUNNERS.labels(state).set(count)


async def _refresh(store: Store, top_runners: int) -> None:
    _ENTITIES.clear()
    await _refresh_runners(store, top_runners)
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
    gauges, none of the Postgres-backed ones (the API's ``/metrics`` has those), and the
    process collectors (``process_*``, ``python_*``) of prometheus_client's default registry."""

    NAMES = frozenset(
        {
            "pullwake_claim_ends",
            "pullwake_claim_to_done_seconds",
            "pullwake_fenced_rejections",
            "pullwake_pruned_rows",
            "pullwake_wakes_created",
            "pullwake_wakes_parked",
            "pullwake_wakes_published",
            "pullwake_wakes_redelivered",
            "pullwake_webhook_attempts",
            "pullwake_worker_dependency_up",
            "pullwake_worker_last_pass_timestamp_seconds",
            "pullwake_worker_pass_errors",
        }
    )

    def collect(self) -> Iterator[Metric]:
        """The worker's metric families (prometheus_client's collector protocol)."""
        yield from (family for family in REGISTRY.collect() if family.name in self.NAMES)
        yield from (
            family
            for family in prometheus_client.REGISTRY.collect()
            if family.name.startswith(_PROCESS_PREFIXES)
        )


_PROCESS_PREFIXES = ("process_", "python_")


async def render(store: Store, *, wake_streams: int, top_runners: int) -> bytes:
    """The exposition text: refresh the Postgres-backed gauges, then render everything, with
    prometheus_client's default registry (the HTTP metrics of Litestar's Prometheus plugin and
    the process collectors)."""
    WAKE_STREAMS.set(wake_streams)
    await _refresh(store, top_runners)
    return generate_latest(REGISTRY) + generate_latest(prometheus_client.REGISTRY)
