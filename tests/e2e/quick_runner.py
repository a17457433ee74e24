"""``pullwake runner`` with a liveness heartbeat every ``$QUICK_HEARTBEAT_MS`` ms (default 1000),
so a lease of three of them: the command has no option for it, and a test that kills a runner
wants its lease to end seconds later. Run as ``python quick_runner.py <pullwake runner args>``.
"""

from __future__ import annotations

import os
import sys

from pullwake.cli import main
from pullwake.runner.runner import Runner

if __name__ == "__main__":
    defaults = Runner.__init__.__kwdefaults__
    assert defaults is not None
    assert "heartbeat_interval_ms" in defaults
    defaults["heartbeat_interval_ms"] = int(os.environ.get("QUICK_HEARTBEAT_MS", "1000"))
    raise SystemExit(main(["runner", *sys.argv[1:]]))
