"""The handler the fault-injection suite loads with ``--handler fault_handler:handle``.

Each claim appends a ``start`` line (with the claim token, so that the suite can replay a late
``done`` of a killed process), one ``msg`` line per processed message and an ``end`` line to the
file named by FAULT_LOG (one ``write`` each; O_APPEND keeps lines whole across processes).
FAULT_HANDLE_MS is how long one claim's handling takes (the window in which a process is killed).
"""

from __future__ import annotations

import asyncio
import json
import os
import time
from typing import Any

from pullwake.runner import Wake


def _record(**fields: Any) -> None:
    line = json.dumps({"pid": os.getpid(), "t": time.time(), **fields}) + "\n"
    fd = os.open(os.environ["FAULT_LOG"], os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, line.encode())
    finally:
        os.close(fd)


async def handle(wake: Wake) -> None:
    """Take FAULT_HANDLE_MS, then process (and ack) every pending message."""
    note = wake.notification
    entity, claim = wake.entity.url, wake.claim_id
    _record(
        kind="start",
        entity=entity,
        claim=claim,
        epoch=wake.epoch,
        token=note.claim_token,
        acked=note.acked_offset,
        tail=note.tail_offset,
    )
    await asyncio.sleep(int(os.environ.get("FAULT_HANDLE_MS", "20")) / 1000)
    async for message in wake.messages:
        _record(kind="msg", entity=entity, claim=claim, offset=message.offset)
        wake.ack(message.offset)
    _record(kind="end", entity=entity, claim=claim, acked=wake.acked_offset)
