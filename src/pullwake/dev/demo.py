"""``pullwake dev``'s live demo: a real runner process, a few messages and a live terminal view."""

from __future__ import annotations

import asyncio
import contextlib
import os
import secrets
import signal
import sys
import time
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, TextIO

import httpx

from pullwake.runner.wake import Wake

__all__ = [
    "DEMO_RUNNER_ID",
    "DemoRunner",
    "EntityRow",
    "handle",
    "live_demo",
    "render",
    "start_demo_runner",
]

DEMO_RUNNER_ID = "dev-runner"
WORK_S = 0.15  # per message, so "running" is visible in the view


async def handle(wake: Wake) -> None:
    """The demo handler: works on each message for a moment and emits an echo event."""
    async for message in wake.messages:
        await asyncio.sleep(WORK_S)
        await wake.emit({"echo": message.payload, "offset": message.offset})
        wake.ack(message.offset)


class DemoRunner:
    """``pullwake runner --id dev-runner --handler pullwake.dev.demo:handle`` as a child."""

    def __init__(self, base_url: str, token: str, log_path: Path) -> None:
        self.base_url = base_url
        self.token = token
        self.log_path = log_path
        self.session = f"dev-{secrets.token_hex(4)}"
        self.process: asyncio.subprocess.Process | None = None

    async def start(self) -> None:
        """Spawn the runner; its output goes to ``log_path``."""
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with self.log_path.open("ab") as log:
            self.process = await asyncio.create_subprocess_exec(
                sys.executable,
                "-m",
                "pullwake",
                "runner",
                "--id",
                DEMO_RUNNER_ID,
                "--handler",
                "pullwake.dev.demo:handle",
                "--server",
                self.base_url,
                "--label",
                "pullwake dev demo runner",
                "--session",
                self.session,
                env={**os.environ, "PULLWAKE_TOKEN": self.token},
                stdin=asyncio.subprocess.DEVNULL,
                stdout=log,
                stderr=asyncio.subprocess.STDOUT,
            )  # same process group: Ctrl-C in the terminal stops it gracefully too

    async def stop(self, timeout_s: float = 15) -> None:
        """SIGTERM (graceful drain), then SIGKILL after ``timeout_s``."""
        process = self.process
        if process is None or process.returncode is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            process.send_signal(signal.SIGTERM)
        try:
            await asyncio.wait_for(process.wait(), timeout_s)
        except TimeoutError:
            with contextlib.suppress(ProcessLookupError):
                process.kill()
            await process.wait()


@dataclass
class EntityRow:
    """One line of the live view."""

    url: str
    status: str = "idle"
    acked: int = 0
    tail: int = 0
    wakes: list[str] = field(default_factory=list)
    timings: dict[str, tuple[str, float | None, float | None]] = field(default_factory=dict)

    def track(self, wake_id: str | None) -> None:
        """Follow ``wake_id`` (idempotent)."""
        if wake_id and wake_id not in self.wakes:
            self.wakes.append(wake_id)

    @property
    def settled(self) -> bool:
        """Everything sent was acked and every tracked wake is resolved."""
        done = all(self.timings.get(w, ("",))[0] in ("completed", "expired") for w in self.wakes)
        return self.tail > 0 and self.acked == self.tail and done


def _ms(start: str | None, end: str | None) -> float | None:
    if not start or not end:
        return None
    return (datetime.fromisoformat(end) - datetime.fromisoformat(start)).total_seconds() * 1000


def _fmt(ms: float | None) -> str:
    return "…" if ms is None else f"{ms:.0f} ms"


def render(runner_line: str, rows: list[EntityRow]) -> list[str]:
    """The view as lines: the runner, then entity, status, acked/tail and the last wake."""
    lines = [runner_line, f"  {'entity':<28} {'status':<8} {'acked':>7}  wake → claim → done"]
    for row in rows:
        last = row.wakes[-1] if row.wakes else None
        state, to_claim, to_done = row.timings.get(last or "", ("-", None, None))
        wake = f"{len(row.wakes)} wake(s), last {state}: {_fmt(to_claim)} → {_fmt(to_done)}"
        acked = f"{row.acked}/{row.tail}"
        lines.append(f"  {row.url:<28} {row.status:<8} {acked:>7}  {wake if last else '-'}")
    return lines


class _View:
    """Redraws in place on a terminal (rich's ``Live``); elsewhere only the final frame is
    printed, as plain lines."""

    def __init__(self, out: TextIO) -> None:
        from rich.console import Console
        from rich.live import Live

        self.out = out
        self.console = Console(file=out, highlight=False)
        self.live: Live | None = None
        if self.console.is_terminal:
            self.live = Live(console=self.console, auto_refresh=False, transient=False)

    def draw(self, lines: list[str], *, final: bool = False) -> None:
        from rich.text import Text

        text = "\n".join(lines)
        if self.live is None:
            if final:
                self.out.write(text + "\n")
                self.out.flush()
            return
        if not self.live.is_started:
            self.live.start()
        self.live.update(Text(text), refresh=True)
        if final:
            self.live.stop()


