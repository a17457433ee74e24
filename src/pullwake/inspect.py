"""``pullwake inspect``: one readable page per runner, entity or wake, from Postgres and Redis,
and ``inspect stuck``: what waits too long, with the ``redis-cli`` command that shows the raw
data of each line. Ages are human ("3 s", "2 min", "1 h 4 min"); ``as_json`` gives the same
content as one JSON document, with ages in seconds."""

from __future__ import annotations

import json
import re
import shlex
from dataclasses import asdict, dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from redis.asyncio.cluster import RedisCluster

from pullwake.errors import NotFound
from pullwake.model import Principal, liveness
from pullwake.services import Services
from pullwake.streams import GROUP

__all__ = [
    "StuckReport",
    "human_age",
    "inspect_entity",
    "inspect_runner",
    "inspect_stuck",
    "inspect_wake",
    "parse_duration",
    "redis_cli",
    "table",
]

STUCK_LIMIT = 50
"""Lines per section of ``inspect stuck`` (each section says when there are more)."""


_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|min|h|d)?\s*$")
_UNIT_S = {"ms": 0.001, "s": 1, "m": 60, "min": 60, "h": 3600, "d": 86_400}


def parse_duration(raw: str) -> timedelta:
    """``"90"`` (seconds), ``"500ms"``, ``"30s"``, ``"5m"``, ``"2h"``, ``"1d"``."""
    match = _DURATION.match(raw)
    if match is None:
        raise ValueError(f"not a duration (e.g. 30s, 5m, 2h): {raw!r}")
    return timedelta(seconds=float(match.group(1)) * _UNIT_S[match.group(2) or "s"])


