"""``pullwake inspect``: one readable page per runner, entity or wake, from Postgres and Redis."""

from __future__ import annotations

from typing import Any

from redis.asyncio.cluster import RedisCluster

from pullwake.errors import NotFound
from pullwake.model import liveness
from pullwake.services import Services
from pullwake.streams import GROUP

__all__ = ["inspect_entity", "inspect_runner", "inspect_wake"]


def _lines(title: str, pairs: list[tuple[str, Any]]) -> list[str]:
    width = max((len(k) for k, _ in pairs), default=0)
    return [title, *(f"  {k.ljust(width)}  {v}" for k, v in pairs)]


async def inspect_runner(services: Services, runner_id: str) -> str:
    """Runner row, liveness, backlog and the Redis view of its stream (group, pending, tail)."""
    runner = await services.store.get_runner(runner_id)
    if runner is None:
        raise NotFound(f"runner {runner_id!r} does not exist")
    backlog = await services.store.runner_backlog(runner_id)
    key = services.streams.keys.runner_wakes(runner_id)
    state = liveness(runner.admin_status, runner.lease_expires_at, runner.now)
    out = _lines(
        f"runner {runner_id}",
        [
            ("owner", runner.owner_principal),
            ("label / kind", f"{runner.label!r} / {runner.kind}"),
            ("admin_status", runner.admin_status),
            ("liveness", f"{state.value} (lease until {runner.lease_expires_at})"),
            ("active claims", backlog.active_claims),
            ("outstanding wakes", backlog.outstanding_wakes),
            ("oldest outstanding", f"{backlog.oldest_outstanding_ms or 0:.0f} ms"),
            ("diagnostics", runner.diagnostics),
        ],
    )
    redis = services.redis
    out.append(f"redis stream {key}")
    if isinstance(redis, RedisCluster):  # what ``redis-cli -c`` would be redirected to
        await redis.initialize()
        node = redis.get_node_from_key(key)
        out.append(f"  slot {redis.keyslot(key)} on primary {node.host}:{node.port}")
    out.append(f"  XLEN {await redis.xlen(key)}")
    try:
        for group in await redis.xinfo_groups(key):
            out.append(
                f"  group {group['name']}: consumers={group['consumers']} "
                f"pending={group['pending']} last-delivered={group['last-delivered-id']}"
            )
        for consumer in await redis.xinfo_consumers(key, GROUP):
            out.append(
                f"    consumer {consumer['name']}: pending={consumer['pending']} "
                f"idle={consumer['idle']} ms"
            )
        pending = await redis.xpending_range(key, GROUP, min="-", max="+", count=10)
        for item in pending:
            out.append(
                f"  pending {item['message_id']} consumer={item['consumer']} "
                f"idle={item['time_since_delivered']} ms "
                f"deliveries={item['times_delivered']}"
            )
    except Exception as exc:  # no stream/group yet is a normal state
        out.append(f"  (no consumer group: {exc})")
    for entry_id, fields in await redis.xrevrange(key, count=5):
        out.append(f"  entry {entry_id} " + " ".join(f"{k}={v}" for k, v in fields.items()))
    return "\n".join(out)


async def inspect_entity(services: Services, url: str) -> str:
    """Entity status, offsets, the active claim and its last wakes."""
    view = await services.dispatcher.get_entity(url, None)
    d = view.dispatch
    claim = d.active_claim
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
                f"lease until {claim.lease_expires_at}",
            ),
            ("parked", d.parked_reason or "-"),
            ("failed attempts", d.failed_attempts),
        ],
    )
    out.append("last wakes")
    for wake in await services.store.last_wakes(url, 10):
        out.append(
            f"  {wake.id} epoch {wake.epoch} {wake.reason}: "
            f"{wake.delivery_status}/{wake.claim_status} at {wake.created_at:%H:%M:%S}"
        )
    return "\n".join(out)


async def inspect_wake(services: Services, wake_id: str) -> str:
    """Every column of one wake row."""
    view = await services.dispatcher.get_wake(wake_id, None)
    fields = [(name, getattr(view, name)) for name in view.__struct_fields__]
    return "\n".join(_lines(f"wake {wake_id}", fields))
