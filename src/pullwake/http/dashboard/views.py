"""What each dashboard region shows, read for one principal: one Postgres statement per region
(plus one Redis round trip where the runner's streams are shown), never one per row."""

from __future__ import annotations

import re
import time
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

from redis.exceptions import RedisError

from pullwake.core.runners import health_issues
from pullwake.errors import NotFound
from pullwake.inspect import StuckReport, human_age, inspect_stuck
from pullwake.model import ID_PATTERN, TERMINAL, EntityStatus, Principal, is_member, liveness
from pullwake.services import Services
from pullwake.store.ui import UiEntity, UiOverview, UiRunner
from pullwake.streams import GROUP

__all__ = [
    "BUCKETS",
    "BUCKET_S",
    "RUNNER_SORTS",
    "EntityPage",
    "RunnerPage",
    "RunnerRow",
    "chart_svg",
    "entity_page",
    "overview",
    "runner_page",
    "runner_rows",
    "stuck",
]

BUCKET_S = 10
BUCKETS = 60
"""The overview's chart: sends, claims and dones per second in 10 s buckets over 10 minutes."""
RECENT = 20
"""Recent wakes on a runner's page; messages, wakes, claims and events on an entity's."""
STUCK_OLDER_THAN = timedelta(seconds=60)
STUCK_LEASE_MARGIN = timedelta(seconds=5)
"""``pullwake inspect stuck``'s defaults."""


def valid_id(value: str) -> bool:
    """Whether ``value`` can be a runner, type or entity id (else: not found, no query)."""
    return len(value) <= 128 and re.fullmatch(ID_PATTERN, value) is not None


# --- overview ------------------------------------------------------------------------------


async def overview(services: Services, viewer: Principal) -> UiOverview:
    return await services.store.ui_overview(viewer.key, BUCKET_S, BUCKETS)


_SERIES = (("sends", "sends"), ("claims", "claims"), ("dones", "dones"))


def chart_svg(data: UiOverview, *, width: int = 640, height: int = 180) -> dict[str, Any]:
    """The chart's geometry: one polyline per series (per-second rates), the y axis's top and
    the legend, for the template to draw as inline SVG (no JavaScript)."""
    left, right, top, bottom = 44, 8, 10, 22
    plot_w, plot_h = width - left - right, height - top - bottom
    rates = {name: [c / BUCKET_S for c in getattr(data, name)] for name, _ in _SERIES}
    peak = max((max(r, default=0.0) for r in rates.values()), default=0.0)
    ceiling = _nice(peak)
    step = plot_w / max(BUCKETS - 1, 1)
    lines = []
    for name, label in _SERIES:
        points = " ".join(
            f"{left + i * step:.1f},{top + plot_h - (rate / ceiling) * plot_h:.1f}"
            for i, rate in enumerate(rates[name])
        )
        latest = rates[name][-1] if rates[name] else 0.0
        total = sum(getattr(data, name))
        lines.append(
            {"name": name, "label": label, "points": points, "latest": latest, "total": total}
        )
    return {
        "width": width,
        "height": height,
        "left": left,
        "top": top,
        "plot_w": plot_w,
        "plot_h": plot_h,
        "bottom_y": top + plot_h,
        "ceiling": ceiling,
        "lines": lines,
        "minutes": BUCKETS * BUCKET_S // 60,
    }


def _nice(peak: float) -> float:
    """A round axis top at or above ``peak`` (1, 2 or 5 times a power of ten; at least 1)."""
    if peak <= 1:
        return 1.0
    scale = 1.0
    while True:
        for m in (1, 2, 5):
            if peak <= m * scale:
                return m * scale
        scale *= 10


# --- runners -------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class RunnerRow:
    """One row of the runner table."""

    id: str
    label: str
    admin_status: str
    liveness: str
    streams: int | None
    backlog: int
    oldest_s: float | None
    claims: int
    heartbeat_s: float | None
    issues: list[dict[str, str]]

    @property
    def oldest(self) -> str:
        return human_age(self.oldest_s)

    @property
    def heartbeat(self) -> str:
        return "never" if self.heartbeat_s is None else f"{human_age(self.heartbeat_s)} ago"


