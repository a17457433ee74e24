"""The benchmark's runner handler: ``pullwake runner --handler bench_handler:handle``.

For every message it sends one UDP datagram to ``PULLWAKE_BENCH_NOTIFY`` (``host:port``):
``[entity, offset, start time, pid]`` as JSON, so the bench learns when a cycle reached a
handler, and in which process, without polling the API. A message whose payload holds
``"hold": true`` keeps the claim (the runner heartbeats it) until the process is killed: the
bench's recovery scenario kills that process with SIGKILL.
"""

from __future__ import annotations

import asyncio
import json
import os
import socket
import time

from pullwake.runner.wake import Wake

_host, _, _port = os.environ.get("PULLWAKE_BENCH_NOTIFY", "127.0.0.1:9").rpartition(":")
_target = (_host, int(_port))
_socket = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
_pid = os.getpid()


async def handle(wake: Wake) -> None:
    """Report each message; hold the claim for a ``hold`` message."""
    async for message in wake.messages:
        note = [wake.entity.url, message.offset, time.time(), _pid]
        _socket.sendto(json.dumps(note).encode(), _target)
        payload = message.payload
        if isinstance(payload, dict) and payload.get("hold"):
            await asyncio.sleep(3600)
