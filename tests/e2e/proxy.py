"""A tiny fail-over TCP proxy: the e2e tests' stand-in for a load balancer in front of replicas.

Each new connection goes to the first upstream that accepts it, in order (an active/passive
pair: everything to replica A while it listens, to B once A refuses). Bytes are copied both
ways unchanged; when either side closes or breaks, both are closed, so a client whose upstream
died sees its connection end as it would behind a real balancer. It runs in its own thread and
event loop, so a busy test loop never delays the traffic it carries.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections import Counter
from dataclasses import dataclass, field

from pullwake.testing import free_port

_CHUNK = 65_536


@dataclass
class FailoverProxy:
    """Listens on 127.0.0.1:``port``; forwards to the first of ``upstreams`` that accepts."""

    upstreams: list[int]
    port: int = field(default_factory=free_port)
    connect_timeout_s: float = 2.0
    routed: Counter[int] = field(default_factory=Counter)
    """Connections forwarded, by upstream port."""
    refused: Counter[int] = field(default_factory=Counter)
    """Connection attempts an upstream refused (or did not answer in time)."""
    _loop: asyncio.AbstractEventLoop | None = None
    _thread: threading.Thread | None = None
    _server: asyncio.Server | None = None
    _lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def counts(self) -> tuple[dict[int, int], dict[int, int]]:
        """A copy of (routed, refused), safe to read from another thread."""
        with self._lock:
            return dict(self.routed), dict(self.refused)

    def start(self, timeout: float = 5) -> None:
        started = threading.Event()

        def run() -> None:
            loop = self._loop = asyncio.new_event_loop()
            self._server = loop.run_until_complete(
                asyncio.start_server(self._accept, "127.0.0.1", self.port)
            )
            started.set()
            loop.run_forever()
            self._server.close()
            loop.run_until_complete(self._server.wait_closed())
            for task in asyncio.all_tasks(loop):
                task.cancel()
            loop.run_until_complete(asyncio.sleep(0))
            loop.close()

        self._thread = threading.Thread(target=run, name="failover-proxy", daemon=True)
        self._thread.start()
        if not started.wait(timeout):
            raise AssertionError(f"the proxy did not start in {timeout} s")

    def stop(self) -> None:
        loop, thread = self._loop, self._thread
        if loop is None or thread is None:
            return
        with contextlib.suppress(RuntimeError):  # already closed
            loop.call_soon_threadsafe(loop.stop)
        thread.join(10)
        self._loop = self._thread = None

    async def _accept(self, client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter) -> None:
        for port in self.upstreams:
            try:
                upstream_r, upstream_w = await asyncio.wait_for(
                    asyncio.open_connection("127.0.0.1", port), self.connect_timeout_s
                )
            except (OSError, TimeoutError):
                with self._lock:
                    self.refused[port] += 1
                continue
            with self._lock:
                self.routed[port] += 1
            await asyncio.gather(
                _pipe(client_r, upstream_w, client_w), _pipe(upstream_r, client_w, upstream_w)
            )
            return
        client_w.close()


async def _pipe(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, reader_w: asyncio.StreamWriter
) -> None:
    """Copy until EOF or an error, then close both connections (the other pipe ends too)."""
    try:
        while data := await reader.read(_CHUNK):
            writer.write(data)
            await writer.drain()
    except (OSError, asyncio.IncompleteReadError):
        pass
    finally:
        for w in (writer, reader_w):
            with contextlib.suppress(OSError, RuntimeError):
                w.close()