RUNNER_SORTS = {
    "id": lambda r: r.id,
    "liveness": lambda r: r.liveness,
    "streams": lambda r: r.streams or 0,
    "backlog": lambda r: r.backlog,
    "oldest": lambda r: r.oldest_s if r.oldest_s is not None else -1.0,
    "claims": lambda r: r.claims,
    "heartbeat": lambda r: r.heartbeat_s if r.heartbeat_s is not None else float("inf"),
    "issues": lambda r: len(r.issues),
}
"""The runner table's columns that sort (``?sort=<col>&dir=asc|desc``)."""


def _issues(services: Services, item: UiRunner, stream: dict[str, Any]) -> list[dict[str, str]]:
    runner = item.runner
    state = liveness(runner.admin_status, runner.lease_expires_at, runner.now)
    oldest = item.oldest_wake_age_s
    backlog = {
        "oldest_outstanding_wake_age_ms": None if oldest is None else int(oldest * 1000),
        "parked_entities": item.parked_entities,
        "undelivered_wakes": item.undelivered_wakes,
        "stream": stream,
    }
    return health_issues(
        runner, state, backlog, redeliver_after_ms=services.settings.redeliver_after_ms
    )


def _row(services: Services, item: UiRunner, streams: int | None) -> RunnerRow:
    runner = item.runner
    stream: dict[str, Any] = {} if streams is not None else {"error": "Redis unavailable"}
    seen = runner.last_seen_at
    return RunnerRow(
        id=runner.id,
        label=runner.label,
        admin_status=runner.admin_status,
        liveness=liveness(runner.admin_status, runner.lease_expires_at, runner.now).value,
        streams=streams,
        backlog=item.outstanding_wakes,
        oldest_s=item.oldest_wake_age_s,
        claims=item.active_claims,
        heartbeat_s=None if seen is None else (runner.now - seen).total_seconds(),
        issues=_issues(services, item, stream),
    )


async def _open_streams(services: Services, runner_ids: list[str]) -> list[int | None]:
    """Each runner's open wake streams (live SSE sessions), one Redis round trip for all."""
    if not runner_ids:
        return []
    now_ms = _now_ms()
    keys = services.streams.keys
    try:
        async with services.redis.pipeline(transaction=False) as pipe:
            for runner_id in runner_ids:
                pipe.zcount(keys.runner_sse_sessions(runner_id), now_ms, "+inf")
            counts = await pipe.execute()
    except (RedisError, OSError):
        return [None] * len(runner_ids)
    return [int(c) for c in counts]


MAX_RUNNER_ROWS = 500
"""Rows the runner table renders (after sorting): a refresh every 2 s of a 10,000-runner fleet
would otherwise render all of them (about 60 µs of server CPU a row). The table says how many
it leaves out; sorting brings the others up."""


async def runner_rows(
    services: Services, viewer: Principal, sort: str, descending: bool
) -> list[RunnerRow]:
    """The viewer's runners, sorted by ``sort`` (a key of :data:`RUNNER_SORTS`)."""
    items = await services.store.ui_runners(viewer.key)
    streams = await _open_streams(services, [i.runner.id for i in items])
    rows = [_row(services, item, s) for item, s in zip(items, streams, strict=True)]
    key = RUNNER_SORTS.get(sort, RUNNER_SORTS["id"])
    return sorted(rows, key=key, reverse=descending)


@dataclass(frozen=True, slots=True)
class RunnerPage:
    row: RunnerRow
    item: UiRunner
    consumers: list[dict[str, Any]]
    pending: list[dict[str, Any]]
    stream_error: str | None
    stream_length: int | None


