"""Webhook targets cannot hurt the rest of the worker (real ``pullwake serve`` and ``pullwake
worker`` processes): targets that drip their answer a byte at a time do not delay an unrelated
lease expiry, and a target answering with an endless body does not grow the worker's memory.

Run with ``pytest -s`` to see the measurements.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import pytest

from .test_faults import (
    LEASE_MS,
    Faults,
    WorkerProcess,
    fault_redis_url,
    faults,
    log,
    wait_until,
)

__all__ = ["fault_redis_url", "faults"]  # fixtures, used by name

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(150)]

DRIP_TARGETS = 60
DRIP_EVERY_S = 1.0  # faster than the 2 s per-read timeout of the suite: never times out a read
BIG_BODY_BYTES = 300 * 1024 * 1024
Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


async def _read_request(reader: asyncio.StreamReader) -> None:
    head = await reader.readuntil(b"\r\n\r\n")
    length = next(
        (
            int(line.split(b":", 1)[1])
            for line in head.split(b"\r\n")
            if line.lower().startswith(b"content-length:")
        ),
        0,
    )
    await reader.readexactly(length)


@contextlib.asynccontextmanager
async def _target(handler: Handler) -> AsyncIterator[str]:
    """A raw HTTP/1.1 target on a free loopback port; yields its URL."""

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            await _read_request(reader)
            await handler(reader, writer)
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        yield f"http://127.0.0.1:{port}/hook"
    finally:
        server.close()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(server.wait_closed(), 5)


def reader_gone(writer: asyncio.StreamWriter) -> bool:
    """True once the worker hung up (the transport saw the connection close)."""
    transport = writer.transport
    return transport.is_closing() or transport.get_extra_info("socket") is None


def _vm(pid: int, field: str) -> int:
    """A ``/proc/PID/status`` memory field (VmRSS, VmHWM) in bytes."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1]) * 1024
    raise AssertionError(f"no {field} in /proc/{pid}/status")


async def _unrelated_claim(faults: Faults) -> str:
    """A runner entity with a claim nobody heartbeats; its claim id."""
    [url] = await faults.setup_entities(count=1, first=90)
    r = await faults.call("POST", f"/v1/entities{url}/messages", {"payload": {"n": 1}})
    assert r.status_code == 202, r.text
    wake_id = r.json()["wake"]["id"]
    r = await faults.call("POST", f"/v1/runners/{faults.runner_id}/claim", {"wake_id": wake_id})
    assert r.status_code == 200, r.text
    return str(r.json()["claim_id"])


async def test_dripping_webhook_targets_do_not_delay_lease_expiry(faults: Faults) -> None:
    opened = 0

    async def drip(_: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal opened
        opened += 1
        writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: 100000\r\n\r\n")
        for _ in range(100_000):
            await writer.drain()
            if writer.is_closing() or reader_gone(writer):
                return
            writer.write(b" ")
            await asyncio.sleep(DRIP_EVERY_S)

    await faults.start(workers=1)
    async with _target(drip) as url:
        hooks = await faults.setup_entities({"type": "webhook", "url": url}, count=DRIP_TARGETS)
        for hook in hooks:
            r = await faults.call("POST", f"/v1/entities{hook}/messages", {"payload": 1})
            assert r.status_code == 202, r.text

        async def slots_taken() -> bool:
            return opened >= 50

        await wait_until(slots_taken, timeout=30, what="drip targets connected", faults=faults)
        claim_id = await _unrelated_claim(faults)

        async def expired() -> list[object]:
            return await faults.fetch(
                "SELECT lease_expires_at, released_at FROM claims "
                "WHERE id = $1 AND status <> 'active'",
                claim_id,
            )

        rows = await wait_until(expired, timeout=90, what="unrelated lease expiry", faults=faults)
    delay_s = (rows[0]["released_at"] - rows[0]["lease_expires_at"]).total_seconds()
    log(
        f"{DRIP_TARGETS} dripping targets ({opened} connections): lease "
        f"expired {delay_s:.2f} s after its {LEASE_MS} ms lease"
    )
    assert delay_s < 2.0, faults.logs()


async def test_an_endless_webhook_answer_leaves_worker_memory_flat(faults: Faults) -> None:
    sent = 0
    chunk = b"x" * (1024 * 1024)

    async def endless(_: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal sent
        writer.write(f"HTTP/1.1 200 OK\r\ncontent-length: {BIG_BODY_BYTES}\r\n\r\n".encode())
        while sent < BIG_BODY_BYTES:
            writer.write(chunk)
            await writer.drain()
            sent += len(chunk)

    await faults.start(workers=1)
    worker: WorkerProcess = faults.workers[0]
    assert worker.proc is not None
    pid = worker.proc.pid
    async with _target(endless) as url:
        [hook] = await faults.setup_entities({"type": "webhook", "url": url}, count=1)
        before_hwm, before_rss = _vm(pid, "VmHWM"), _vm(pid, "VmRSS")
        started = time.monotonic()
        r = await faults.call("POST", f"/v1/entities{hook}/messages", {"payload": 1})
        assert r.status_code == 202, r.text

        async def attempted() -> list[object]:
            return await faults.fetch(
                "SELECT attempts, delivery_status, last_error FROM wakes "
                "WHERE entity_url = $1 AND attempts > 0",
                hook,
            )

        rows = await wait_until(attempted, timeout=60, what="a delivery attempt", faults=faults)
        took = time.monotonic() - started
    growth = _vm(pid, "VmHWM") - before_hwm
    log(
        f"{BIG_BODY_BYTES >> 20} MB answer: target wrote {sent >> 20} MB before the worker "
        f"stopped reading; worker RSS {before_rss >> 20} MB -> {_vm(pid, 'VmRSS') >> 20} MB, "
        f"peak +{growth >> 20} MB; attempt recorded after {took:.1f} s ({dict(rows[0])})"
    )
    assert rows[0]["delivery_status"] == "delivered", dict(rows[0])  # a plain 2xx
    assert growth < 100 * 1024 * 1024
    assert sent < BIG_BODY_BYTES  # the worker hung up long before the end
