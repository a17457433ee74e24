"""Every shell and Python snippet of ``docs/getting-started.md`` runs against a real server.

The page's bash blocks run in order as one shell session (``set -euo pipefail``), as a reader
types them into a terminal; a python block whose first line is ``# NAME.py`` is written to that
file, any other python block is run with ``python -``. A block right after a
``<!-- docs-test: skip: why -->`` comment is left out. The session gets what the skipped
"export" block would give a reader: ``PULLWAKE_SERVER_URL`` and ``PULLWAKE_TOKEN`` of a
``pullwake serve`` of its own, and the venv's ``bin`` first on ``PATH``.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import signal
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from .harness import Cli, ServerProcess

pytestmark = pytest.mark.e2e

PAGE = Path(__file__).resolve().parents[2] / "docs" / "getting-started.md"
FENCE = re.compile(r"^```(\w+)[^\n]*\n(.*?)^```\s*$", re.M | re.S)
SKIP = re.compile(r"<!--\s*docs-test:\s*skip:(.*)-->", re.S)


@dataclass(frozen=True)
class Snippet:
    language: str
    code: str
    skip: str | None  # the reason given in the page, when the block is not run


def snippets(text: str) -> list[Snippet]:
    """The page's fenced blocks, each with the reason of a skip comment right above it."""
    found = []
    for match in FENCE.finditer(text):
        before = text[: match.start()].rstrip()
        comment = before[before.rfind("<!--") :] if before.endswith("-->") else ""
        skip = SKIP.fullmatch(comment)
        reason = " ".join(skip.group(1).split()) if skip else None
        found.append(Snippet(match.group(1), match.group(2), reason))
    return found


def session_script(blocks: list[Snippet]) -> str:
    """One bash script of the runnable bash and python blocks, in page order."""
    lines = ["set -euo pipefail"]
    for number, block in enumerate(blocks):
        if block.skip is not None or block.language not in {"bash", "python"}:
            continue
        lines.append(f"echo '--- snippet {number}' >&2")
        if block.language == "bash":
            lines.append(block.code)
            continue
        first = block.code.splitlines()[0]
        name = re.fullmatch(r"# ([\w.-]+\.py)", first.strip())
        marker = f"PY_SNIPPET_{number}"
        assert marker not in block.code
        if name:
            lines.append(f"cat > {name.group(1)} <<'{marker}'\n{block.code}{marker}")
        else:
            lines.append(f"python - <<'{marker}'\n{block.code}{marker}")
    return "\n".join(lines) + "\n"


def test_every_skipped_block_says_why() -> None:
    blocks = snippets(PAGE.read_text())
    runnable = [b for b in blocks if b.skip is None and b.language in {"bash", "python"}]
    assert len(runnable) >= 6, runnable
    for block in blocks:
        if block.skip is not None:
            assert len(block.skip) >= 20, block


async def test_the_getting_started_page_runs(
    server: ServerProcess, cli: Cli, tmp_path: Path
) -> None:
    token = (await cli("tokens", "create", "--principal", "user:alice@example.com")).ok()
    script = session_script(snippets(PAGE.read_text()))
    (tmp_path / "session.sh").write_text(script)
    env = {k: v for k, v in os.environ.items() if not k.startswith("PULLWAKE_")}
    env |= {
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}",
        "PULLWAKE_SERVER_URL": server.base_url,
        "PULLWAKE_TOKEN": token.stdout.strip(),
        "PYTHONUNBUFFERED": "1",
    }
    proc = await asyncio.create_subprocess_exec(
        "bash",
        str(tmp_path / "session.sh"),
        cwd=tmp_path,
        env=env,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        start_new_session=True,  # the runner it starts in the background is in its group
    )
    try:
        out, err = await asyncio.wait_for(proc.communicate(), 90)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
    stdout, stderr = out.decode(), err.decode()
    (tmp_path / "stdout.txt").write_text(stdout)  # kept with the test's tmp_path for a look
    (tmp_path / "stderr.txt").write_text(stderr)
    where = f"--- script\n{script}\n--- stdout\n{stdout}\n--- stderr\n{stderr}"
    assert proc.returncode == 0, where
    assert "1 queued" in stdout, where
    assert re.search(r"^offset 2: wake wk_\w+ queued$", stdout, re.M), where
    assert "['echo: hi', 'echo: again']" in stdout, where
    assert "tail_offset=2, acked_offset=2" in stdout, where
    assert '"reply":"echo: again"' in stdout, where
    assert "runner my-laptop connected: streaming wakes" in stderr, where
