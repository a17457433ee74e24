"""``pullwake runner``'s process: the event loop it runs on."""

from __future__ import annotations

import subprocess
import sys

import pytest

PROGRAM = """
import asyncio, sys
{prelude}
from pullwake.runner.cli import run_loop

async def main() -> None:
    print(type(asyncio.get_running_loop()).__module__)

run_loop(main())
"""


def loop_module(prelude: str = "") -> str:
    """The module of the loop ``run_loop`` runs a coroutine on (in a fresh interpreter)."""
    done = subprocess.run(
        [sys.executable, "-c", PROGRAM.format(prelude=prelude)],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    return done.stdout.strip()


def test_the_runner_runs_on_uvloop_when_it_imports() -> None:
    pytest.importorskip("uvloop")
    assert loop_module().startswith("uvloop")


def test_without_uvloop_the_runner_runs_on_asyncio() -> None:
    assert loop_module("sys.modules['uvloop'] = None").startswith("asyncio")
