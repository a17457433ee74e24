"""``pullwake serve``: the event loop and HTTP parser it picks, and its ``--workers`` option."""

from __future__ import annotations

import gc
import sys

import pytest
import uvicorn
from uvicorn.supervisors import multiprocess

from pullwake.cli import build_parser
from pullwake.config import Settings
from pullwake.http import server as server_module
from pullwake.http.plugin import DrainingServer, create_app
from pullwake.http.server import (
    APP_FACTORY,
    ServingServer,
    importable,
    server_stack,
    worker_logging,
)

SERVABLE = Settings(database_url="postgresql://db.invalid/x", redis_url="redis://redis.invalid")

posix_only = pytest.mark.skipif(sys.platform == "win32", reason="uvloop has no Windows build")


@posix_only
def test_uvloop_and_httptools_are_installed_and_chosen() -> None:
    assert importable("uvloop")
    assert importable("httptools")
    assert server_stack() == ("uvloop", "httptools")


def test_max_header_bytes_needs_h11_and_keeps_uvloop() -> None:
    loop, http = server_stack(h11=True)
    assert http == "h11"
    assert loop == ("uvloop" if importable("uvloop") else "asyncio")


def test_without_the_accelerators_asyncio_and_h11(monkeypatch: pytest.MonkeyPatch) -> None:
    # a None entry in sys.modules makes the import raise ImportError, as if not installed
    monkeypatch.setitem(sys.modules, "uvloop", None)
    monkeypatch.setitem(sys.modules, "httptools", None)
    assert not importable("uvloop")
    assert server_stack() == ("asyncio", "h11")


def test_workers_default_to_one_and_must_be_positive(capsys: pytest.CaptureFixture[str]) -> None:
    parser = build_parser()
    assert parser.parse_args(["serve"]).workers == 1
    assert parser.parse_args(["serve", "--workers", "3"]).workers == 3
    for bad in ("0", "-2"):
        with pytest.raises(SystemExit) as exited:
            parser.parse_args(["serve", "--workers", bad])
        assert exited.value.code == 2
        assert "must be a positive integer" in capsys.readouterr().err


def test_uvicorns_supervisor_still_builds_workers_from_its_process_class() -> None:
    """``run_workers`` swaps ``multiprocess.Process`` for one serving with DrainingServer; an
    uvicorn that stopped looking the name up would silently lose the drain on shutdown."""
    for method in ("init_processes", "keep_subprocess_alive", "restart_all"):
        assert "Process" in getattr(multiprocess.Multiprocess, method).__code__.co_names, method
    assert isinstance(vars(multiprocess.Process)["server"], property)


def test_worker_logging_sends_uvicorns_loggers_to_pullwakes_handler() -> None:
    config = worker_logging(Settings(log_format="json", log_level="warning"))
    assert config["root"] == {"handlers": ["pullwake"], "level": "WARNING"}
    assert config["formatters"]["pullwake"] == {"()": "pullwake.logs.JsonFormatter"}
    for name in ("uvicorn", "uvicorn.error", "uvicorn.access", "litestar"):
        assert config["loggers"][name] == {"handlers": [], "propagate": True}
    assert worker_logging(Settings(), "DEBUG")["root"]["level"] == "DEBUG"  # -v wins


async def test_serving_processes_freeze_their_startup_objects(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """``pullwake serve`` (each of its workers too) freezes what is alive before it serves, so
    full collections never walk the app again; the plugin alone (a host app) does not."""
    served: list[int] = []

    async def fake_serve(self: object, sockets: object = None) -> None:
        served.append(gc.get_freeze_count())

    monkeypatch.setattr(DrainingServer, "serve", fake_serve)
    gc.unfreeze()
    try:
        await DrainingServer(uvicorn.Config(create_app(SERVABLE))).serve()
        await ServingServer(uvicorn.Config(create_app(SERVABLE))).serve()
        process = server_module._DrainingProcess(uvicorn.Config(APP_FACTORY), sockets=[])
        assert isinstance(process.server, ServingServer)
    finally:
        gc.unfreeze()
    assert served[0] == 0
    assert served[1] > 10_000
