"""A runner in a program that configured no logging still logs (to stderr, from INFO), and
gets out of the way of a program that configures logging (each case in a fresh interpreter)."""

from __future__ import annotations

import subprocess
import sys

PROGRAM = """
import asyncio, logging, sys
from pullwake.testing import free_port
from pullwake.runner import Runner

async def handle(wake):
    pass

async def main():
    {before}
    runner = Runner(f"http://127.0.0.1:{{free_port()}}", "build-box", handle, "pwk_x",
                    session="s1")
    await runner.start()
    await asyncio.sleep(0.2)  # the connect fails: nothing listens
    {after}
    await runner.stop()
    logging.getLogger("pullwake.runner").info("after stop")
    print("level", logging.getLevelName(logging.getLogger("pullwake").level))

asyncio.run(main())
"""


def run(before: str = "pass", after: str = "pass") -> tuple[str, str]:
    done = subprocess.run(
        [sys.executable, "-c", PROGRAM.format(before=before, after=after)],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    return done.stdout, done.stderr


def test_without_logging_configured_the_runner_logs_info_to_stderr() -> None:
    stdout, stderr = run()
    lines = stderr.splitlines()
    assert (
        " INFO  pullwake.runner: runner build-box starting (session s1, concurrency 4)"
        in (lines[0])
    )
    assert any(" WARNING pullwake.runner: runner build-box: connect failed: " in x for x in lines)
    assert any(" INFO  pullwake.runner: runner build-box reconnecting in " in x for x in lines)
    assert lines[-1].endswith(" INFO  pullwake.runner: after stop")
    assert stdout.splitlines() == ["level INFO"]


def test_a_program_that_configured_logging_keeps_its_own_settings() -> None:
    stdout, stderr = run(before="logging.basicConfig(level=logging.WARNING, format='%(message)s')")
    lines = stderr.splitlines()
    assert lines
    assert all(line.startswith("runner build-box: connect failed: ") for line in lines)
    assert stdout.splitlines() == ["level NOTSET"]


def test_logging_configured_later_takes_over_without_duplicates() -> None:
    stdout, stderr = run(
        after="logging.basicConfig(level=logging.WARNING, format='ROOT %(message)s')"
    )
    assert " INFO  pullwake.runner: runner build-box starting" in stderr.splitlines()[0]
    # From then on the program's level decides: its handler gets no INFO record.
    assert "after stop" not in stderr
    assert stdout.splitlines() == ["level NOTSET"]


def test_a_warning_after_logging_was_configured_reaches_the_programs_handler_once() -> None:
    _, stderr = run(
        after="logging.basicConfig(level=logging.WARNING, format='ROOT %(message)s'); "
        "logging.getLogger('pullwake.runner').warning('late warning')"
    )
    assert stderr.count("late warning") == 1
    assert stderr.splitlines()[-1] == "ROOT late warning"
