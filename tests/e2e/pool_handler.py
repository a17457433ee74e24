"""The handler the runner-pool e2e test loads with ``--handler pool_handler:handle``.

Each call appends ``start``/``end`` lines (and one line per processed message) to the file named
by POOL_LOG, one ``write`` each (O_APPEND keeps lines whole across processes); ``start`` carries
the claim's epoch and token, so that a test can replay a stale holder's calls. A payload with
``fail_once`` raises the first time it is seen (a marker file in POOL_FAIL_DIR remembers it).
POOL_HANDLE_MS (default 0) is an extra time every claim takes before its messages.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import time
from pathlib import Path
from typing import Any

from pullwake.runner import Wake


def _record(**fields: Any) -> None:
    line = json.dumps({"pid": os.getpid(), "ns": time.time_ns(), **fields}) + "\n"
    fd = os.open(os.environ["POOL_LOG"], os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, line.encode())
    finally:
        os.close(fd)


def _first_time(entity_id: str, offset: int) -> bool:
    marker = Path(os.environ["POOL_FAIL_DIR"]) / f"{entity_id}-{offset}"
    try:
        marker.touch(exist_ok=False)
    except FileExistsError:
        return False
    return True


async def handle(wake: Wake) -> None:
    """Process messages one by one, acking each; fail once where asked to."""
    entity, claim = wake.entity.url, wake.claim_id
    note = wake.notification
    _record(
        kind="start",
        entity=entity,
        claim=claim,
        epoch=wake.epoch,
        token=note.claim_token,
        acked=note.acked_offset,
    )
    try:
        await asyncio.sleep(int(os.environ.get("POOL_HANDLE_MS", "0")) / 1000)
        async for message in wake.messages:
            payload = message.payload
            if payload.get("fail_once") and _first_time(wake.entity.id, message.offset):
                _record(kind="fail", entity=entity, claim=claim, offset=message.offset)
                raise RuntimeError(f"injected failure at offset {message.offset}")
            await asyncio.sleep(random.uniform(0.001, 0.004))
            _record(kind="msg", entity=entity, claim=claim, offset=message.offset)
            wake.ack(message.offset)
        if random.random() < 0.1:
            await wake.emit({"handled_through": wake.acked_offset})
    finally:
        _record(kind="end", entity=entity, claim=claim)
