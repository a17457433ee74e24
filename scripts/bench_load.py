"""A small HTTP/1.1 keep-alive client for generating load, and a load-generator process.

httpx spends a few hundred microseconds of CPU per request; on a 2-core machine that CPU is
taken from the server being measured. This client writes a fixed request head and reads the
status line, the headers and a ``Content-Length`` (or chunked) body: enough for the pullwake
API on loopback, and several times cheaper.

``python scripts/bench_load.py SPEC_JSON`` runs one load-generator process (the fallback when
``wrk`` is not installed): ``connections`` keep-alive connections POST ``body`` to ``path``
from wall-clock time ``start_at`` for ``duration_s`` seconds, then one JSON line is printed
(requests, non-2xx answers, latencies in microseconds, the process's CPU seconds).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import sys
import time
from collections.abc import Iterator
from typing import Any

__all__ = ["Client", "HttpError", "cpu_self_s", "hammer"]


class HttpError(Exception):
    """A response with an unexpected status."""

    def __init__(self, status: int, body: bytes) -> None:
        super().__init__(f"HTTP {status}: {body[:300]!r}")
        self.status = status
        self.body = body


def cpu_self_s() -> float:
    """CPU seconds (user + system) of this process so far, to the microsecond
    (``os.times()`` counts 10 ms ticks: a smoke run's floor could read 0)."""
    return time.process_time()


class _Connection:
    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer
        self.last_used = time.monotonic()

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.writer.close()

    async def request(self, head: bytes, body: bytes) -> tuple[int, bytes, bool]:
        """One request; (status, body, keep-alive)."""
        self.writer.write(head + body if body else head)
        reply = await self.reader.readuntil(b"\r\n\r\n")
        status = int(reply[9:12])
        length = -1
        chunked = False
        keep = True
        for line in reply.split(b"\r\n")[1:]:
            name, _, value = line.partition(b":")
            name = name.strip().lower()
            if name == b"content-length":
                length = int(value)
            elif name == b"transfer-encoding" and b"chunked" in value.lower():
                chunked = True
            elif name == b"connection" and value.strip().lower() == b"close":
                keep = False
        if chunked:
            parts = []
            while True:
                size = int((await self.reader.readuntil(b"\r\n")).split(b";")[0], 16)
                if size == 0:
                    await self.reader.readuntil(b"\r\n")
                    break
                parts.append(await self.reader.readexactly(size + 2))
            data = b"".join(part[:-2] for part in parts)
        elif length > 0:
            data = await self.reader.readexactly(length)
        else:
            data = b""
        self.last_used = time.monotonic()
        return status, data, keep


class Client:
    """Up to ``size`` keep-alive connections to ``host:port`` sending ``Bearer token``.

    A connection idle for longer than ``max_idle_s`` is replaced before use, so the server's
    keep-alive timeout (uvicorn: 5 s) never closes one under a request.
    """

    def __init__(
        self, host: str, port: int, token: str, *, size: int = 32, max_idle_s: float = 3.0
    ) -> None:
        self.host = host
        self.port = port
        self.token = token
        self.max_idle_s = max_idle_s
        self._idle: list[_Connection] = []
        self._slots = asyncio.Semaphore(size)

    def head(self, method: str, path: str, body: bytes, token: str | None = None) -> bytes:
        """The request line and headers of one request."""
        lines = [
            f"{method} {path} HTTP/1.1",
            f"Host: {self.host}:{self.port}",
            f"Authorization: Bearer {token or self.token}",
        ]
        if body or method == "POST":
            lines += ["Content-Type: application/json", f"Content-Length: {len(body)}"]
        return ("\r\n".join(lines) + "\r\n\r\n").encode()

    async def _connection(self) -> _Connection:
        while self._idle:
            connection = self._idle.pop()
            if time.monotonic() - connection.last_used < self.max_idle_s:
                return connection
            connection.close()
        reader, writer = await asyncio.open_connection(self.host, self.port, limit=1 << 22)
        return _Connection(reader, writer)

    async def call(
        self,
        method: str,
        path: str,
        body: bytes = b"",
        *,
        token: str | None = None,
        head: bytes | None = None,
    ) -> tuple[int, bytes]:
        """Send one request (``head`` precomputed by :meth:`head`, or built); (status, body)."""
        request_head = head or self.head(method, path, body, token)
        async with self._slots:
            connection = await self._connection()
            try:
                status, data, keep = await connection.request(request_head, body)
            except BaseException:
                connection.close()
                raise
            if keep:
                self._idle.append(connection)
            else:
                connection.close()
            return status, data

    async def json(
        self, method: str, path: str, payload: Any = None, *, token: str | None = None
    ) -> Any:
        """Send ``payload`` as JSON; the decoded answer (HttpError unless 2xx)."""
        body = b"" if payload is None else json.dumps(payload).encode()
        status, data = await self.call(method, path, body, token=token)
        if not 200 <= status < 300:
            raise HttpError(status, data)
        return json.loads(data) if data else None

    def close(self) -> None:
        """Close every idle connection."""
        for connection in self._idle:
            connection.close()
        self._idle.clear()


def _sample(values: list[int], limit: int) -> Iterator[int]:
    """At most ``limit`` evenly spaced values (latency lists stay small in the JSON)."""
    step = max(1, len(values) // limit)
    return iter(values[::step])


async def hammer(spec: dict[str, Any]) -> dict[str, Any]:
    """POST ``spec["body"]`` to ``spec["path"]`` on ``spec["connections"]`` connections."""
    client = Client(
        spec["host"], spec["port"], spec["token"], size=spec["connections"], max_idle_s=60
    )
    body = spec["body"].encode()
    head = client.head("POST", spec["path"], body)
    latencies: list[int] = []
    failures = 0
    # Connect before the window opens, so connecting is not measured.
    warm = await asyncio.gather(*(client._connection() for _ in range(spec["connections"])))
    client._idle.extend(warm)
    await asyncio.sleep(max(0.0, spec["start_at"] - time.time()))
    cpu0 = cpu_self_s()
    start = time.monotonic()
    stop = start + spec["duration_s"]

    async def loop() -> None:
        nonlocal failures
        while time.monotonic() < stop:
            t0 = time.perf_counter_ns()
            status, _ = await client.call("POST", spec["path"], body, head=head)
            latencies.append((time.perf_counter_ns() - t0) // 1000)
            if not 200 <= status < 300:
                failures += 1

    await asyncio.gather(*(loop() for _ in range(spec["connections"])))
    cpu = cpu_self_s() - cpu0
    elapsed = time.monotonic() - start
    client.close()
    return {
        "requests": len(latencies),
        "elapsed_s": elapsed,
        "non_2xx": failures,
        "cpu_s": cpu,
        "latencies_us": list(_sample(latencies, 20_000)),
    }


def main() -> None:
    spec = json.loads(sys.argv[1])
    print(json.dumps(asyncio.run(hammer(spec))))


if __name__ == "__main__":
    main()