async def _runner_state(http: httpx.AsyncClient, session: str) -> tuple[str, bool]:
    """The demo runner's reported status and liveness; True once ``session`` is streaming."""
    response = await http.get(f"/v1/runners/{DEMO_RUNNER_ID}/health")
    if response.status_code != 200:
        return "not registered yet", False
    health: dict[str, Any] = response.json()
    diagnostics = health.get("diagnostics") or {}
    state = f"{diagnostics.get('status', 'starting')}, {health.get('liveness')}"
    connected = diagnostics.get("session") == session and diagnostics.get("stream_connected")
    return state, bool(connected)


def _runner_line(state: str, rows: list[EntityRow]) -> str:
    wakes = [t for row in rows for t in row.timings.values()]
    done = sum(1 for t in wakes if t[0] == "completed")
    return f"runner {DEMO_RUNNER_ID} ({state}): {len(wakes)} wake(s) seen, {done} done"


async def _refresh(http: httpx.AsyncClient, rows: list[EntityRow]) -> None:
    for row in rows:
        _, type_, id_ = row.url.split("/")
        entity = (await http.get(f"/v1/entities/{type_}/{id_}")).json()
        dispatch = entity["dispatch"]
        row.status, row.acked, row.tail = (
            entity["status"],
            dispatch["acked_offset"],
            dispatch["tail_offset"],
        )
        row.track(dispatch["outstanding_wake_id"])
        row.track((dispatch["active_claim"] or {}).get("claim_id"))
        for wake_id in row.wakes:
            if row.timings.get(wake_id, ("",))[0] in ("completed", "expired"):
                continue
            wake = (await http.get(f"/v1/wakes/{wake_id}")).json()
            row.timings[wake_id] = (
                wake["claim_status"],
                _ms(wake["created_at"], wake["claimed_at"]),
                _ms(wake["claimed_at"], wake["resolved_at"]),
            )


async def _send(http: httpx.AsyncClient, rows: list[EntityRow], rounds: int) -> None:
    for n in range(1, rounds + 1):
        for row in rows:
            _, type_, id_ = row.url.split("/")
            response = await http.post(
                f"/v1/entities/{type_}/{id_}/messages", json={"payload": {"round": n}}
            )
            response.raise_for_status()
            row.track(response.json()["wake"]["id"])
            await asyncio.sleep(0.1)
        await asyncio.sleep(0.6)


async def live_demo(
    base_url: str,
    token: str,
    session: str,
    *,
    entities: int = 3,
    rounds: int = 2,
    out: TextIO = sys.stdout,
) -> bool:
    """Send a few messages through the demo runner and show them flowing; True when all settled."""
    headers = {"Authorization": f"Bearer {token}"}
    view = _View(out)
    async with httpx.AsyncClient(base_url=base_url, headers=headers, timeout=10) as http:
        deadline = time.monotonic() + 20
        while not (await _runner_state(http, session))[1]:
            if time.monotonic() > deadline:
                raise TimeoutError("the demo runner did not connect within 20 s")
            await asyncio.sleep(0.1)
        policy = {"targets": [{"type": "runner", "runner_id": DEMO_RUNNER_ID}]}
        rows = [EntityRow(f"/live/job-{int(time.time())}-{i}") for i in range(1, entities + 1)]
        for row in rows:
            _, type_, id_ = row.url.split("/")
            (
                await http.put(f"/v1/entities/{type_}/{id_}", json={"dispatch_policy": policy})
            ).raise_for_status()
        sender = asyncio.create_task(_send(http, rows, rounds))
        deadline = time.monotonic() + 30
        while True:
            await _refresh(http, rows)
            state, _ = await _runner_state(http, session)
            finished = sender.done() and all(row.settled for row in rows)
            timed_out = time.monotonic() > deadline
            view.draw(render(_runner_line(state, rows), rows), final=finished or timed_out)
            if finished or timed_out:
                break
            await asyncio.sleep(0.1)
        if not sender.done():
            sender.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await sender
        return finished


async def start_demo_runner(
    base_url: str, token: str, log_path: Path, *, live: bool, out: TextIO = sys.stdout
) -> DemoRunner:
    """Start the demo runner and, when ``live``, run the live view once; stop it with ``stop()``."""
    runner = DemoRunner(base_url, token, log_path)
    await runner.start()
    out.write(f"• demo runner {DEMO_RUNNER_ID!r} started as a process (log: {log_path})\n")
    if live:
        out.write("\n── live: messages → wake → claim → done through the demo runner ──\n")
        out.flush()
        try:
            settled = await live_demo(base_url, token, runner.session, out=out)
        except (httpx.HTTPError, TimeoutError) as exc:
            out.write(f"✗ live demo failed: {exc!r} (see {log_path})\n")
        else:
            out.write("✓ every message acked by a done\n" if settled else "… still settling\n")
        out.write("─" * 66 + "\n\n")
    out.flush()
    return runner
