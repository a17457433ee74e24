"""``pullwake runner``: argument parsing and the process around :class:`Runner`."""

from __future__ import annotations

import argparse
import asyncio
import importlib
import importlib.util
import inspect
import logging
import os
import sys
from collections.abc import Coroutine
from pathlib import Path
from types import ModuleType
from typing import Any

__all__ = ["add_parser", "load_handler", "main", "run_loop"]

log = logging.getLogger("pullwake.runner")

DEFAULT_SERVER = "http://127.0.0.1:8000"
EXIT_REFUSED = 78
"""The server refused the runner for good (EX_CONFIG: a supervisor should not restart it as
it is, e.g. systemd's ``RestartPreventExitStatus=78``)."""


def add_parser(sub: Any) -> argparse.ArgumentParser:
    """Add the ``runner`` subcommand to the ``pullwake`` subparsers."""
    runner: argparse.ArgumentParser = sub.add_parser(
        "runner",
        help="pull wakes for a runner id and run a handler or a command for each",
        description="Several processes with the same --id form a pool. "
        "Environment defaults: PULLWAKE_SERVER_URL, PULLWAKE_TOKEN.",
    )
    runner.add_argument("--id", dest="runner_id", required=True, help="the runner id")
    what = runner.add_mutually_exclusive_group(required=True)
    what.add_argument(
        "--handler",
        help="an async function taking a Wake, as module:function or path/to/file.py:function "
        '(imported as a module: code under if __name__ == "__main__": does not run); no default: '
        "one of --handler and --exec is required",
    )
    what.add_argument(
        "--exec",
        dest="exec_command",
        metavar="COMMAND",
        help="a shell command run per wake with the notification JSON on stdin; "
        "exit 0 acks the delivered messages, non-zero releases the claim with stderr recorded; "
        "no default: one of --handler and --exec is required",
    )
    runner.add_argument(
        "--server",
        default=os.environ.get("PULLWAKE_SERVER_URL") or DEFAULT_SERVER,
        help=f"server base URL (PULLWAKE_SERVER_URL, default {DEFAULT_SERVER})",
    )
    runner.add_argument(
        "--token",
        default=os.environ.get("PULLWAKE_TOKEN") or None,
        help="API token (default PULLWAKE_TOKEN; prefer it: arguments are visible to other users)",
    )
    runner.add_argument("--concurrency", type=int, default=4, help="entities in flight (default 4)")
    runner.add_argument("--label", default=None, help="label shown for the runner (default: host)")
    runner.add_argument(
        "--kind",
        default="local",
        choices=["local", "cloud-worker", "sandbox", "ci", "server"],
        help="runner kind recorded at registration (default local)",
    )
    runner.add_argument(
        "--session", default=None, help="this process's session id (default: host + random)"
    )
    runner.add_argument(
        "--drain-timeout-ms",
        type=int,
        default=10_000,
        help="on SIGINT/SIGTERM, how long running handlers may finish (default 10000)",
    )
    runner.add_argument(
        "--retry-delay-ms",
        type=int,
        default=1_000,
        help="how long a claim whose handler failed without progress is held before it ends, "
        "doubling per failure in a row of the entity (default 1000; 0: no delay)",
    )
    runner.add_argument(
        "--max-retry-delay-ms",
        type=int,
        default=30_000,
        help="the longest such delay (default 30000)",
    )
    return runner


def load_handler(spec: str) -> Any:
    """Import ``module:function`` or ``path/to/file.py:function`` as a module (never as
    ``__main__``: code under ``if __name__ == "__main__":`` does not run). The current directory
    is importable, and so is a file's own directory."""
    from pullwake.runner.runner import Runner

    where, sep, attr = spec.rpartition(":")
    if not sep or not where or not attr:
        raise ValueError(
            f"--handler must look like module:function or path/to/file.py:function, got {spec!r}"
        )
    starts = Runner.starts_in_process
    module = _import_file(where) if _is_path(where) else _import_module(where)
    if Runner.starts_in_process != starts:
        raise ValueError(
            f"importing {where} started a runner of its own: put the code that starts one "
            'under `if __name__ == "__main__":`'
        )
    target: Any = module
    for part in attr.split("."):
        target = getattr(target, part)
    if not inspect.iscoroutinefunction(target):
        raise ValueError(f"{spec} must be an async function: async def handle(wake): ...")
    return target


def _is_path(where: str) -> bool:
    return where.endswith(".py") or "/" in where or os.sep in where


def _import_module(name: str) -> ModuleType:
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    return importlib.import_module(name)


def _import_file(path: str) -> ModuleType:
    file = Path(path).resolve()
    if not file.is_file():
        raise ImportError(f"no such file: {path}")
    name = file.stem if file.stem.isidentifier() and file.stem not in sys.modules else None
    name = name or f"pullwake_handler_{abs(hash(str(file))):x}"
    spec = importlib.util.spec_from_file_location(name, file)
    if spec is None or spec.loader is None:
        raise ImportError(f"cannot import {path} as a module")
    if str(file.parent) not in sys.path:
        sys.path.insert(0, str(file.parent))  # its own imports work as under `python file.py`
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules[name]
        raise
    return module


def main(args: argparse.Namespace) -> int:
    """Run the runner until SIGINT/SIGTERM; 2 on bad arguments, 78 when the server refuses it."""
    from pullwake.runner.execute import exec_handler
    from pullwake.runner.runner import Runner
    from pullwake.runner.transport import Refused

    if args.concurrency < 1:
        print("pullwake runner: --concurrency must be at least 1", file=sys.stderr)
        return 2
    if not 0 <= args.retry_delay_ms <= args.max_retry_delay_ms:
        print(
            "pullwake runner: need 0 <= --retry-delay-ms <= --max-retry-delay-ms",
            file=sys.stderr,
        )
        return 2
    try:
        handler = (
            exec_handler(args.exec_command) if args.exec_command else load_handler(args.handler)
        )
    except (ImportError, AttributeError, ValueError) as exc:
        print(f"pullwake runner: cannot load the handler: {exc}", file=sys.stderr)
        return 2
    runner = Runner(
        args.server,
        args.runner_id,
        handler,
        args.token,
        label=args.label,
        kind=args.kind,
        concurrency=args.concurrency,
        session=args.session,
        drain_timeout_ms=args.drain_timeout_ms,
        retry_delay_ms=args.retry_delay_ms,
        max_retry_delay_ms=args.max_retry_delay_ms,
    )
    try:
        run_loop(runner.run())
    except Refused as exc:
        print(f"pullwake runner: {exc}", file=sys.stderr)
        return EXIT_REFUSED
    return 0


def run_loop(main: Coroutine[Any, Any, None]) -> None:
    """Run ``main`` on uvloop when it imports (as ``pullwake serve`` does), else on asyncio's
    own loop: uvloop's loop and socket calls cost the runner less CPU per wake."""
    try:
        import uvloop
    except ImportError:
        asyncio.run(main)
        return
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as loop_runner:
        loop_runner.run(main)