async def runner_page(services: Services, viewer: Principal, runner_id: str) -> RunnerPage:
    """The viewer's runner (NotFound for another principal's, as for none), with what Redis
    says of its stream: ``XINFO CONSUMERS`` and ``XPENDING`` in one round trip."""
    item = None if not valid_id(runner_id) else await services.store.ui_runner(runner_id, RECENT)
    if item is None or item.runner.owner_principal != viewer.key:
        raise NotFound(f"runner {runner_id!r} does not exist")
    key = services.streams.keys.runner_wakes(runner_id)
    now_ms = _now_ms()
    consumers: list[dict[str, Any]] = []
    pending: list[dict[str, Any]] = []
    error = None
    length = None
    streams: int | None = None
    try:
        async with services.redis.pipeline(transaction=False) as pipe:
            pipe.zcount(services.streams.keys.runner_sse_sessions(runner_id), now_ms, "+inf")
            pipe.xlen(key)
            pipe.xinfo_consumers(key, GROUP)
            pipe.xpending_range(key, GROUP, min="-", max="+", count=RECENT)
            results = await pipe.execute(raise_on_error=False)
        streams_r, length_r, consumers_r, pending_r = results
        streams = None if isinstance(streams_r, Exception) else int(streams_r)
        length = None if isinstance(length_r, Exception) else int(length_r)
        if isinstance(consumers_r, Exception) or isinstance(pending_r, Exception):
            error = f"no consumer group yet ({consumers_r})"
        else:
            consumers = [
                {**c, "idle_age": human_age(int(c.get("idle", 0)) / 1000)} for c in consumers_r
            ]
            pending = [
                {**p, "idle_age": human_age(int(p["time_since_delivered"]) / 1000)}
                for p in pending_r
            ]
    except (RedisError, OSError) as exc:
        error = f"Redis unavailable: {type(exc).__name__}"
    row = _row(services, item, streams)
    return RunnerPage(row, item, consumers, pending, error, length)


def _now_ms() -> int:
    return int(time.time() * 1000)


# --- entities ------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class EntityPage:
    entity: UiEntity
    actions: list[str]
    can_act: bool
    timeline: list[dict[str, Any]] = field(default_factory=list)

    @property
    def lease_left(self) -> str:
        left = self.entity.lease_left_s
        if left is None:
            return "-"
        return f"{human_age(left)} left" if left >= 0 else f"passed {human_age(-left)} ago"


def actions_for(status: str, parked: bool) -> list[str]:
    """The signals that change something for an entity in ``status``."""
    state = EntityStatus(status)
    if state in TERMINAL:
        return [] if state is EntityStatus.KILLED else ["kill"]
    out = []
    if state is EntityStatus.PAUSED or parked:
        out.append("resume")
    if state in (EntityStatus.IDLE, EntityStatus.RUNNING):
        out.append("pause")
    return [*out, "stop", "kill"]


async def entity_page(
    services: Services, viewer: Principal, type_name: str, entity_id: str
) -> EntityPage:
    """The entity, for a principal it grants (NotFound otherwise, as for none)."""
    url = f"/{type_name}/{entity_id}"
    found = None
    if valid_id(type_name) and valid_id(entity_id):
        found = await services.store.ui_entity(url, RECENT)
    if found is None or not is_member(
        viewer.key, created_by=found.created_by, members=found.members
    ):
        raise NotFound(f"entity {url} does not exist")
    creator = found.created_by == viewer.key
    actions = actions_for(found.status, found.parked_reason is not None)
    return EntityPage(found, actions if creator else [], creator, found.timeline)


# --- stuck ---------------------------------------------------------------------------------


async def stuck(services: Services, viewer: Principal) -> StuckReport:
    """``pullwake inspect stuck``'s report, of what the viewer may see."""
    return await inspect_stuck(
        services,
        older_than=STUCK_OLDER_THAN,
        lease_margin=STUCK_LEASE_MARGIN,
        viewer=viewer,
    )
