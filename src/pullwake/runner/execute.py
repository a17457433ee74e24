"""``--exec``: run a shell command per wake with the notification as JSON on stdin."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal

import msgspec

from pullwake.runner.health import sanitize
from pullwake.runner.wake import Handler, Release, Wake

__all__ = ["exec_handler"]

log = logging.getLogger("pullwake.runner.exec")

STDERR_TAIL_CHARS = 1_500
KILL_AFTER_S = 5.0


def exec_handler(command: str) -> Handler:
    """A handler running ``command``: exit 0 acks the delivered batch, non-zero releases."""

    async def handle(wake: Wake) -> None:
        stdin = msgspec.json.encode(wake.notification) + b"\n"
        env = {
            **os.environ,
            "PULLWAKE_ENTITY": wake.entity.url,
            "PULLWAKE_CLAIM_ID": wake.claim_id,
            "PULLWAKE_EPOCH": str(wake.epoch),
        }
        process = await asyncio.create_subprocess_shell(
            command,
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            env=env,
            start_new_session=True,
        )
        try:
            stdout, stderr = await process.communicate(stdin)
        except asyncio.CancelledError:
            await _terminate(process)
            raise
        for line in stdout.decode(errors="replace").splitlines()[-50:]:
            log.info("%s | %s", wake.entity.url, sanitize(line, 2_000))  # stdin may be echoed
        if process.returncode != 0:
            tail = sanitize(stderr.decode(errors="replace").strip()[-STDERR_TAIL_CHARS:], 2_000)
            raise Release(f"command exited with status {process.returncode}: {tail}".strip())
        if stderr.strip():
            log.info("%s | stderr: %s", wake.entity.url, sanitize(stderr.decode(errors="replace")))

    return handle


async def _terminate(process: asyncio.subprocess.Process) -> None:
    """SIGTERM the command's process group, then SIGKILL after a grace period."""
    for sig, wait_s in ((signal.SIGTERM, KILL_AFTER_S), (signal.SIGKILL, KILL_AFTER_S)):
        if process.returncode is not None:
            return
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(process.pid, sig)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(process.wait(), wait_s)