def human_age(seconds: float | None) -> str:
    """``"0.4 s"``, ``"3 s"``, ``"2 min"``, ``"1 h 4 min"``, ``"2 d 3 h"``; ``"-"`` for None."""
    if seconds is None:
        return "-"
    s = abs(seconds)
    if s < 10:
        text = f"{s:.1f} s" if s < 1 else f"{s:.0f} s"
    elif s < 60:
        text = f"{int(s)} s"
    elif s < 3600:
        minutes, rest = divmod(int(s), 60)
        text = f"{minutes} min" + (f" {rest} s" if minutes < 10 and rest else "")
    elif s < 86_400:
        hours, rest = divmod(int(s) // 60, 60)
        text = f"{hours} h" + (f" {rest} min" if rest else "")
    else:
        days, rest = divmod(int(s) // 3600, 24)
        text = f"{days} d" + (f" {rest} h" if rest else "")
    return f"-{text}" if seconds < 0 else text


def table(headers: list[str], rows: list[list[str]], indent: str = "  ") -> list[str]:
    """Left-aligned columns, a header line, one line per row."""
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(headers)]

    def line(cells: list[str]) -> str:
        return indent + "  ".join(c.ljust(w) for c, w in zip(cells, widths, strict=True)).rstrip()

    return [line(headers), *(line(r) for r in rows)]


def redis_cli(services: Services, *command: str) -> str:
    """The ``redis-cli`` command line that shows this data (``-c`` on a cluster; the server
    from ``PULLWAKE_REDIS_URL``, as the shell expands it)."""
    cluster = " -c" if services.settings.redis_cluster else ""
    return f'redis-cli{cluster} -u "$PULLWAKE_REDIS_URL" ' + " ".join(map(shlex.quote, command))


def _json(data: Any) -> str:
    return json.dumps(data, indent=2, default=str, ensure_ascii=False)


def _lines(title: str, pairs: list[tuple[str, Any]]) -> list[str]:
    width = max((len(k) for k, _ in pairs), default=0)
    return [title, *(f"  {k.ljust(width)}  {v}" for k, v in pairs)]


def _until(moment: datetime | None, now: datetime) -> str:
    if moment is None:
        return "-"
    left = (moment - now).total_seconds()
    return f"in {human_age(left)}" if left >= 0 else f"{human_age(-left)} ago"


async def inspect_runner(services: Services, runner_id: str, *, as_json: bool = False) -> str:
    """Runner row, liveness, backlog and the Redis view of its stream (group, pending, tail)."""
    runner = await services.store.get_runner(runner_id)
    if runner is None:
        raise NotFound(f"runner {runner_id!r} does not exist")
    backlog = await services.store.runner_backlog(runner_id)
    key = services.streams.keys.runner_wakes(runner_id)
    state = liveness(runner.admin_status, runner.lease_expires_at, runner.now)
    oldest_s = (
        None if backlog.oldest_outstanding_ms is None else backlog.oldest_outstanding_ms / 1000
    )
    data: dict[str, Any] = {
        "runner": runner_id,
        "owner": runner.owner_principal,
        "label": runner.label,
        "kind": runner.kind,
        "admin_status": runner.admin_status,
        "liveness": state.value,
        "last_seen_at": runner.last_seen_at,
        "lease_expires_at": runner.lease_expires_at,
        "active_claims": backlog.active_claims,
        "outstanding_wakes": backlog.outstanding_wakes,
        "oldest_outstanding_s": oldest_s,
        "parked_entities": backlog.parked_entities,
        "diagnostics": runner.diagnostics,
    }
    out = _lines(
        f"runner {runner_id}",
        [
            ("owner", runner.owner_principal),
            ("label / kind", f"{runner.label!r} / {runner.kind}"),
            ("admin_status", runner.admin_status),
            (
                "liveness",
                f"{state.value} (lease ends {_until(runner.lease_expires_at, runner.now)})",
            ),
            ("last seen", _until(runner.last_seen_at, runner.now)),
            ("active claims", backlog.active_claims),
            ("outstanding wakes", backlog.outstanding_wakes),
            ("oldest outstanding", human_age(oldest_s)),
            ("parked entities", backlog.parked_entities),
            ("diagnostics", runner.diagnostics),
        ],
    )
    redis = services.redis
    stream: dict[str, Any] = {"key": key}
    out.append(f"redis stream {key}")
    if isinstance(redis, RedisCluster):  # what ``redis-cli -c`` would be redirected to
        await redis.initialize()
        node = redis.get_node_from_key(key)
        stream["slot"], stream["primary"] = redis.keyslot(key), f"{node.host}:{node.port}"
        out.append(f"  slot {stream['slot']} on primary {stream['primary']}")
    stream["length"] = await redis.xlen(key)
    out.append(f"  XLEN {stream['length']}")
    try:
        stream["groups"] = groups = await redis.xinfo_groups(key)
        for group in groups:
            out.append(
                f"  group {group['name']}: consumers={group['consumers']} "
                f"pending={group['pending']} last-delivered={group['last-delivered-id']}"
            )
        stream["consumers"] = consumers = await redis.xinfo_consumers(key, GROUP)
        for consumer in consumers:
            out.append(
                f"    consumer {consumer['name']}: pending={consumer['pending']} "
                f"idle {human_age(consumer['idle'] / 1000)}"
            )
        pending = await redis.xpending_range(key, GROUP, min="-", max="+", count=10)
        stream["pending"] = pending
        for item in pending:
            out.append(
                f"  pending {item['message_id']} consumer={item['consumer']} "
                f"idle {human_age(item['time_since_delivered'] / 1000)} "
                f"deliveries={item['times_delivered']}"
            )
    except Exception as exc:  # no stream/group yet is a normal state
        stream["error"] = str(exc)
        out.append(f"  (no consumer group: {exc})")
    stream["last_entries"] = entries = await redis.xrevrange(key, count=5)
    for entry_id, fields in entries:
        out.append(f"  entry {entry_id} " + " ".join(f"{k}={v}" for k, v in fields.items()))
    out.append(f"  raw: {redis_cli(services, 'XINFO', 'STREAM', key)}")
    if as_json:
        return _json({**data, "redis": stream})
    return "\n".join(out)


async def inspect_entity(services: Services, url: str, *, as_json: bool = False) -> str:
    """Entity status, offsets, the active claim and its last wakes."""
    view = await services.dispatcher.get_entity(url, None)
    d = view.dispatch
    claim = d.active_claim
    wakes = await services.store.last_wakes(url, 10)
    if as_json:
        from pullwake.wire import json_encoder

        data = json.loads(json_encoder.encode(view))
        data["last_wakes"] = [asdict(w) for w in wakes]
        return _json(data)
    now = datetime.now(UTC)
    out = _lines(
        f"entity {view.url}",
        [
            ("status", view.status),
            ("created_by", view.created_by),
            ("policy", view.dispatch_policy),
            (
                "offsets",
                f"acked {d.acked_offset} / tail {d.tail_offset} "
                f"({d.tail_offset - d.acked_offset} pending)",
            ),
            ("epoch", d.epoch),
            ("outstanding wake", d.outstanding_wake_id or "-"),
            (
                "active claim",
                "-"
                if claim is None
                else f"{claim.claim_id} epoch {claim.epoch} runner {claim.runner_id} "
                f"lease ends {_until(claim.lease_expires_at, now)}",
            ),
            ("parked", d.parked_reason or "-"),
            ("failed attempts", d.failed_attempts),
        ],
    )
    out.append("last wakes")
    rows = [
        [
            w.id,
            f"epoch {w.epoch}",
            w.reason,
            f"{w.delivery_status}/{w.claim_status}",
            f"{human_age((now - w.created_at).total_seconds())} ago",
        ]
        for w in wakes
    ]
    if rows:
        out += table(["wake", "epoch", "reason", "delivery/claim", "created"], rows)
    return "\n".join(out)


async def inspect_wake(services: Services, wake_id: str, *, as_json: bool = False) -> str:
    """Every column of one wake row."""
    view = await services.dispatcher.get_wake(wake_id, None)
    fields = [(name, getattr(view, name)) for name in view.__struct_fields__]
    if as_json:
        return _json(dict(fields))
    return "\n".join(_lines(f"wake {wake_id}", fields))


@dataclass(frozen=True, slots=True)
class StuckReport:
    """The four sections of ``inspect stuck``, each a list of JSON-ready rows."""

    older_than_s: float
    lease_margin_s: float
    wakes: list[dict[str, Any]]
    claims: list[dict[str, Any]]
    parked: list[dict[str, Any]]
    runners: list[dict[str, Any]]

    def json(self) -> str:
        return _json(asdict(self))

    def text(self) -> str:
        out: list[str] = []
        section(
            out,
            f"wakes unclaimed for more than {human_age(self.older_than_s)}",
            ["wake", "entity", "target", "age", "delivery", "attempts"],
            [
                [
                    w["id"],
                    w["entity_url"],
                    w["runner_id"] or w["target_type"] or "-",
                    human_age(w["age_s"]),
                    w["delivery_status"] + (" (parked: nobody reads)" if w["parked"] else ""),
                    str(w["attempts"]),
                ]
                for w in self.wakes
            ],
            [w["redis_cli"] for w in self.wakes],
        )
        section(
            out,
            f"claims past their lease or within {human_age(self.lease_margin_s)} of it",
            ["claim", "entity", "runner", "epoch", "held", "lease", "last heartbeat"],
            [
                [
                    c["id"],
                    c["entity_url"],
                    c["runner_id"] or "(webhook)",
                    str(c["epoch"]),
                    human_age(c["held_s"]),
                    f"ends in {human_age(c['lease_left_s'])}"
                    if c["lease_left_s"] >= 0
                    else f"passed {human_age(-c['lease_left_s'])} ago",
                    "never"
                    if c["heartbeat_age_s"] is None
                    else f"{human_age(c['heartbeat_age_s'])} ago",
                ]
                for c in self.claims
            ],
            [c["redis_cli"] for c in self.claims],
        )
        section(
            out,
            "parked entities (resume them with the signal `resume`)",
            ["entity", "status", "since", "pending", "attempts", "reason"],
            [
                [
                    e["entity_url"],
                    e["status"],
                    human_age(e["since_s"]),
                    str(e["pending_messages"]),
                    str(e["failed_attempts"]),
                    e["parked_reason"],
                ]
                for e in self.parked
            ],
            [e["redis_cli"] for e in self.parked],
        )
        section(
            out,
            "runners not online with wakes waiting",
            ["runner", "liveness", "lease passed", "last seen", "waiting", "oldest"],
            [
                [
                    r["id"],
                    r["liveness"] + ("" if r["admin_status"] == "enabled" else " (disabled)"),
                    "-" if r["expired_s"] is None else f"{human_age(r['expired_s'])} ago",
                    "never" if r["seen_age_s"] is None else f"{human_age(r['seen_age_s'])} ago",
                    str(r["outstanding_wakes"]),
                    human_age(r["oldest_wake_age_s"]),
                ]
                for r in self.runners
            ],
            [r["redis_cli"] for r in self.runners],
        )
        return "\n".join(out)


def section(
    out: list[str],
    title: str,
    headers: list[str],
    rows: list[list[str]],
    commands: list[str | None],
) -> None:
    """A titled table, each row followed by its ``redis-cli`` command (when it has one)."""
    more = f" (the first {STUCK_LIMIT})" if len(rows) >= STUCK_LIMIT else ""
    out.append(f"{title}: {len(rows) or 'none'}{more}")
    if rows:
        header, *lines = table(headers, rows)
        out.append(header)
        for line, command in zip(lines, commands, strict=True):
            out.append(line)
            if command:
                out.append(f"      $ {command}")
    out.append("")


async def inspect_stuck(
    services: Services,
    *,
    older_than: timedelta,
    lease_margin: timedelta,
    viewer: Principal | None = None,
) -> StuckReport:
    """What waits too long: four queries, one per section (never one per row). ``viewer`` (the
    dashboard's caller): only the entities it may see and the runners it owns; None (the CLI,
    which holds the database credentials): everything."""
    store, keys = services.store, services.streams.keys
    key = None if viewer is None else viewer.key
    wakes = await store.stuck_wakes(older_than, STUCK_LIMIT, key)
    claims = await store.stuck_claims(lease_margin, STUCK_LIMIT, key)
    parked = await store.parked_entities(STUCK_LIMIT, key)
    runners = await store.stuck_runners(STUCK_LIMIT, key)

    def stream_command(runner_id: str | None, entry_id: str | None = None) -> str | None:
        if runner_id is None:
            return None
        key = keys.runner_wakes(runner_id)
        if entry_id:
            return redis_cli(services, "XRANGE", key, entry_id, entry_id)
        return redis_cli(services, "XPENDING", key, GROUP, "-", "+", "10")

    return StuckReport(
        older_than_s=older_than.total_seconds(),
        lease_margin_s=lease_margin.total_seconds(),
        wakes=[
            {**asdict(w), "redis_cli": stream_command(w.runner_id, w.stream_entry_id)}
            for w in wakes
        ],
        claims=[{**asdict(c), "redis_cli": stream_command(c.runner_id)} for c in claims],
        parked=[
            {
                **asdict(e),
                "redis_cli": None
                if e.target_runner_id is None
                else redis_cli(services, "XINFO", "GROUPS", keys.runner_wakes(e.target_runner_id)),
            }
            for e in parked
        ],
        runners=[
            {
                **asdict(r),
                "redis_cli": redis_cli(
                    services, "XINFO", "CONSUMERS", keys.runner_wakes(r.id), GROUP
                ),
            }
            for r in runners
        ],
    )
