"""Real pullwake processes for the end-to-end tests: the server, the CLI and an SSE reader."""

from __future__ import annotations

import asyncio
import contextlib
import os
import secrets
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import httpx

from support.sse import SseEvent, sse_events

REDIS_URL = os.environ.get("PULLWAKE_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")
ADMIN_DATABASE_URL = os.environ.get(
    "PULLWAKE_TEST_DATABASE_URL", "postgresql://postgres@127.0.0.1:5432/postgres"
)
PULLWAKE = (sys.executable, "-m", "pullwake")


def child_env(**pullwake: str) -> dict[str, str]:
    """The parent environment without any PULLWAKE_* variable, plus ``pullwake``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PULLWAKE_")}
    env["PYTHONUNBUFFERED"] = "1"
    env.update(pullwake)
    return env


# --- CLI -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class CliResult:
    args: tuple[str, ...]
    returncode: int
    stdout: str
    stderr: str

    def ok(self) -> CliResult:
        assert self.returncode == 0, self.describe()
        return self

    def describe(self) -> str:
        return (
            f"pullwake {' '.join(self.args)} exited {self.returncode}\n"
            f"--- stdout\n{self.stdout}\n--- stderr\n{self.stderr}"
        )


@dataclass(frozen=True)
class Cli:
    """Runs ``python -m pullwake ...`` with a fixed environment."""

    env: dict[str, str]

    async def __call__(self, *args: str, timeout: float = 30) -> CliResult:
        proc = await asyncio.create_subprocess_exec(
            *PULLWAKE,
            *args,
            env=self.env,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        try:
            out, err = await asyncio.wait_for(proc.communicate(), timeout)
        except BaseException:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            await proc.wait()
            raise
        assert proc.returncode is not None
        return CliResult(args, proc.returncode, out.decode(), err.decode())


async def retrying(
    http: httpx.AsyncClient,
    method: str,
    path: str,
    body: Any = None,
    *,
    deadline_s: float = 30,
    pause_s: float = 0.05,
) -> httpx.Response:
    """One call, retried on transport errors, 5xx and 429 until ``deadline_s`` (while a server
    restarts or a replica dies; callers make retries safe)."""
    deadline = time.monotonic() + deadline_s
    while True:
        try:
            response = await http.request(method, path, json=body)
            if response.status_code < 500 and response.status_code != 429:
                return response
        except httpx.TransportError:
            pass
        if time.monotonic() > deadline:
            raise AssertionError(f"{method} {path} kept failing")
        await asyncio.sleep(pause_s)


# --- server --------------------------------------------------------------------------------


async def stop_process(
    proc: subprocess.Popen[bytes], sig: int, *, timeout: float, log: Callable[[], str]
) -> int:
    """Send ``sig`` and wait for the exit, polling; kill and fail after ``timeout``."""
    if proc.poll() is None:
        proc.send_signal(sig)
        deadline = time.monotonic() + timeout
        while proc.poll() is None and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
    if proc.poll() is None:
        proc.kill()
        proc.wait(5)
        raise AssertionError(f"{proc.args!r} ignored signal {sig}:\n{log()}")
    return proc.returncode


def cleanup_process(proc: subprocess.Popen[bytes] | None, wait_s: float = 10) -> None:
    """Best effort, never raises: terminate, wait, kill."""
    if proc is None or proc.poll() is not None:
        return
    try:
        proc.terminate()
        proc.wait(wait_s)
    except subprocess.TimeoutExpired:
        proc.kill()
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(5)


class ChildProcess:
    """What the e2e child processes share: spawned with their output appended to ``log_path``,
    read back with :meth:`log`, stopped by a signal or cleaned up for good. The dataclasses
    below hold ``proc`` and ``log_path``."""

    proc: subprocess.Popen[bytes] | None
    log_path: Path
    name: ClassVar[str] = "process"
    stop_timeout_s: ClassVar[float] = 15
    cleanup_wait_s: ClassVar[float] = 10

    def spawn(
        self, argv: Sequence[str], env: dict[str, str], *, cwd: Path | None = None, banner: str = ""
    ) -> None:
        """Start ``argv``; its stdout and stderr go to the log (after ``banner``, if any)."""
        with self.log_path.open("ab") as out:
            if banner:
                out.write(banner.encode())
                out.flush()
            self.proc = subprocess.Popen(
                list(argv),
                env=env,
                cwd=cwd,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
            )

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    async def wait_log(self, text: str, *, count: int = 1, timeout: float = 15) -> None:
        """Wait until ``text`` appears ``count`` times in the log (fails if the process died)."""
        deadline = time.monotonic() + timeout
        while self.log().count(text) < count:
            if not self.alive:
                code = None if self.proc is None else self.proc.returncode
                raise AssertionError(f"{self.name} exited early ({code}):\n{self.log()}")
            if time.monotonic() > deadline:
                raise AssertionError(f"{text!r} x{count} not logged in {timeout} s:\n{self.log()}")
            await asyncio.sleep(0.05)

    def kill(self) -> None:
        """SIGKILL: no drain, no goodbye; the kernel closes its sockets."""
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(5)

    async def stop(self, sig: int = signal.SIGTERM, *, timeout: float | None = None) -> int:
        """Send ``sig`` and wait for the exit (killing it after ``timeout``); the exit code."""
        assert self.proc is not None
        wait = self.stop_timeout_s if timeout is None else timeout
        return await stop_process(self.proc, sig, timeout=wait, log=self.log)

    def cleanup(self) -> None:
        """Best effort, never raises: terminate, wait, kill."""
        cleanup_process(self.proc, wait_s=self.cleanup_wait_s)


@dataclass
class ServerProcess(ChildProcess):
    """``pullwake serve`` as a child process; its output goes to a log file."""

    env: dict[str, str]
    port: int
    log_path: Path
    proc: subprocess.Popen[bytes] | None = None
    name: ClassVar[str] = "pullwake serve"
    starts: int = 0
    args: tuple[str, ...] = ()
    public_url: str | None = None  # PULLWAKE_PUBLIC_URL; default: its own address

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def start(self, *, timeout: float = 20) -> None:
        assert self.proc is None or self.proc.poll() is not None, "already running"
        self.starts += 1
        self.spawn(
            [*PULLWAKE, "serve", "--host", "127.0.0.1", "--port", str(self.port), *self.args],
            {**self.env, "PULLWAKE_PUBLIC_URL": self.public_url or self.base_url},
            banner=f"\n===== start #{self.starts} =====\n",
        )
        await self.wait_ready(timeout)

    async def wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        async with httpx.AsyncClient(base_url=self.base_url, timeout=2) as client:
            while True:
                assert self.proc is not None
                if self.proc.poll() is not None:
                    raise AssertionError(
                        f"pullwake serve exited with {self.proc.returncode}:\n{self.log()}"
                    )
                with contextlib.suppress(httpx.TransportError):
                    response = await client.get("/readyz")
                    if response.status_code == 200:
                        body = response.json()
                        body.pop("workers", None)  # worker processes: informational
                        assert body == {"status": "ready", "postgres": "ok", "redis": "ok"}
                        return
                if time.monotonic() > deadline:
                    raise AssertionError(f"pullwake serve not ready in {timeout} s:\n{self.log()}")
                await asyncio.sleep(0.05)


@dataclass
class WorkerProcess(ChildProcess):
    """``pullwake worker`` as a child process; output to a log file."""

    env: dict[str, str]
    log_path: Path
    argv: tuple[str, ...] = (*PULLWAKE, "worker")
    ready_text: str = "pullwake worker ready"
    proc: subprocess.Popen[bytes] | None = None
    name: ClassVar[str] = "worker"

    def start(self) -> None:
        self.spawn(self.argv, self.env)

    async def wait_ready(self, timeout: float = 20) -> None:
        await self.wait_log(self.ready_text, timeout=timeout)


# --- SSE -----------------------------------------------------------------------------------


@dataclass
class WakeStream:
    """Reads an open ``text/event-stream`` response in a task; events arrive on a queue."""

    response: httpx.Response
    events: asyncio.Queue[SseEvent] = field(default_factory=asyncio.Queue)
    comments: list[str] = field(default_factory=list)
    retry: list[int] = field(default_factory=list)
    ended: asyncio.Event = field(default_factory=asyncio.Event)
    error: BaseException | None = None
    _task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self._read())

    async def _read(self) -> None:
        try:
            async for event in sse_events(self.response.aiter_lines()):
                self.comments += event.comments
                if event.retry is not None:
                    self.retry.append(event.retry)
                if event.has_fields:
                    await self.events.put(event)
        except (httpx.HTTPError, OSError) as exc:
            self.error = exc
        finally:
            self.ended.set()

    async def next_event(self, timeout: float = 10) -> SseEvent:
        get = asyncio.ensure_future(self.events.get())
        ended = asyncio.ensure_future(self.ended.wait())
        try:
            done, _ = await asyncio.wait(
                {get, ended}, timeout=timeout, return_when="FIRST_COMPLETED"
            )
        finally:
            ended.cancel()
        if get in done:
            return get.result()
        get.cancel()
        if self.ended.is_set():
            raise AssertionError(f"the wake stream ended ({self.error!r}) before an event came")
        raise AssertionError(f"no SSE event within {timeout} s")

    async def next_wake(self, timeout: float = 10) -> tuple[str, dict[str, Any]]:
        """The next ``wake`` event: (entry id, data)."""
        event = await self.next_event(timeout)
        assert event.event == "wake", event
        assert event.id is not None, event
        return event.id, event.json()

    async def expect_quiet(self, seconds: float) -> None:
        """No event arrives within ``seconds``."""
        await asyncio.sleep(seconds)
        assert self.events.empty(), f"unexpected event: {self.events.get_nowait()}"

    async def wait_ended(self, timeout: float) -> None:
        await asyncio.wait_for(self.ended.wait(), timeout)

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        await self.response.aclose()


@contextlib.asynccontextmanager
async def open_wakes(
    client: httpx.AsyncClient, runner_id: str, session: str
) -> AsyncIterator[WakeStream]:
    """``GET /v1/runners/{id}/wakes?session=...`` held open, as a runner does."""
    request = client.build_request(
        "GET",
        f"/v1/runners/{runner_id}/wakes",
        params={"session": session},
        headers={"Accept": "text/event-stream"},
        timeout=httpx.Timeout(10, read=None),
    )
    response = await client.send(request, stream=True)
    stream = WakeStream(response)
    try:
        if response.status_code != 200:
            await response.aread()
            raise AssertionError(f"wake stream answered {response.status_code}: {response.text}")
        assert response.headers["content-type"].startswith("text/event-stream")
        stream.start()
        yield stream
    finally:
        await stream.close()


async def runner_and_entity(http: httpx.AsyncClient, prefix: str) -> tuple[str, str]:
    """Register a new runner and create an entity targeting it: (runner id, entity API path)."""
    runner_id, entity_id = f"{prefix}-{secrets.token_hex(4)}", f"e-{secrets.token_hex(4)}"
    assert (await http.post("/v1/runners", json={"id": runner_id})).status_code == 201
    policy = {"targets": [{"type": "runner", "runner_id": runner_id}]}
    path = f"/v1/entities/job/{entity_id}"
    assert (await http.put(path, json={"dispatch_policy": policy})).status_code == 201
    return runner_id, path
