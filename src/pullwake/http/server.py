"""``pullwake serve`` under uvicorn: the event loop and HTTP parser, and N worker processes."""

from __future__ import annotations

import gc
import importlib
import logging
import socket
from typing import Any

import uvicorn
from uvicorn.config import STARTUP_FAILURE
from uvicorn.supervisors import multiprocess

from pullwake import tracing
from pullwake.config import Settings
from pullwake.http.plugin import DrainingServer, create_app
from pullwake.logs import logging_config

__all__ = [
    "APP_FACTORY",
    "ServingServer",
    "importable",
    "run_workers",
    "serve",
    "server_stack",
    "worker_logging",
]

# What each worker process imports: ``create_app()`` reads its settings from the environment
# the worker inherits from ``pullwake serve``.
APP_FACTORY = "pullwake.http.plugin:create_app"


def importable(module: str) -> bool:
    """Whether ``module`` imports (an optional accelerator such as uvloop is installed)."""
    try:
        importlib.import_module(module)
    except ImportError:
        return False
    return True


def server_stack(*, h11: bool = False) -> tuple[str, str]:
    """uvicorn's (event loop, HTTP parser): uvloop and httptools when they import, else asyncio
    and h11; ``h11=True`` forces h11 (only it takes a limit on incomplete request heads)."""
    loop = "uvloop" if importable("uvloop") else "asyncio"
    http = "httptools" if not h11 and importable("httptools") else "h11"
    return loop, http


def worker_logging(settings: Settings, level: str | None = None) -> dict[str, Any]:
    """uvicorn's ``log_config``: pullwake's handler and format (``PULLWAKE_LOG_FORMAT``) for
    uvicorn's loggers too, applied again in every worker process. ``level``: this process's
    (``-v`` makes it DEBUG), else ``PULLWAKE_LOG_LEVEL``."""
    return logging_config(settings.log_format, level or settings.log_level.upper())


def freeze_startup_objects() -> None:
    """Move every object alive now (modules, the app, its routes and plugins: objects that live
    as long as the process) out of the cyclic garbage collector's sight (:func:`gc.freeze`).

    A process holding ten thousand wake streams has a heap of a few hundred megabytes, and each
    full collection walks all of it, the startup objects included: at 10,000 streams such a
    collection took 0.6-0.9 s of CPU, a pause for every stream and request. Frozen, the
    startup objects are never walked again (reference counting still frees them); only what
    the process allocates while serving is. Done in ``pullwake serve``'s own processes only, not
    by the plugin: a host app owns its process."""
    gc.collect()
    gc.freeze()


class ServingServer(DrainingServer):
    """:class:`DrainingServer` in a process of its own (``pullwake serve``, each of its
    ``--workers``): startup objects are frozen before serving."""

    async def serve(self, sockets: list[socket.socket] | None = None) -> None:
        # Each process exports its own spans (PULLWAKE_OTEL=on): a provider's export thread
        # does not survive into a worker process.
        tracing.configure("pullwake-api", enabled=Settings.from_env().otel)
        freeze_startup_objects()
        await super().serve(sockets)


def serve(settings: Settings, options: dict[str, Any], *, workers: int) -> int:
    """Run the API with uvicorn ``options``: in this process when ``workers`` is 1, else in
    ``workers`` processes on one socket (their own settings from the inherited environment)."""
    level = logging.getLevelName(logging.getLogger().getEffectiveLevel())
    log_config = worker_logging(settings, level)
    if workers == 1:
        app = create_app(settings)
        ServingServer(uvicorn.Config(app, log_config=log_config, **options)).run()
        return 0
    config = uvicorn.Config(
        APP_FACTORY,
        factory=True,
        workers=workers,
        log_config=log_config,
        **options,
    )
    return run_workers(config)


class _DrainingProcess(multiprocess.Process):
    """uvicorn's worker process, serving with :class:`DrainingServer`."""

    @property
    def server(self) -> uvicorn.Server:
        if self._server is None:
            self._server = ServingServer(self.config)
        return self._server


def run_workers(config: uvicorn.Config) -> int:
    """Bind the socket here, then run ``config.workers`` processes on it under uvicorn's
    supervisor until SIGTERM or SIGINT; 0, or ``STARTUP_FAILURE`` when a worker could not start.

    Every worker ends its open wake streams at once on shutdown, as a single server does.
    """
    # uvicorn's supervisor builds (and rebuilds) its workers from this module-level name; this
    # process does nothing else meanwhile. A unit test checks that the name is still used.
    uvicorn_process = multiprocess.Process
    sock = config.bind_socket()
    multiprocess.Process = _DrainingProcess  # type: ignore[misc]
    try:
        supervisor = multiprocess.Multiprocess(config, sockets=[sock])
        supervisor.run()
    finally:
        multiprocess.Process = uvicorn_process  # type: ignore[misc]
        sock.close()
    failed = any(p.exitcode == STARTUP_FAILURE for p in supervisor.processes)
    return STARTUP_FAILURE if failed else 0
