"""``pullwake runner``'s process: the event loop it runs on, and how it loads a handler."""

from __future__ import annotations

import subprocess
import sys
import uuid
from pathlib import Path

import pytest

from pullwake.runner.cli import load_handler

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


# --- --handler ------------------------------------------------------------------------------

HANDLER_MODULE = """
import sibling

async def handle(wake):
    return sibling.VALUE

if __name__ == "__main__":
    raise SystemExit("the main block ran")
"""

STARTS_A_RUNNER = """
import asyncio
from pullwake.runner import Runner

async def handle(wake):
    pass

async def main():
    runner = Runner("http://127.0.0.1:9", "build-box", handle, "pwk_x")
    await runner.start()
    await runner.stop()

asyncio.run(main())
"""


@pytest.fixture
def handler_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    directory = tmp_path / "handlers"
    directory.mkdir()
    name = f"h_{uuid.uuid4().hex[:8]}"
    (directory / f"{name}.py").write_text(HANDLER_MODULE)
    (directory / "sibling.py").write_text("VALUE = 42\n")
    (directory / "starts.py").write_text(STARTS_A_RUNNER)
    monkeypatch.setattr(sys, "path", list(sys.path))
    monkeypatch.setattr(sys, "modules", dict(sys.modules))
    monkeypatch.chdir(directory)
    return directory / f"{name}.py"


async def test_a_handler_module_is_imported_without_running_its_main(handler_dir: Path) -> None:
    handle = load_handler(f"{handler_dir.stem}:handle")
    assert await handle(None) == 42
    assert handle.__module__ == handler_dir.stem


async def test_a_handler_file_is_imported_as_a_module_with_its_directory_importable(
    handler_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)  # elsewhere: the file's directory makes `import sibling` work
    handle = load_handler(f"{handler_dir}:handle")
    assert await handle(None) == 42
    assert handle.__module__ == handler_dir.stem
    relative = load_handler(f"handlers/{handler_dir.name}:handle")
    assert await relative(None) == 42


def test_a_module_that_starts_a_runner_on_import_is_refused(handler_dir: Path) -> None:
    with pytest.raises(ValueError, match="importing starts started a runner of its own: put"):
        load_handler("starts:handle")


@pytest.mark.parametrize(
    ("spec", "error", "match"),
    [
        ("no_colon", ValueError, "must look like module:function or path/to/file.py:function"),
        ("missing/file.py:handle", ImportError, "no such file: missing/file.py"),
        ("sibling:VALUE", ValueError, "must be an async function"),
        ("sibling:nope", AttributeError, "nope"),
    ],
)
def test_bad_handler_specs(
    handler_dir: Path, spec: str, error: type[Exception], match: str
) -> None:
    with pytest.raises(error, match=match):
        load_handler(spec)
